"""relu2_mlp against its fp32 reference: forward and every gradient.

`_Relu2MlpTest` holds the checks with `INTERPRET = False` (compiled kernels,
GPU only); `TestRelu2MlpInterpret` flips it to run the same kernels in the
Pallas interpreter on CPU, at small widths.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pallas_kernels.relu2_mlp import BlockSizes, relu2_mlp, relu2_mlp_reference
from tests.pallas_kernels.checks import fresh_seed

# Errors are measured after dividing by max|reference|, so one tolerance fits every size.
FWD_TOL = {
    jnp.bfloat16: {"atol": 1.5e-2, "rtol": 1.5e-2},
    jnp.float32: {"atol": 5e-3, "rtol": 5e-3},  # tf32 tensor cores on GPU
}
VJP_TOL = {
    jnp.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
    jnp.float32: {"atol": 1e-2, "rtol": 1e-2},
}
GRAD_NAMES = ("dx", "dw1", "dw2", "db1", "db2")


def _assert_close(name, actual, expected, tol, seed):
    scale = float(jnp.max(jnp.abs(expected))) or 1.0
    chex.assert_shape(actual, expected.shape)
    chex.assert_tree_all_finite(actual)
    try:
        chex.assert_trees_all_close(actual.astype(jnp.float32) / scale, expected / scale, **tol)
    except AssertionError as e:
        raise AssertionError(f"{name} (seed {seed}, max|ref| {scale:.3g}): {e}") from None


def _inputs(seed, lead, d, f, dtype, bias, dead_rows=()):
    """Unit-scale activations and weights; `dead_rows` get all-negative pre-activations."""
    k = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(k[0], (*lead, d))
    w1 = jax.random.normal(k[1], (d, f)) / np.sqrt(d)
    w2 = jax.random.normal(k[2], (f, d)) / np.sqrt(f)
    if dead_rows:
        # Feature 0 is off for live rows and large for dead ones, whose every
        # unit then sees about -30 from a constant weight row of -3.
        x = x.reshape(-1, d).at[:, 0].set(0.0).at[np.array(dead_rows), 0].set(10.0).reshape(x.shape)
        w1 = w1.at[0].set(-3.0)
    b1 = 0.1 * jax.random.normal(k[3], (f,)) if bias else None
    b2 = 0.1 * jax.random.normal(k[4], (d,)) if bias else None
    dy = jax.random.normal(k[5], (*lead, d))
    cast = lambda a: None if a is None else a.astype(dtype)
    return cast(x), cast(w1), cast(w2), cast(b1), cast(b2), cast(dy)


class _Relu2MlpTest:
    INTERPRET = False
    LEAD = (3, 333)  # 999 rows: not a multiple of block_m
    D, F = 768, 3072
    BLOCK_SIZES = BlockSizes.get_default()
    GEMMS = "triton"
    DTYPES = (jnp.bfloat16, jnp.float32)

    def _run(self, x, w1, w2, b1, b2, dy):
        mlp = lambda *a: relu2_mlp(
            *a, block_sizes=self.BLOCK_SIZES, gemms=self.GEMMS, interpret=self.INTERPRET
        )
        args = (x, w1, w2) if b1 is None else (x, w1, w2, b1, b2)
        y, vjp = jax.vjp(mlp, *args)
        y_ref, vjp_ref = jax.vjp(relu2_mlp_reference, *args)
        return (y, vjp(dy)), (y_ref, vjp_ref(dy.astype(jnp.float32)))

    @pytest.mark.parametrize("bias", [False, True])
    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
    def test_matches_reference(self, dtype, bias):
        seed = fresh_seed()
        args = _inputs(seed, self.LEAD, self.D, self.F, dtype, bias)
        if dtype not in self.DTYPES:
            with pytest.raises(ValueError, match="bf16"):
                self._run(*args)
            return
        (y, grads), (y_ref, grads_ref) = self._run(*args)
        assert y.dtype == dtype
        _assert_close("y", y, y_ref, FWD_TOL[dtype], seed)
        for name, g, g_ref in zip(GRAD_NAMES, grads, grads_ref):
            _assert_close(name, g, g_ref, VJP_TOL[dtype], seed)

    @pytest.mark.parametrize("bias", [False, True])
    def test_dead_rows(self, bias):
        """Rows with every pre-activation negative output b2 and pass no gradient to x."""
        seed = fresh_seed()
        dead = [0, 5, 17, self.LEAD[0] * self.LEAD[1] - 1]
        args = _inputs(seed, self.LEAD, self.D, self.F, jnp.bfloat16, bias, dead_rows=dead)
        x, w1, _, b1, b2, _ = args
        pre = x.reshape(-1, self.D)[np.array(dead)].astype(jnp.float32) @ w1.astype(jnp.float32)
        assert float(jnp.max(pre if b1 is None else pre + b1[None, :])) < 0.0
        (y, grads), (_y_ref, grads_ref) = self._run(*args)
        y_dead = y.reshape(-1, self.D)[np.array(dead)]
        expected = jnp.zeros_like(y_dead) if b2 is None else jnp.broadcast_to(b2[None, :], y_dead.shape)
        chex.assert_trees_all_equal(y_dead, expected)
        dx_dead = grads[0].reshape(-1, self.D)[np.array(dead)]
        chex.assert_trees_all_equal(dx_dead, jnp.zeros_like(dx_dead))
        for name, g, g_ref in zip(GRAD_NAMES, grads, grads_ref):
            _assert_close(name, g, g_ref, VJP_TOL[jnp.bfloat16], seed)


@pytest.mark.gpu
class TestRelu2Mlp(_Relu2MlpTest):
    """Compiled Triton kernels at the model's widths."""


class TestRelu2MlpInterpret(_Relu2MlpTest):
    """The same kernels in the Pallas interpreter, small enough for CPU CI."""

    INTERPRET = True
    LEAD = (2, 100)
    D, F = 64, 256
    BLOCK_SIZES = BlockSizes(block_m=64, block_n=64, block_k=32, group_m=2)


class _MosaicGemms(_Relu2MlpTest):
    """The two epilogue GEMMs as Hopper wgmma/TMA kernels (relu2_mgpu.py): bf16 only."""

    GEMMS = "mosaic"
    DTYPES = (jnp.bfloat16,)

    def test_gradients_inside_shard_map(self):
        """Under `shard_map`, with the weights varying over the data axis as the train step has
        them, every gradient varies as its primal does, and on one device the summed gradients
        equal those taken outside."""
        seed = fresh_seed()
        x, w1, w2, b1, b2, dy = _inputs(seed, self.LEAD, self.D, self.F, jnp.bfloat16, bias=True)
        mlp = lambda x, *p: relu2_mlp(x, *p, gemms=self.GEMMS, interpret=self.INTERPRET)

        def grads(x, params, dy):
            return jax.vjp(mlp, x, *params)[1](dy)

        def per_device(x, params, dy):  # data and weights vary over "dp", as in the train step
            return jax.lax.psum(grads(*jax.lax.pcast((x, params, dy), ("dp",), to="varying")), "dp")

        mesh = jax.make_mesh((1,), ("dp",))  # the simulator holds one device's barriers at a time
        inside = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P(), out_specs=P()))
        outside = grads(x, (w1, w2, b1, b2), dy)
        for name, g, g_ref in zip(GRAD_NAMES, inside(x, (w1, w2, b1, b2), dy), outside):
            chex.assert_trees_all_close(g, g_ref, atol=0, rtol=0, custom_message=f"{name} (seed {seed})")


@pytest.mark.gpu
class TestRelu2MlpMosaic(_MosaicGemms):
    """Compiled for Hopper, at the model's widths."""


class TestRelu2MlpMosaicInterpret(_MosaicGemms):
    """In the Mosaic GPU simulator; 200 rows, padded to one 256-row CTA."""

    INTERPRET = True
    LEAD = (2, 100)
    D, F = 64, 256
