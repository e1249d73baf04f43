"""Numerics every component shares: norms, linear maps, the compute dtype.

RMSNorm runs in float32 with float32's machine epsilon whatever the input
dtype, as torch's `F.rms_norm` does when no eps is given (recent PyTorch picks
the epsilon of the float32 computation, not bf16's 2⁻⁷); LayerNorm uses
GPT-2's 1e-5.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxrun.config import ModelConfig

Params = dict[str, Any]
F32_EPS = float(jnp.finfo(jnp.float32).eps)


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    return jnp.dtype(cfg.compute_dtype)


def lead(v: jax.Array, ndim: int) -> jax.Array:
    """Give a trailing-axis vector (gain, bias) explicit leading axes for broadcasting."""
    return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def rms_norm(x: jax.Array) -> jax.Array:
    """x / sqrt(mean(x²) + eps) over the last axis, in float32, back in x's dtype."""
    return _rms_norm(x, None)


def rms_norm_and_rstd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`rms_norm(x)` and its float32 `1/sqrt(mean(x²) + eps)`, shaped `[..., 1]`."""
    y, (_, _, rstd) = _rms_norm_fwd(x, None)
    return y, rstd


def norm(x: jax.Array, p: Params, cfg: ModelConfig) -> jax.Array:
    """The model's norm (LayerNorm or RMSNorm) with its optional gain and bias `p`."""
    if cfg.norm == "rmsnorm":
        return _rms_norm(x, p.get("gain"))
    xf = x.astype(jnp.float32)
    xf = xf - xf.mean(-1, keepdims=True)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + 1e-5)
    if "gain" in p:
        y = y * lead(p["gain"], y.ndim)
    if "bias" in p:
        y = y + lead(p["bias"], y.ndim)
    return y.astype(x.dtype)


# RMSNorm with a hand-written backward. Autodiff of the float32 forward keeps two float32 copies
# of the input ([N, D] and, for the QK norm, [N, H, K]) alive from the forward to the backward:
# written once and read once per norm, for every norm of every layer. This keeps only x (in its
# own dtype, bf16 in training) and the [N, 1] float32 rsqrt, and recomputes x·rsqrt in the
# backward's fusion. Same function, same forward; the backward is the usual closed form.
@jax.custom_vjp
def _rms_norm(x: jax.Array, gain: jax.Array | None) -> jax.Array:
    return _rms_norm_fwd(x, gain)[0]


def _rms_norm_fwd(x, gain):
    xf = x.astype(jnp.float32)
    rstd = jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + F32_EPS)
    y = xf * rstd
    if gain is not None:
        y = y * lead(gain, y.ndim)
    return y.astype(x.dtype), (x, gain, rstd)


def _rms_norm_bwd(res, g):
    x, gain, rstd = res
    x, rstd = jax.lax.optimization_barrier((x, rstd))  # or XLA shares the forward's float32 x·rsqrt
    xhat = x.astype(jnp.float32) * rstd
    gf = g.astype(jnp.float32)
    gy = gf if gain is None else gf * lead(gain, gf.ndim)  # dL/d(x·rsqrt)
    dx = rstd * (gy - xhat * jnp.mean(gy * xhat, -1, keepdims=True))
    if gain is None:
        return dx.astype(x.dtype), None
    lead_axes = tuple(range(gf.ndim - gain.ndim))
    return dx.astype(x.dtype), jnp.sum(gf * xhat, axis=lead_axes).astype(gain.dtype)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def stream_norm(
    x: jax.Array, p: Params, cfg: ModelConfig, fused_bwd=None, update: tuple | None = None
) -> tuple[jax.Array, jax.Array]:
    """`(x, norm(x))`: the residual stream and a sublayer's normed input.

    `update = (delta, bias)` is a previous sublayer's output not yet in the stream: the stream
    becomes `x + (delta + bias)` first, as `x + linear(...)` would make it. `fused_bwd`
    (`kernels.rms_norm_bwd`), if given, computes the norm's backward, adds the stream's gradient
    from above and sums the columns of the result for the bias, in one kernel; else autodiff
    does all of it in XLA.
    """
    if fused_bwd is None:
        x = x if update is None else add_update(x, update)
        return x, norm(x, p, cfg)
    delta, bias = (None, None) if update is None else update
    return _rms_norm_fork(x, delta, bias, p.get("gain"), fused_bwd, update is not None)


def add_update(x: jax.Array, update: tuple) -> jax.Array:
    """`x + (delta + bias)` for a sublayer's output `update = (delta, bias)` (bias may be None)."""
    return x + _biased(*update)


def _biased(delta: jax.Array, bias: jax.Array | None) -> jax.Array:
    return delta if bias is None else delta + lead(bias.astype(delta.dtype), delta.ndim)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _rms_norm_fork(x, delta, bias, gain, fused_bwd, has_update):
    return _rms_norm_fork_fwd(x, delta, bias, gain, fused_bwd, has_update)[0]


def _rms_norm_fork_fwd(x, delta, bias, gain, fused_bwd, has_update):
    x = x + _biased(delta, bias) if has_update else x
    y, (x, gain, rstd) = _rms_norm_fwd(x, gain)
    return (x, y), (x, gain, rstd, bias)


def _rms_norm_fork_bwd(fused_bwd, has_update, res, cotangents):
    x, gain, rstd, bias = res
    r, g = cotangents  # dL/d(stream), dL/d(norm(x))
    d = x.shape[-1]
    flat = (x.reshape(-1, d), g.reshape(-1, d), r.reshape(-1, d), rstd.reshape(-1), gain)
    dx, dgain, dsum = fused_bwd(*flat, column_sum=bias is not None)
    dx = dx.reshape(x.shape)
    dbias = None if bias is None else dsum.astype(bias.dtype)
    return dx, dx if has_update else None, dbias, dgain


_rms_norm_fork.defvjp(_rms_norm_fork_fwd, _rms_norm_fork_bwd)


def init_norm(cfg: ModelConfig, *lead_shape: int) -> Params:
    """A norm's params: a gain if the model has them, a bias for LayerNorm."""
    p = {}
    if cfg.norm_gains:
        p["gain"] = jnp.ones((*lead_shape, cfg.model_dim))
    if cfg.norm == "layernorm":
        p["bias"] = jnp.zeros((*lead_shape, cfg.model_dim))
    return p


def linear(x: jax.Array, p: Params, w: str, b: str) -> jax.Array:
    """x @ p[w] (+ p[b]), the weight cast to x's dtype."""
    y = x @ p[w].astype(x.dtype)
    return y + lead(p[b].astype(x.dtype), y.ndim) if b in p else y


def mul(x: jax.Array, s: jax.Array) -> jax.Array:
    """x · s rounded once to x's dtype, for an s (lambda, gate) that broadcasts over x.

    The product runs in float32 so that s's gradient is summed in float32, as torch accumulates:
    XLA on the CPU sums a bf16 reduction in bf16, which loses most of a lambda's gradient over
    B·T·D terms. The forward equals the plain product in x's dtype.
    """
    return (x.astype(jnp.float32) * s.astype(jnp.float32)).astype(x.dtype)


def scaled(lam: jax.Array, w: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """A float32 scalar times a weight, rounded once to `dtype` (torch's 0-dim × bf16 tensor)."""
    return (lam.astype(jnp.float32) * w.astype(dtype).astype(jnp.float32)).astype(dtype)


class Initializer:
    """Hands out keys split from one init key, in the order the components ask for them.

    The order (attention, MLP, embeddings, head) is fixed: a recipe's init, and the
    golden losses of the tests, depend on which key each draw gets.
    """

    def __init__(self, key: jax.Array, count: int = 16):
        self._keys = iter(jax.random.split(key, count))

    def normal(self, shape: tuple[int, ...], std: float) -> jax.Array:
        return std * jax.random.normal(next(self._keys), shape, jnp.float32)

    def uniform(self, shape: tuple[int, ...], bound: float) -> jax.Array:
        return jax.random.uniform(next(self._keys), shape, jnp.float32, -bound, bound)
