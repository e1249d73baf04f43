"""The head matmul, softcap and cross-entropy as one custom VJP that XLA lowers near its GEMM floor.

Autodiff of the plain path (`head.logits` then a logsumexp) leaves XLA a
chain of float32 `[N, V]` intermediates: the upcast logits, the capped
logits, the max-shifted exponentials, the softmax, the one-hot scatter and
the gradient before it is rounded to bf16. Each is a pass over
N·V·4 bytes (13 GB for a 64-sequence micro-batch), and the profile of
`simple` spent about 170 ms a step on them. Here the only `[N, V]` tensors
are bf16:

- forward: the head GEMM writes bf16 logits `h·W` without the bias; they
  are what the backward keeps. One reduction fusion reads them once, adds
  the bias in registers and sums the log-sum-exp. Saving the biased logits
  instead would make that fusion write a second [N, V] bf16 tensor. Both
  caps are bounded by `c`, so `c` is a fixed shift and no max pass is
  needed (exp(s - c) lies in (e^-2c, 1]). `logit_lse` swaps that fusion
  for a Pallas pass (faster on Hopper, docs/PERF.md).
- backward: one elementwise fusion reads `h·W`, adds the bias again and
  writes bf16 `dL/dz` (softmax minus one-hot, times the cap's derivative,
  times the incoming gradient); the bias gradient is a column sum that reads
  that bf16 `dL/dz` back; then the two GEMMs `dh = dz·Wᵀ` and `dW = hᵀ·dz`.
  `logit_grad` runs the fusion and the column sum as one Pallas pass.

On an H100, keeping `h·W` rather than the biased logits, and the barrier
that makes the backward write `dL/dz` in bf16 only, took `simple`'s step
from 1081 to 1034 ms of kernel time (docs/PERF.md, 2026-12-06). Taking the
bias's gradient from the `dW` GEMM instead (`h` with a column of ones) was
slower, 1138 ms a step: XLA then runs that GEMM as a Triton fusion.

The numerics are the plain path's: bf16 logits with the bias added in bf16,
the cap and softmax in float32, the logit gradient rounded to bf16 before
the GEMMs (as PyTorch's bf16 head does). `dW` leaves its GEMM in float32
rather than being rounded through bf16 first.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

CAPS = ("isru", "tanh")
_F32 = jnp.float32


def _cap(z: jax.Array, cap: str, c: float) -> tuple[jax.Array, jax.Array]:
    """Capped logits s and ds/dz, in float32, for float32 raw logits z."""
    if cap == "isru":  # s = c·z/√(z²+c²), ds/dz = c³/(z²+c²)^(3/2)
        r = jax.lax.rsqrt(z * z + c * c)
        return c * z * r, (c * r) ** 3
    t = jnp.tanh(z / c)  # s = c·tanh(z/c), ds/dz = 1 - tanh²
    return c * t, 1.0 - t * t


def _add_bias(zraw_NV, b_V):
    """The logits `h·W + b` from `h·W`, the bias added in the logits' dtype."""
    return zraw_NV if b_V is None else zraw_NV + b_V.astype(zraw_NV.dtype)[None]


def _forward(h_ND, w_DV, b_V, targets_N, cap, c, logit_lse):
    zraw_NV = h_ND @ w_DV.astype(h_ND.dtype)
    z_NV = _add_bias(zraw_NV, b_V)
    if logit_lse is None:
        s_NV, _ = _cap(z_NV.astype(_F32), cap, c)
        lse_N = c + jnp.log(jnp.sum(jnp.exp(s_NV - c), axis=-1))
    else:  # the same sum as one kernel over zraw
        lse_N = logit_lse(zraw_NV, b_V, cap=cap, cap_value=c)
    z_target_N = jnp.take_along_axis(z_NV, jnp.maximum(targets_N, 0)[:, None], axis=-1)[:, 0]
    s_target_N, _ = _cap(z_target_N.astype(_F32), cap, c)
    return jnp.where(targets_N >= 0, lse_N - s_target_N, 0.0), (zraw_NV, lse_N)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _softcap_ce(h_ND, w_DV, b_V, targets_N, cap, c, logit_lse, logit_grad):
    return _forward(h_ND, w_DV, b_V, targets_N, cap, c, logit_lse)[0]


def _softcap_ce_fwd(h_ND, w_DV, b_V, targets_N, cap, c, logit_lse, logit_grad):
    losses_N, (zraw_NV, lse_N) = _forward(h_ND, w_DV, b_V, targets_N, cap, c, logit_lse)
    return losses_N, (h_ND, w_DV, b_V, targets_N, zraw_NV, lse_N)


def _softcap_ce_bwd(cap, c, logit_lse, logit_grad, res, g_N):
    h_ND, w_DV, b_V, targets_N, zraw_NV, lse_N = res
    # Without the barrier XLA merges this recomputed cap with the forward's (one jit holds both)
    # and keeps the float32 capped logits alive from the forward to here.
    zraw_NV, lse_N = jax.lax.optimization_barrier((zraw_NV, lse_N))
    g_N = jnp.where(targets_N >= 0, g_N.astype(_F32), 0.0)
    if logit_grad is not None:  # one kernel: bf16 dL/dz and the bias's column sum in the same pass
        dz_bf_NV, db_V = logit_grad(zraw_NV, b_V, targets_N, lse_N, g_N, cap=cap, cap_value=c)
    else:
        z_NV = _add_bias(zraw_NV, b_V)
        s_NV, ds_dz_NV = _cap(z_NV.astype(_F32), cap, c)
        p_NV = jnp.exp(s_NV - lse_N[:, None])
        is_target_NV = jax.lax.broadcasted_iota(jnp.int32, z_NV.shape, 1) == targets_N[:, None]
        dz_NV = (jnp.where(is_target_NV, p_NV - 1.0, p_NV) * ds_dz_NV) * g_N[:, None]
        # The barrier makes this one elementwise fusion that writes bf16 dL/dz: left to itself XLA
        # writes it in float32 (13 GB a 64-sequence micro-batch) and reads that back for the bias.
        dz_bf_NV = jax.lax.optimization_barrier(dz_NV.astype(h_ND.dtype))
        db_V = None if b_V is None else jnp.sum(dz_bf_NV.astype(_F32), axis=0)
    dh_ND = dz_bf_NV @ w_DV.astype(h_ND.dtype).T
    dw_DV = jax.lax.dot_general(h_ND, dz_bf_NV, (((0,), (0,)), ((), ())), preferred_element_type=_F32)
    db_V = None if b_V is None else db_V.astype(b_V.dtype)
    return dh_ND, dw_DV.astype(w_DV.dtype), db_V, None


_softcap_ce.defvjp(_softcap_ce_fwd, _softcap_ce_bwd)


def softcap_ce(
    h_ND: jax.Array,
    w_DV: jax.Array,
    targets_N: jax.Array,
    b_V: jax.Array | None = None,
    *,
    cap: str = "isru",
    cap_value: float = 15.0,
    logit_lse=None,
    logit_grad=None,
) -> jax.Array:
    """Per-token cross-entropy [N] (float32) of `cap(h @ w + b)` against `targets`; 0 where targets < 0.

    Args:
      h_ND: final hidden states in the compute dtype (bf16 in training).
      w_DV: head weight; cast to h's dtype for the GEMMs.
      targets_N: int token ids; negative entries carry no loss and no gradient.
      b_V: optional head bias, added in h's dtype.
      cap: "isru" (c·z/√(z²+c²), train_gpt_simple) or "tanh" (c·tanh(z/c)).
      cap_value: c.
      logit_lse: `fn(zraw, b, *, cap, cap_value) -> lse` for the forward's pass over the logits
        (`kernels.logit_lse`), or None for XLA's reduction.
      logit_grad: `fn(zraw, b, targets, lse, g, *, cap, cap_value) -> (bf16 dz, db)` for the
        backward's pass over the logits (`kernels.logit_grad`), or None for XLA's two passes.

    Differentiable in `h`, `w` and `b`.
    """
    if cap not in CAPS:
        raise ValueError(f"cap must be one of {CAPS}, got {cap!r}")
    targets_N = targets_N.astype(jnp.int32)
    return _softcap_ce(h_ND, w_DV, b_V, targets_N, cap, float(cap_value), logit_lse, logit_grad)


def softcap_ce_reference(h_ND, w_DV, targets_N, b_V=None, *, cap="isru", cap_value=15.0) -> jax.Array:
    """Plain-jnp autodiff of the same function: the path `model.kernels.loss="xla"` runs."""
    z_NV = _add_bias(h_ND @ w_DV.astype(h_ND.dtype), b_V).astype(_F32)
    s_NV, _ = _cap(z_NV, cap, float(cap_value))
    s_target_N = jnp.take_along_axis(s_NV, jnp.maximum(targets_N, 0)[:, None], axis=-1)[:, 0]
    return jnp.where(targets_N >= 0, jax.nn.logsumexp(s_NV, axis=-1) - s_target_N, 0.0)
