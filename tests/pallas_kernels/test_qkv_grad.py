"""qkv_grad against its plain-JAX reference, and the reference against autodiff of the forward.

`_QkvGradTest` runs compiled (GPU only, at `simple`'s micro-batch); `TestQkvGradInterpret` runs
the same checks in the Pallas interpreter on CPU at small shapes.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from jaxrun.model import qkv
from jaxrun.model.layers import rms_norm_and_rstd
from pallas_kernels.qkv_grad import qkv_grad, reference
from tests.pallas_kernels.checks import errors, fresh_seed

# After dividing by max|reference|: one bf16 step. dq and dk are rounded to bf16 (twice: after the
# rotation and after the norm), and a last float32 bit (fused multiply-adds, summation order)
# flips the rounding of a few entries.
OUT_TOL = 1e-2
MEAN_TOL = 1e-4  # ... of a few entries only
SUM_TOL = 1e-2


def _inputs(seed, b, t, heads, k, dtype):
    """Gradients and projections [N, F], rstd [heads, N] of the projections, RoPE tables [T, K/2]."""
    n, f = b * t, heads * k
    keys = jax.random.split(jax.random.key(seed), 5)
    dq, dk, dv, q, kk = (jax.random.normal(key, (n, f)).astype(dtype) for key in keys)
    rstd = [rms_norm_and_rstd(x.reshape(n, heads, k))[1][..., 0].T for x in (q, kk)]
    theta = jnp.outer(jnp.arange(t, dtype=jnp.float32), (1 / 1024.0) ** jnp.linspace(0, 1, k // 2))
    return dq, dk, dv, q, kk, *rstd, jnp.cos(theta), jnp.sin(theta)


class _QkvGradTest:
    INTERPRET = False
    SHAPES = ((64, 1024, 6, 128), (2, 1000, 6, 128), (4, 256, 3, 64))  # (B, T, heads, head_dim)
    TILES = ()

    @pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
    @pytest.mark.parametrize("column_sum", [True, False], ids=["sums", "no_sums"])
    def test_matches_reference(self, dtype, column_sum):
        for b, t, heads, k in self.SHAPES:
            seed = fresh_seed()
            args = _inputs(seed, b, t, heads, k, jnp.dtype(dtype))
            out, sums = qkv_grad(
                *args, heads=heads, column_sum=column_sum, interpret=self.INTERPRET, **dict(self.TILES)
            )
            want, want_sums = reference(*args, heads=heads, column_sum=column_sum)
            assert out.dtype == args[0].dtype and out.shape == (b * t, 3 * heads * k)
            err, mean_err = errors(out, want)
            tol = OUT_TOL if dtype == "bfloat16" else 1e-5
            assert err <= tol, f"dqkv {(b, t, heads, k)} {dtype}: {err:.3g} (seed {seed})"
            assert mean_err <= MEAN_TOL, f"dqkv {(b, t, heads, k)}: more than a few entries (seed {seed})"
            assert bool(jnp.all(out[:, 2 * heads * k :] == args[2])), "dv is copied as it is"
            if column_sum:
                assert errors(sums, jnp.sum(out.astype(jnp.float32), axis=0))[0] <= 1e-5, f"seed {seed}"
                assert errors(sums, want_sums)[0] <= SUM_TOL, f"sums {(b, t, heads, k)} (seed {seed})"
            else:
                assert sums is None


@pytest.mark.gpu
class TestQkvGrad(_QkvGradTest):
    """Compiled Triton kernel."""


class TestQkvGradInterpret(_QkvGradTest):
    """The same kernel in the Pallas interpreter, small enough for CPU CI."""

    INTERPRET = True
    SHAPES = ((2, 64, 3, 64), (3, 24, 2, 32))  # several row blocks; T = 8·3
    TILES = (("block_rows", 16), ("chunk_rows", 4))


@pytest.mark.gpu
def test_compiled_inside_shard_map():
    """Sequences split over every device, shard_map's varying-axes check on, as the train step
    runs it; the bias sums added across devices."""
    seed = fresh_seed()
    mesh = jax.make_mesh((jax.device_count(),), ("dp",))
    b, t, heads, k = 2 * jax.device_count(), 256, 3, 64
    args = _inputs(seed, b, t, heads, k, jnp.bfloat16)

    def local(*a):
        out, sums = qkv_grad(*a, heads=heads, column_sum=True)
        return out, jax.lax.psum(sums, "dp")

    rows, per_head, whole = P("dp"), P(None, "dp"), P()
    specs = (rows,) * 5 + (per_head,) * 2 + (whole,) * 2
    sharded = jax.jit(
        jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(rows, whole), check_vma=True)
    )
    out, sums = sharded(*(jax.device_put(a, jax.NamedSharding(mesh, s)) for a, s in zip(args, specs)))
    want, want_sums = reference(*args, heads=heads, column_sum=True)
    assert errors(out, want)[0] <= OUT_TOL, f"seed {seed}"
    assert errors(sums, want_sums)[0] <= SUM_TOL, f"seed {seed}"


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_reference_is_autodiffs_backward(dtype):
    """The reference is the VJP of the forward it undoes: QK-norm then 'halves' RoPE on q and k,
    v as it is, and the three laid out side by side."""
    seed = fresh_seed()
    b, t, heads, k = 2, 32, 3, 64
    dq, dk, dv, q, kk, rq, rk, cos, sin = _inputs(seed, b, t, heads, k, jnp.dtype(dtype))

    def forward(q, kk, v):
        shaped = [x.reshape(b, t, heads, k) for x in (q, kk)]
        rotated = [qkv.rotate_halves(rms_norm_and_rstd(x)[0], cos, sin) for x in shaped]
        return [x.reshape(b * t, -1) for x in rotated] + [v]

    _, vjp = jax.vjp(forward, q, kk, dv)
    want = jnp.concatenate(vjp([dq, dk, dv]), axis=1)
    got, _ = reference(dq, dk, dv, q, kk, rq, rk, cos, sin, heads=heads, column_sum=False)
    assert errors(got, want)[0] <= (OUT_TOL if dtype == "bfloat16" else 1e-6), f"seed {seed}"


def test_bad_inputs_are_refused():
    args = _inputs(0, 2, 32, 2, 32, jnp.bfloat16)
    with pytest.raises(ValueError, match="power-of-two width"):
        qkv_grad(*args, heads=3, interpret=True)
    with pytest.raises(ValueError, match="one shape"):
        qkv_grad(args[0][:32], *args[1:], heads=2, interpret=True)
    with pytest.raises(ValueError, match="block_rows = 24"):
        qkv_grad(*args, heads=2, block_rows=24, interpret=True)
