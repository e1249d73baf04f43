"""Record #77's training loss as one custom VJP: FP8 head GEMM, sigmoid softcap, multi-token CE.

The plain path (`head.logits` under autodiff, then a logsumexp and one CE per
multi-token term) leaves several float32 `[N, V]` passes between the head GEMM
and its backward: the upcast logits, the capped logits, the softmax, one
scatter per term and the logit gradient before its e5m2 rounding. Here the
forward runs the e4m3 GEMM to bf16 logits and then, per row block, one
reduction (the log-sum-exp) and one elementwise pass that writes the loss's
gradient with respect to the raw logits, already divided by the FP8 gradient
scale and rounded to e5m2. Only that gradient (1 byte a logit) is kept for the
backward, which runs the record's two FP8 GEMMs on it.

The gradient is formed for a unit cotangent per token, which is what training
feeds (it differentiates the summed token loss). Another cotangent `g_t`
scales row t: exactly for dL/dh (after the GEMM), and for dL/dW by quantizing
`h_t·g_t/max|g|` to e4m3 instead of `h_t` (the result is then `max|g|` times
the GEMM). With `g = 1` both are bit for bit the plain path's operands.

Numerics are the plain path's: bf16 logits, the cap and softmax in float32,
the log-sum-exp shifted by the cap's bound `c` instead of the row max (the
capped logits lie in (0, c), so exp(z - c) cannot overflow), the logit
gradient divided by the gradient scale and rounded to e5m2.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxrun.config import FP8HeadConfig
from jaxrun.model import head

_F32 = jnp.float32
IGNORE_INDEX = -1

# (logits_NV, targets_NK, weights_K, *, cap_value, grad_scale) -> (losses_N, ce_NK, g8_NV): logits_NV
# is the record's bf16 logits, or their float32 values before the rounding, which the pass then does
# as it reads them.
CEFn = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]
# (x8_ND, w8_DV, scales) -> logits_NV: the forward FP8 GEMM, rescaled; float32 before the bf16
# rounding (`head.fp8_logits_unrounded`) or bf16 (a kernel that rounds as it stores).
LogitsFn = Callable[[jax.Array, jax.Array, FP8HeadConfig], jax.Array]


def shifted_targets(targets_N: jax.Array, row_len: int, n_terms: int) -> jax.Array:
    """[N, K]: column k holds target t + k of the same row of `row_len` tokens, -1 past its end."""
    targets_BT = targets_N.reshape(-1, row_len).astype(jnp.int32)
    columns = []
    for k in range(n_terms):
        ahead = targets_BT[:, min(k, row_len) :]
        columns.append(jnp.pad(ahead, ((0, 0), (0, row_len - ahead.shape[1])), constant_values=IGNORE_INDEX))
    return jnp.stack(columns, axis=-1).reshape(-1, n_terms)


def sigmoid_cap(l: jax.Array, c: float) -> jax.Array:
    """Record #77's cap c·σ((l + 5)/7.5) of float32 raw logits, written as `head._softcap` does."""
    return c * jax.nn.sigmoid((l + 5) / 7.5)


def weighted_sum(ce_NK: jax.Array, weights_K: jax.Array) -> jax.Array:
    """Σ_k w_k·ce_k, accumulated term by term from zero as the plain path does."""
    total_N = jnp.zeros(ce_NK.shape[:1], _F32)
    for k in range(ce_NK.shape[1]):
        total_N = total_N + weights_K[k] * ce_NK[:, k]
    return total_N


def as_bf16_logits(l: jax.Array) -> jax.Array:
    """Logits rounded to bf16 (a no-op on bf16 ones), as float32. A bf16 round trip would not do:
    XLA may drop a float32 → bf16 → float32 pair (`xla_allow_excess_precision`, on by default)."""
    return jax.lax.reduce_precision(l.astype(_F32), exponent_bits=8, mantissa_bits=7)


def term_losses(logits_NV, lse_N, targets_NK, c: float) -> jax.Array:
    """[N, K] CE of each term from the log-sum-exp and the gathered target logits; 0 where ignored."""
    safe_NK = jnp.maximum(targets_NK, 0)
    l_target_NK = as_bf16_logits(jnp.take_along_axis(logits_NV, safe_NK, axis=-1))
    return jnp.where(targets_NK >= 0, lse_N[:, None] - sigmoid_cap(l_target_NK, c), 0.0)


def mtp_ce_xla(logits_NV, targets_NK, weights_K, *, cap_value: float, grad_scale: float):
    """Losses [N], term losses [N, K] and the e5m2 gradient [N, V] (unit cotangent, divided by
    `grad_scale`) of bf16 logits, in two XLA fusions: a reduction, then one elementwise pass. Each
    rounds float32 logits to bf16 as it reads them: no bf16 copy is written."""
    c = cap_value
    lse_N = c + jnp.log(jnp.sum(jnp.exp(sigmoid_cap(as_bf16_logits(logits_NV), c) - c), axis=-1))
    ce_NK = term_losses(logits_NV, lse_N, targets_NK, c)
    # A second name for the logits: without it XLA shares the float32 cap between the reduction and
    # the gradient pass and writes it to memory once, [N, V] float32.
    logits_NV, lse_N = jax.lax.optimization_barrier((logits_NV, lse_N))
    w_NK = jnp.where(targets_NK >= 0, weights_K[None, :], 0.0)
    total_w_N = weighted_sum(jnp.where(targets_NK >= 0, 1.0, 0.0), weights_K)
    cols_NV = jax.lax.broadcasted_iota(jnp.int32, logits_NV.shape, 1)
    hit_NV = jnp.zeros(logits_NV.shape, _F32)
    for k in range(targets_NK.shape[1]):
        hit_NV = hit_NV + jnp.where(cols_NV == targets_NK[:, k, None], w_NK[:, k, None], 0.0)
    sig_NV = jax.nn.sigmoid((as_bf16_logits(logits_NV) + 5) / 7.5)
    p_NV = jnp.exp(c * sig_NV - lse_N[:, None])
    dz_NV = total_w_N[:, None] * p_NV - hit_NV  # d(Σ_k w_k·CE_k)/dz
    dl_NV = ((dz_NV * c) * (sig_NV * (1 - sig_NV))) / 7.5  # through the cap, as autodiff orders it
    return weighted_sum(ce_NK, weights_K), ce_NK, (dl_NV / grad_scale).astype(jnp.float8_e5m2)


def mtp_ce_reference(logits_NV, targets_NK, weights_K, *, cap_value: float, grad_scale: float):
    """Plain jnp, the gradient by autodiff: `head.token_losses`' math over given bf16 logits."""

    def losses(l_NV):
        z_NV = sigmoid_cap(l_NV, cap_value)
        logz_N = jax.nn.logsumexp(z_NV, axis=-1)
        z_target_NK = jnp.take_along_axis(z_NV, jnp.maximum(targets_NK, 0), axis=-1)
        ce_NK = jnp.where(targets_NK >= 0, logz_N[:, None] - z_target_NK, 0.0)
        return weighted_sum(ce_NK, weights_K), ce_NK

    (losses_N, ce_NK), vjp = jax.vjp(losses, as_bf16_logits(logits_NV))
    (dl_NV,) = vjp((jnp.ones_like(losses_N), jnp.zeros_like(ce_NK)))
    return losses_N, ce_NK, (dl_NV / grad_scale).astype(jnp.float8_e5m2)


@dataclasses.dataclass(frozen=True)
class _Static:
    scales: FP8HeadConfig
    cap_value: float
    ce: CEFn
    logits: LogitsFn
    row_block: int | None
    varying: tuple[frozenset, ...]  # the shard_map axes h, w and the weights vary over


def _varying(x: jax.Array) -> frozenset:
    return jax.typeof(x).manual_axis_type.varying


def _sum_to(ct: jax.Array, varying: frozenset) -> jax.Array:
    """A cotangent summed over the shard_map axes its input is invariant over (the transpose of
    the broadcast that made it varying): replicated multi-token weights inside the train step."""
    extra = tuple(sorted(_varying(ct) - varying))
    return jax.lax.psum(ct, extra) if extra else ct


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fp8_mtp_ce(h_ND, w_DV, targets_NK, weights_K, st: _Static):
    return _forward(h_ND, w_DV, targets_NK, weights_K, st)[0]


def _forward(h_ND, w_DV, targets_NK, weights_K, st: _Static):
    x8_ND, w8_DV = head.fp8_operands(h_ND, w_DV, st.scales)
    ce = functools.partial(st.ce, cap_value=st.cap_value, grad_scale=st.scales.grad_scale)

    def rows(x8_RD, targets_RK):
        return ce(st.logits(x8_RD, w8_DV, st.scales), targets_RK, weights_K)

    n = h_ND.shape[0]
    if st.row_block is None or st.row_block >= n:
        losses_N, ce_NK, g8_NV = rows(x8_ND, targets_NK)
    else:  # a block of rows at a time: its bf16 logits are the only [rows, V] temporary
        blocks = (
            x8_ND.reshape(-1, st.row_block, x8_ND.shape[1]),
            targets_NK.reshape(-1, st.row_block, targets_NK.shape[1]),
        )
        losses_N, ce_NK, g8_NV = (a.reshape(n, *a.shape[2:]) for a in jax.lax.map(lambda b: rows(*b), blocks))
    dtypes = (jnp.zeros((0,), h_ND.dtype), jnp.zeros((0,), w_DV.dtype))  # empty arrays carry the dtypes
    return losses_N, (h_ND, w8_DV, g8_NV, ce_NK, dtypes)


def _backward(st: _Static, res, g_N):
    h_ND, w8_DV, g8_NV, ce_NK, (h_like, w_like) = res
    s = st.scales
    g_N = g_N.astype(_F32)
    g_max = jnp.max(jnp.abs(g_N))
    g_max = jnp.where(g_max > 0, g_max, 1.0)
    dh_ND = (head.fp8_input_grad(g8_NV, w8_DV, s) * g_N[:, None]).astype(jnp.bfloat16).astype(h_like.dtype)
    # Row t of the e5m2 gradient stands for a unit cotangent: fold g_t into h_t before its e4m3 rounding.
    xg8_ND = head.fp8_input(h_ND * (g_N / g_max).astype(h_ND.dtype)[:, None], s)
    dw_DV = head.fp8_weight_grad(xg8_ND, g8_NV, s) * g_max
    dweights_K = jnp.sum(ce_NK * g_N[:, None], axis=0)
    grads = (dh_ND, dw_DV.astype(w_like.dtype), dweights_K)
    dh_ND, dw_DV, dweights_K = (_sum_to(ct, v) for ct, v in zip(grads, st.varying))
    return dh_ND, dw_DV, None, dweights_K


_fp8_mtp_ce.defvjp(_forward, _backward)


def fp8_mtp_loss(
    h_ND: jax.Array,
    w_DV: jax.Array,
    targets_N: jax.Array,
    weights_K: jax.Array,
    *,
    row_len: int,
    scales: FP8HeadConfig,
    cap_value: float = 23.0,
    ce: CEFn = mtp_ce_xla,
    logits: LogitsFn = head.fp8_logits_unrounded,
    row_block: int | None = None,
) -> jax.Array:
    """Per-token loss [N] (float32) of record #77's training head: Σ_k w_k·CE(z_t, target_{t+k}).

    Args:
      h_ND: final hidden states, N = rows·row_len tokens (bf16 in training).
      w_DV: head weight; cast to h's dtype, then to e4m3 at `scales.w_scale`.
      targets_N: int token ids, rows of `row_len` back to back; negative entries are ignored.
      weights_K: multi-token weights (traced); terms whose t + k leaves the row are dropped.
      row_len: tokens per row (T).
      scales: the static FP8 scales of x, w and the logit gradient.
      cap_value: c of the cap c·σ((l + 5)/7.5).
      ce: the fused loss-and-gradient pass over bf16 logits, `mtp_ce_xla` or a kernel with its signature.
      logits: the forward FP8 GEMM, `head.fp8_logits_unrounded` or a kernel with its signature.
      row_block: rows of tokens per GEMM + loss step (a `lax.map`); None: all at once.

    Differentiable in `h`, `w` and `weights`.
    """
    n = h_ND.shape[0]
    if row_block is not None and row_block < n and n % row_block:
        raise ValueError(f"row_block={row_block} must divide the {n} tokens")
    targets_NK = shifted_targets(targets_N, row_len, weights_K.shape[0])
    st = _Static(
        scales, float(cap_value), ce, logits, row_block, tuple(map(_varying, (h_ND, w_DV, weights_K)))
    )
    return _fp8_mtp_ce(h_ND, w_DV, targets_NK, weights_K.astype(_F32), st)


def fp8_mtp_loss_reference(h_ND, w_DV, targets_N, weights_K, *, row_len, scales, cap_value=23.0):
    """Autodiff of `head.fp8_matmul`, the cap and the per-term CE: what `model.kernels.loss="xla"` runs."""
    l_NV = head.fp8_matmul(h_ND, w_DV, scales)
    z_NV = sigmoid_cap(l_NV, cap_value)
    targets_NK = shifted_targets(targets_N, row_len, weights_K.shape[0])
    z_target_NK = jnp.take_along_axis(z_NV, jnp.maximum(targets_NK, 0), axis=-1)
    ce_NK = jnp.where(targets_NK >= 0, jax.nn.logsumexp(z_NV, axis=-1)[:, None] - z_target_NK, 0.0)
    return weighted_sum(ce_NK, weights_K)
