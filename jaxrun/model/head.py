"""The output side: final norm, head matmul (optionally FP8), softcap, and the token losses.

Owns `model.head` (HeadConfig, FP8HeadConfig) and the params `lm_head/*` and
`final_norm/*`. With `tie="always"` there is no `lm_head`: the token
embedding is the head. The multi-token loss (record #77) weights the
cross-entropy of position t against targets t, t+1, …; weights come from the
schedule, terms past the end of a row are dropped.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxrun.config import FP8HeadConfig, ModelConfig
from jaxrun.model import kernels
from jaxrun.model.attention import Mode
from jaxrun.model.layers import Initializer, Params, init_norm, linear
from jaxrun.param_table import OptimRow

IGNORE_INDEX = -1  # targets below zero (padding) carry no loss
EVAL_CHUNK = 16_384  # eval scores this many tokens at a time: [N, V] logits never exist whole

OPTIM_ROWS = (
    OptimRow(r"lm_head/w", "head", wd_mul=150.0, betas=(0.5, 0.95)),
    OptimRow(r"lm_head/b", "scalar"),
    OptimRow(r"final_norm/(gain|bias)", "scalar"),
)


def init(cfg: ModelConfig, rng: Initializer) -> Params:
    D, V = cfg.model_dim, cfg.vocab_size
    params: Params = {}
    if norm := init_norm(cfg):
        params["final_norm"] = norm
    if cfg.head.tie != "always":
        if cfg.init == "record":
            w = rng.normal((D, V), 0.005)
        elif cfg.init == "speedrun":
            w = jnp.zeros((D, V))
        else:
            w = rng.normal((D, V), 0.02)
        params["lm_head"] = {"w": w}
        if cfg.linear_biases:
            params["lm_head"]["b"] = jnp.zeros((V,))
    return params


def head_weight(params: Params, cfg: ModelConfig) -> jax.Array:
    """[D, V]: the head's weight (the token embedding, transposed, when always tied)."""
    return params["embed"]["tokens"].T if cfg.head.tie == "always" else params["lm_head"]["w"]


def _softcap(z: jax.Array, cfg: ModelConfig) -> jax.Array:
    c = cfg.head.softcap_value
    if cfg.head.softcap == "isru":
        return c * z * jax.lax.rsqrt(z * z + c * c)
    if cfg.head.softcap == "tanh":
        return c * jnp.tanh(z / c)
    if cfg.head.softcap == "sigmoid":  # record #77: 23·σ((z + 5)/7.5), in (0, 23)
        return c * jax.nn.sigmoid((z + 5) / 7.5)
    return z


def logits(params: Params, h_BTD: jax.Array, cfg: ModelConfig, mode: Mode = Mode()) -> jax.Array:
    """Softcapped float32 logits [B, T, V] from final hidden states."""
    fp8 = cfg.head.fp8 if mode.training else None
    if fp8 is not None:
        B, T, D = h_BTD.shape
        z = fp8_matmul(h_BTD.reshape(B * T, D), head_weight(params, cfg), fp8).reshape(B, T, -1)
        return _softcap(z, cfg)
    if cfg.head.tie == "always":
        z = h_BTD @ head_weight(params, cfg).astype(h_BTD.dtype)
    else:
        z = linear(h_BTD, params["lm_head"], "w", "b")
    if cfg.head.softcap == "sigmoid":  # record #77 caps its eval logits in bf16, then upcasts
        return _softcap(z, cfg).astype(jnp.float32)
    return _softcap(z.astype(jnp.float32), cfg)


def token_losses(
    params: Params,
    h_BTD: jax.Array,
    targets_BT: jax.Array,
    cfg: ModelConfig,
    mode: Mode = Mode(),
    multi_token_weights: jax.Array | None = None,
) -> jax.Array:
    """Cross-entropy per position [B, T] in float32; zero where targets < 0.

    With `multi_token_weights` [n] (and training), position t scores Σ_k w_k·CE(z_t, target_{t+k})
    over the k with t + k inside the row.
    """
    if mode.training and (fused := kernels.fp8_head_loss(cfg)) is not None:  # record #77's, fused
        B, T, D = h_BTD.shape
        weights = multi_token_weights if cfg.head.multi_token else None
        losses_N = fused(
            h_BTD.reshape(B * T, D),
            head_weight(params, cfg),
            targets_BT.reshape(-1),
            jnp.ones((1,), jnp.float32) if weights is None else weights,
            row_len=T,
            scales=cfg.head.fp8,
            cap_value=cfg.head.softcap_value,
        )
        return losses_N.reshape(B, T)
    if (fused := kernels.fused_loss(cfg)) is not None:
        B, T, D = h_BTD.shape
        w_DV = head_weight(params, cfg)
        b_V = params.get("lm_head", {}).get("b")
        losses_N = fused(
            h_BTD.reshape(B * T, D),
            w_DV,
            targets_BT.reshape(-1),
            b_V,
            cap=cfg.head.softcap,
            cap_value=cfg.head.softcap_value,
        )
        return losses_N.reshape(B, T)
    B, T, D = h_BTD.shape
    if not mode.training and B * T > EVAL_CHUNK and (B * T) % EVAL_CHUNK == 0:  # long val rows, in chunks

        def chunk(args):
            h_CD, t_C = args
            return token_losses(params, h_CD[None], t_C[None], cfg, mode)[0]

        chunks = (h_BTD.reshape(-1, EVAL_CHUNK, D), targets_BT.reshape(-1, EVAL_CHUNK))
        return jax.lax.map(chunk, chunks).reshape(B, T)
    z_BTV = logits(params, h_BTD, cfg, mode)
    logz_BT = jax.nn.logsumexp(z_BTV, axis=-1)
    weights = multi_token_weights if (mode.training and cfg.head.multi_token) else None
    if weights is None:
        return _ce(z_BTV, logz_BT, targets_BT)
    total = jnp.zeros(targets_BT.shape, jnp.float32)
    for k in range(weights.shape[0]):  # position t against target t + k; past the row's end: no term
        ahead_BT = jnp.pad(targets_BT[:, k:], ((0, 0), (0, k)), constant_values=IGNORE_INDEX)
        total = total + weights[k] * _ce(z_BTV, logz_BT, ahead_BT)
    return total


def _ce(z_BTV, logz_BT, targets_BT) -> jax.Array:
    target_logit_BT = jnp.take_along_axis(z_BTV, jnp.maximum(targets_BT, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(targets_BT >= 0, logz_BT - target_logit_BT, 0.0)


# ---- the FP8 head matmul (record #77) ----


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def fp8_matmul(x_ND: jax.Array, w_DV: jax.Array, scales: FP8HeadConfig) -> jax.Array:
    """x @ w through e4m3 copies of both at static scales; the result rounded to bf16, as float32.

    The backward quantizes the incoming gradient to e5m2 (divided by its own static scale) and
    forms both products from the FP8 operands: torch._scaled_mm as record #77 runs it.
    """
    return _fp8_forward(x_ND, w_DV, scales)[0]


def _quantize(x: jax.Array, scale: float, dtype) -> jax.Array:
    return (x / scale).astype(dtype)


# How the FP8 GEMMs accumulate. On a GPU, XLA runs an FP8 dot at DEFAULT precision as a cuBLASLt GEMM
# in fast-accumulation mode (the tensor cores' partial sums are not promoted to float32 as they go), at
# HIGHEST with the promotion. Record #77 runs its forward with `use_fast_accum=True` and both backward
# GEMMs with False. The weight gradient sums over all tokens of a rank (16K-49K), and Adam's first update
# moves each head entry by ±lr by its gradient's sign, so imprecise sums there change the update. The
# CPU computes these dots exactly at either precision.
FORWARD_PRECISION = jax.lax.Precision.DEFAULT
BACKWARD_PRECISION = jax.lax.Precision.HIGHEST


def _dot(a, b, contract: tuple[int, int], precision: jax.lax.Precision) -> jax.Array:
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def fp8_input(x_ND: jax.Array, s: FP8HeadConfig) -> jax.Array:
    """The head's input as e4m3 at its static scale."""
    return _quantize(x_ND, s.x_scale, jnp.float8_e4m3fn)


def fp8_operands(x_ND: jax.Array, w_DV: jax.Array, s: FP8HeadConfig) -> tuple[jax.Array, jax.Array]:
    """e4m3 copies of the head's input and weight at their static scales (w cast to x's dtype first)."""
    return fp8_input(x_ND, s), _quantize(w_DV.astype(x_ND.dtype), s.w_scale, jnp.float8_e4m3fn)


def fp8_logits(x8_ND: jax.Array, w8_DV: jax.Array, s: FP8HeadConfig) -> jax.Array:
    """The e4m3 GEMM (fast accumulation, as the record's forward), rescaled and rounded to bf16 [N, V]."""
    return fp8_logits_unrounded(x8_ND, w8_DV, s).astype(jnp.bfloat16)


def fp8_logits_unrounded(x8_ND: jax.Array, w8_DV: jax.Array, s: FP8HeadConfig) -> jax.Array:
    """`fp8_logits` before its bf16 rounding: the GEMM's float32 result, rescaled.

    On a GPU the GEMM writes float32 either way (cuBLASLt writes bf16 only from a dot whose result
    is bf16, and XLA does not fold the rescale and rounding into it). A reader that rounds as it
    reads spares the pass that would write the bf16 copy.
    """
    return _dot(x8_ND, w8_DV, (1, 0), FORWARD_PRECISION) * (s.x_scale * s.w_scale)


def quantize_grad(g_NV: jax.Array, s: FP8HeadConfig) -> jax.Array:
    """The logits' gradient as e5m2, divided by its static scale."""
    return _quantize(g_NV, s.grad_scale, jnp.float8_e5m2)


def fp8_input_grad(g8_NV: jax.Array, w8_DV: jax.Array, s: FP8HeadConfig) -> jax.Array:
    """dL/dx [N, D] in float32 (not yet rounded) from the e5m2 logit gradient, float32-accumulated."""
    return _dot(g8_NV, w8_DV, (1, 1), BACKWARD_PRECISION) * (s.grad_scale * s.w_scale)


def fp8_weight_grad(x8_ND: jax.Array, g8_NV: jax.Array, s: FP8HeadConfig) -> jax.Array:
    """dL/dw [D, V] in float32 from e4m3 inputs and the e5m2 logit gradient, float32-accumulated."""
    return _dot(x8_ND, g8_NV, (0, 0), BACKWARD_PRECISION) * (s.x_scale * s.grad_scale)


def _fp8_forward(x_ND, w_DV, s: FP8HeadConfig):
    x8, w8 = fp8_operands(x_ND, w_DV, s)
    out = fp8_logits(x8, w8, s).astype(jnp.float32)
    dtypes = (jnp.zeros((0,), x_ND.dtype), jnp.zeros((0,), w_DV.dtype))  # empty arrays carry the dtypes
    return out, (x8, w8, dtypes)


def _fp8_backward(s: FP8HeadConfig, res, g_NV):
    x8, w8, (x_like, w_like) = res
    g8 = quantize_grad(g_NV, s)
    grad_x = fp8_input_grad(g8, w8, s).astype(jnp.bfloat16).astype(x_like.dtype)
    return grad_x, fp8_weight_grad(x8, g8, s).astype(w_like.dtype)


fp8_matmul.defvjp(_fp8_forward, _fp8_backward)
