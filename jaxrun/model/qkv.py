"""The attention's q, k, v projections, QK-norm and 'halves' RoPE as one custom VJP.

The forward is the plain path's, op for op: three GEMMs with their biases, RMSNorm (no gain) of q
and k per head, RoPE in float32. The backward gets `dq'`, `dk'`, `dv` from the attention and, in
one pass (`kernels.qkv_grad`), undoes the rotation and the norm and lays `[dq | dk | dv]` out as
one `[N, 3F]` array, summing its columns for the biases. Then one GEMM gives `dh = dqkv · W_qkvᵀ`
and one `dW_qkv = hᵀ · dqkv` (float32), split back into the three weights.

Autodiff of the plain path runs the same math as a reduction fusion for the norms' means, a
fusion each for `dq` and `dk`, three column reductions for the biases, three GEMMs for `dh` and
an elementwise fusion that adds them. On an H100 those passes took 66.3 ms of `simple`'s step and
the one pass takes 30.4, at the same GEMM time (docs/PERF.md, 2026-12-06). The roundings differ
only where the GEMMs' are now one: `dh` is accumulated in float32 over all three and rounded once, and `dW` leaves its
GEMM in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxrun.model.layers import rms_norm_and_rstd

_F32 = jnp.float32
NAMES = ("q", "k", "v")


def _forward(h_BTD, ws, bs, cos_TR, sin_TR, heads):
    B, T, _ = h_BTD.shape
    dtype = h_BTD.dtype
    outs = [h_BTD @ w.astype(dtype) for w in ws]
    outs = [y if b is None else y + b.astype(dtype)[None, None] for y, b in zip(outs, bs)]
    q, k, v = (y.reshape(B, T, heads, -1) for y in outs)
    (qn, rstd_q), (kn, rstd_k) = rms_norm_and_rstd(q), rms_norm_and_rstd(k)
    rotated = tuple(rotate_halves(x, cos_TR, sin_TR) for x in (qn, kn))
    return rotated + (v,), (q, k, rstd_q, rstd_k)


def rotate_halves(x_BTHK: jax.Array, cos_TR: jax.Array, sin_TR: jax.Array) -> jax.Array:
    """RoPE on (dim j, dim j + K/2) pairs, in float32, as train_gpt_simple.py does."""
    cos, sin = cos_TR[None, :, None, :], sin_TR[None, :, None, :]
    x1, x2 = jnp.split(x_BTHK.astype(_F32), 2, axis=-1)
    return jnp.concatenate([x1 * cos + x2 * sin, x2 * cos - x1 * sin], axis=-1).astype(x_BTHK.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _project(h_BTD, ws, bs, cos_TR, sin_TR, heads, grad):
    return _forward(h_BTD, ws, bs, cos_TR, sin_TR, heads)[0]


def _project_fwd(h_BTD, ws, bs, cos_TR, sin_TR, heads, grad):
    outs, (q, k, rstd_q, rstd_k) = _forward(h_BTD, ws, bs, cos_TR, sin_TR, heads)
    return outs, (h_BTD, ws, bs, cos_TR, sin_TR, q, k, rstd_q, rstd_k)


def _project_bwd(heads, grad, res, cotangents):
    h_BTD, ws, bs, cos_TR, sin_TR, q, k, rstd_q, rstd_k = res
    B, T, D = h_BTD.shape
    n, dtype = B * T, h_BTD.dtype
    flat = [c.reshape(n, -1).astype(dtype) for c in cotangents] + [x.reshape(n, -1) for x in (q, k)]
    rstd = [r.reshape(n, heads).T for r in (rstd_q, rstd_k)]
    column_sum = bs[0] is not None
    dqkv, sums = grad(*flat, *rstd, cos_TR, sin_TR, heads=heads, column_sum=column_sum)
    w_qkv = jnp.concatenate([w.astype(dtype) for w in ws], axis=1)
    dh = (dqkv @ w_qkv.T).reshape(B, T, D)
    h_ND = h_BTD.reshape(n, D)
    dw = jax.lax.dot_general(h_ND, dqkv, (((0,), (0,)), ((), ())), preferred_element_type=_F32)
    f = dw.shape[1] // 3
    dws = tuple(dw[:, i * f : (i + 1) * f].astype(w.dtype) for i, w in enumerate(ws))
    dbs = tuple(None if b is None else sums[i * f : (i + 1) * f].astype(b.dtype) for i, b in enumerate(bs))
    return dh, dws, dbs, jnp.zeros_like(cos_TR), jnp.zeros_like(sin_TR)


_project.defvjp(_project_fwd, _project_bwd)


def project(p: dict, h_BTD: jax.Array, cos_TR: jax.Array, sin_TR: jax.Array, heads: int, grad) -> tuple:
    """`(q', k', v)`, each `[B, T, heads, K]`: the projections of `h` with `p`'s `w_q/k/v` (and
    `b_q/k/v` if any), q and k RMS-normed and rotated. `grad` is the backward's pass over the
    attention's gradients (`kernels.qkv_grad(cfg)`)."""
    ws = tuple(p[f"w_{n}"] for n in NAMES)
    bs = tuple(p.get(f"b_{n}") for n in NAMES)
    if len({b is None for b in bs}) > 1:
        raise ValueError("qkv.project: the q, k and v projections need biases on all three or none")
    return _project(h_BTD, ws, bs, cos_TR, sin_TR, heads, grad)
