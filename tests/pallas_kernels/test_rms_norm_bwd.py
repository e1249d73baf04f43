"""rms_norm_bwd against its plain-JAX reference and against autodiff of the norm itself.

`_RmsNormBwdTest` runs compiled (GPU only, at `simple`'s shapes); `TestRmsNormBwdInterpret`
runs the same checks in the Pallas interpreter on CPU at small shapes.
"""

import chex
import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.rms_norm_bwd import reference, rms_norm_bwd
from tests.pallas_kernels.checks import fresh_seed

EPS = float(jnp.finfo(jnp.float32).eps)
# Against the reference (same formula, other summation order), after dividing by max|reference|.
# bf16: the output is rounded twice (dx, then r + dx), so one bf16 step of the largest values.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 8e-3}


def _inputs(seed, n, d, dtype, gain):
    k = jax.random.split(jax.random.key(seed), 4)
    x = (3.0 * jax.random.normal(k[0], (n, d))).astype(dtype)
    g, r = (jax.random.normal(kk, (n, d)).astype(dtype) for kk in k[1:3])
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), axis=1) + EPS)
    gain_D = 1.0 + 0.2 * jax.random.normal(k[3], (d,)) if gain else None
    return x, g, r, rstd, gain_D


def _assert_close(name, actual, expected, tol, seed):
    chex.assert_shape(actual, expected.shape)
    chex.assert_tree_all_finite(actual)
    scale = float(jnp.max(jnp.abs(expected.astype(jnp.float32)))) or 1.0
    err = float(jnp.max(jnp.abs(actual.astype(jnp.float32) - expected.astype(jnp.float32)))) / scale
    assert err <= tol, f"{name} (seed {seed}): max error {err:.3g} of max|ref| {scale:.3g} > {tol}"


class _RmsNormBwdTest:
    INTERPRET = False
    SHAPES = ((65536, 768), (4096, 768), (1000, 1024))  # simple's micro-batch; N not a power of two
    BLOCK_ROWS = (16, 32)

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
    @pytest.mark.parametrize(("gain", "column_sum"), [(True, False), (False, False), (True, True)])
    def test_matches_reference(self, dtype, gain, column_sum):
        for (n, d), block_rows in zip(self.SHAPES, self.BLOCK_ROWS * len(self.SHAPES)):
            seed = fresh_seed()
            x, g, r, rstd, gain_D = _inputs(seed, n, d, dtype, gain)
            out, dgain, total = rms_norm_bwd(
                x, g, r, rstd, gain_D, column_sum=column_sum, block_rows=block_rows, interpret=self.INTERPRET
            )
            want, want_dgain, want_total = reference(x, g, r, rstd, gain_D, column_sum)
            assert out.dtype == dtype
            _assert_close(f"r + dx {n}x{d}", out, want, TOL[dtype], seed)
            if gain:
                assert dgain.dtype == gain_D.dtype
                _assert_close(f"dgain {n}x{d}", dgain, want_dgain, 1e-5, seed)
            else:
                assert dgain is None
            if column_sum:  # the sum of the kernel's own (rounded) output, in float32
                assert total.dtype == jnp.float32
                _assert_close(
                    f"column sum {n}x{d}", total, jnp.sum(out.astype(jnp.float32), axis=0), 1e-5, seed
                )
                _assert_close(f"column sum vs reference {n}x{d}", total, want_total, TOL[dtype], seed)
            else:
                assert total is None

    def test_reference_is_autodiff_of_the_norm(self):
        """The closed form equals jax.vjp of `x + 0, x·rstd·gain` in float32: the kernel's target is right."""
        seed = fresh_seed()
        n, d = self.SHAPES[-1]
        x, g, r, rstd, gain_D = _inputs(seed, n, d, jnp.float32, True)

        def stream_and_norm(x, gain):
            y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=1, keepdims=True) + EPS) * gain[None]
            return x, y

        _, vjp = jax.vjp(stream_and_norm, x, gain_D)
        dx, dgain = vjp((r, g))
        want, want_dgain, _ = reference(x, g, r, rstd, gain_D)
        _assert_close("r + dx", want, dx, 1e-5, seed)
        _assert_close("dgain", want_dgain, dgain, 1e-5, seed)


@pytest.mark.gpu
class TestRmsNormBwd(_RmsNormBwdTest):
    """Compiled Triton kernel."""


class TestRmsNormBwdInterpret(_RmsNormBwdTest):
    """The same kernel in the Pallas interpreter, small enough for CPU CI."""

    INTERPRET = True
    SHAPES = ((64, 768), (40, 48), (24, 96))  # three 256 slices; one slice of 16; N = 8·3
    BLOCK_ROWS = (16, 32)


def test_bad_shapes_are_refused():
    x, g, r, rstd, gain = _inputs(0, 32, 48, jnp.float32, True)
    with pytest.raises(ValueError, match="multiple of 16"):
        rms_norm_bwd(x[:, :40], g[:, :40], r[:, :40], rstd, None, interpret=True)
    with pytest.raises(ValueError, match="need x, g, r"):
        rms_norm_bwd(x, g[:16], r, rstd, gain, interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        rms_norm_bwd(x, g, r, rstd, gain, block_rows=24, interpret=True)
