"""RMSNorm's hand-written backward against autodiff of the plain float32 formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrun.config import ModelConfig
from jaxrun.model.layers import F32_EPS, lead, norm, rms_norm

GRAD_TOL = {"float32": 1e-6, "bfloat16": 1e-3}  # max |Δ| over max |reference|; bf16: dx rounded once


def _plain(x, gain):
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + F32_EPS)
    return (y if gain is None else y * lead(gain, y.ndim)).astype(x.dtype)


def _inputs(seed, shape, dtype):
    k = jax.random.split(jax.random.key(seed), 3)
    x = (3.0 * jax.random.normal(k[0], shape)).astype(dtype)
    gain = 1.0 + 0.1 * jax.random.normal(k[1], shape[-1:])
    g = jax.random.normal(k[2], shape).astype(dtype)
    return x, gain, g


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("with_gain", [True, False], ids=["gain", "qk"])
def test_matches_autodiff_of_the_formula(dtype, with_gain):
    shape = (2, 24, 96) if with_gain else (2, 24, 3, 32)  # [B, T, D] or the QK norm's [B, T, H, K]
    x, gain, g = _inputs(11 + with_gain, shape, jnp.dtype(dtype))
    if with_gain:
        f = lambda x, w: norm(x, {"gain": w}, ModelConfig())  # noqa: E731
        y, vjp = jax.vjp(f, x, gain)
        y_ref, vjp_ref = jax.vjp(_plain, x, gain)
    else:
        y, vjp = jax.vjp(rms_norm, x)
        y_ref, vjp_ref = jax.vjp(lambda x: _plain(x, None), x)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    for a, e in zip(vjp(g), vjp_ref(g)):
        assert a.dtype == e.dtype and a.shape == e.shape
        a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
        assert np.abs(a - e).max() <= GRAD_TOL[dtype] * np.abs(e).max()


def test_stacked_gain_slice_gets_its_gradient():
    """A layer's gain is a row of a stacked [L, D] leaf; its gradient sums over every leading axis."""
    x, _, g = _inputs(3, (4, 8, 16), jnp.float32)
    gains = 1.0 + 0.1 * jax.random.normal(jax.random.key(4), (2, 16))
    grad = jax.grad(lambda w: jnp.sum(norm(x, {"gain": w[1]}, ModelConfig()) * g))(gains)
    grad_ref = jax.grad(lambda w: jnp.sum(_plain(x, w[1]) * g))(gains)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(grad[0]).max()) == 0.0


def test_backward_keeps_no_float32_copy_of_a_bf16_input():
    x, gain, _ = _inputs(5, (64, 96), jnp.bfloat16)
    _, vjp = jax.vjp(lambda x, w: norm(x, {"gain": w}, ModelConfig()), x, gain)
    _, vjp_ref = jax.vjp(_plain, x, gain)
    big = lambda f: sorted(str(r.dtype) for r in jax.tree.leaves(f) if r.shape == x.shape)  # noqa: E731
    assert "float32" in big(vjp_ref)
    assert big(vjp) == ["bfloat16"]
