"""Kernel choice in one place: the config names an implementation, this maps it.

The model calls `attention(cfg)(q, k, v, ...)`, `mlp(cfg)(h, ...)` and
`fused_loss(cfg)(h, w, targets, ...)`; it never branches on the implementation itself (as
tokamax's ops take `implementation=`). Pallas kernels run compiled on a GPU
and in the interpreter elsewhere (CPU tests).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxrun.config import ModelConfig
from jaxrun.model import head_loss


def interpret() -> bool:
    return jax.default_backend() != "gpu"


def attention_xla(q_BTHK, k_BTHK, v_BTHK, *, scale, segment_ids_BT=None, window=None) -> jax.Array:
    """Plain-jnp attention: the T×T scores in float32, masked, then softmax.

    Causal; with `window`, query i sees keys i - window .. i; with segment ids,
    only keys of its own segment (document).
    """
    T = q_BTHK.shape[1]
    s_BHTT = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BTHK, preferred_element_type=jnp.float32) * scale
    qi, ki = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
    mask_TT = ki <= qi
    if window is not None:
        mask_TT &= ki >= qi - window
    mask = mask_TT[None, None]
    if segment_ids_BT is not None:
        mask = mask & (segment_ids_BT[:, None, :, None] == segment_ids_BT[:, None, None, :])
    s_BHTT = jnp.where(mask, s_BHTT, -jnp.inf)
    p_BHTT = jax.nn.softmax(s_BHTT, axis=-1).astype(v_BTHK.dtype)
    return jnp.einsum("bhts,bshk->bthk", p_BHTT, v_BTHK)


def _attention_cudnn(q_BTHK, k_BTHK, v_BTHK, *, scale, segment_ids_BT=None, window=None) -> jax.Array:
    if segment_ids_BT is not None:
        raise ValueError(
            "model.kernels.attention='cudnn' has no document mask; use 'xla', 'pallas' or 'mosaic'"
        )
    return jax.nn.dot_product_attention(
        q_BTHK,
        k_BTHK,
        v_BTHK,
        scale=scale,
        is_causal=True,  # always with a window: jax issue #39576
        local_window_size=None if window is None else (window, 0),
        implementation="cudnn",
    )


def _attention_pallas(
    q_BTHK, k_BTHK, v_BTHK, *, scale, segment_ids_BT=None, window=None, every_pass_mosaic=False
) -> jax.Array:
    """The Pallas kernel; with `every_pass_mosaic` ("mosaic") every pass is a Mosaic GPU kernel,
    the forward with documents and the backward too."""
    from pallas_kernels.attention import BlockSizes, flash_attention

    tiles = BlockSizes.get_default()
    if every_pass_mosaic:
        _check_hopper("attention")
        tiles = dataclasses.replace(tiles, mosaic_documents=True, mosaic_backward=True)
    return flash_attention(
        q_BTHK,
        k_BTHK,
        v_BTHK,
        segment_ids=segment_ids_BT,
        window=window,
        scale=scale,
        block_sizes=tiles,
        interpret=interpret(),
    )


def _auto_attention(documents: bool) -> str:
    """`auto`: cuDNN on a GPU; where documents are masked, which cuDNN cannot, the Pallas kernel,
    every pass in Mosaic GPU on Hopper (faster there: docs/PERF.md); XLA elsewhere."""
    if jax.default_backend() != "gpu":
        return "xla"
    if not documents:
        return "cudnn"
    return "mosaic" if on_hopper() else "pallas"


def _attention_auto(q_BTHK, k_BTHK, v_BTHK, *, scale, segment_ids_BT=None, window=None) -> jax.Array:
    """The fastest correct choice for this platform and mask, decided when the step is traced."""
    fn = _ATTENTION[_auto_attention(segment_ids_BT is not None)]
    return fn(q_BTHK, k_BTHK, v_BTHK, scale=scale, segment_ids_BT=segment_ids_BT, window=window)


_ATTENTION = {
    "auto": _attention_auto,
    "xla": attention_xla,
    "cudnn": _attention_cudnn,
    "pallas": _attention_pallas,
    "mosaic": functools.partial(_attention_pallas, every_pass_mosaic=True),
}


def norm_impl(cfg: ModelConfig) -> str:
    """`kernels.norm` on this backend: `auto` is the Pallas backward on a GPU where it applies
    (RMSNorm over a width that is a multiple of 16), XLA elsewhere."""
    if cfg.kernels.norm != "auto":
        return cfg.kernels.norm
    fits = cfg.norm == "rmsnorm" and cfg.model_dim % 16 == 0
    return "pallas" if fits and jax.default_backend() == "gpu" else "xla"


def logit_grad_impl(cfg: ModelConfig) -> str:
    """`kernels.logit_grad` on this backend: `auto` is the Pallas pass on a GPU where it applies
    (`ModelConfig.logit_pass_fits`: the fused XLA head loss without FP8, a vocabulary that is a
    multiple of 128), XLA elsewhere."""
    return _logit_pass_impl(cfg.kernels.logit_grad, cfg)


def logit_lse_impl(cfg: ModelConfig) -> str:
    """`kernels.logit_lse` on this backend, `auto` resolved as for `logit_grad`."""
    return _logit_pass_impl(cfg.kernels.logit_lse, cfg)


def _logit_pass_impl(choice: str, cfg: ModelConfig) -> str:
    if choice != "auto":
        return choice
    return "pallas" if cfg.logit_pass_fits and jax.default_backend() == "gpu" else "xla"


def on_hopper(device: jax.Device | None = None) -> bool:
    """Whether `device` (this backend's first) is a Hopper GPU (compute capability 9.x), where the
    Mosaic GPU kernels run."""
    device = jax.devices()[0] if device is None else device
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9")


def _check_hopper(field: str) -> None:
    """Mosaic GPU kernels compile for Hopper only (off a GPU the simulator runs them): on another
    GPU, stop with the choice to make rather than fall back or fail inside the compiler."""
    if jax.default_backend() == "gpu" and not on_hopper():
        kind = getattr(jax.devices()[0], "device_kind", "this GPU")
        raise ValueError(
            f"model.kernels.{field}='mosaic' runs Hopper (sm_90) kernels, not {kind}: use 'auto' or 'pallas'"
        )


def mlp_impl(cfg: ModelConfig) -> str:
    """`kernels.mlp` on this backend: `auto` is the Mosaic GEMMs on a Hopper GPU where they apply
    (`ModelConfig.mosaic_mlp_fits`), XLA elsewhere."""
    if cfg.kernels.mlp != "auto":
        return cfg.kernels.mlp
    return "mosaic" if cfg.mosaic_mlp_fits and on_hopper() else "xla"


def loss_impl(cfg: ModelConfig) -> str:
    """`kernels.loss` on this backend (`ModelConfig.loss_impl`): `auto` is the Pallas pass for
    record #77's FP8 head on a GPU."""
    return cfg.loss_impl(gpu=jax.default_backend() == "gpu")


def qkv_impl(cfg: ModelConfig) -> str:
    """`kernels.qkv` on this backend: `auto` is the Pallas backward on a GPU where it applies
    (`ModelConfig.fused_qkv_fits`), XLA elsewhere."""
    if cfg.kernels.qkv != "auto":
        return cfg.kernels.qkv
    return "pallas" if cfg.fused_qkv_fits and jax.default_backend() == "gpu" else "xla"


def resolved(cfg: ModelConfig, documents: bool) -> dict[str, str]:
    """Each kernel's implementation on this backend, `auto` resolved, for the run header."""
    k = cfg.kernels
    attention = _auto_attention(documents) if k.attention == "auto" else k.attention
    return {
        "attention": attention,
        "mlp": mlp_impl(cfg),
        "loss": loss_impl(cfg),
        "norm": norm_impl(cfg),
        "logit_lse": logit_lse_impl(cfg),
        "logit_grad": logit_grad_impl(cfg),
        "qkv": qkv_impl(cfg),
        "fp8_logits": k.fp8_logits,
    }


def attention(cfg: ModelConfig) -> Callable[..., jax.Array]:
    """`fn(q, k, v, *, scale, segment_ids_BT, window) -> y`, all [B, T, H, K]."""
    return _ATTENTION[cfg.kernels.attention]


def _relu2_mlp_xla(h_ND, w_up, w_down, b_up=None, b_down=None):
    u = h_ND @ w_up.astype(h_ND.dtype)
    if b_up is not None:
        u = u + b_up.astype(h_ND.dtype)[None]
    y = jnp.square(jax.nn.relu(u)) @ w_down.astype(h_ND.dtype)
    return y if b_down is None else y + b_down.astype(h_ND.dtype)[None]


def _relu2_mlp_pallas(h_ND, w_up, w_down, b_up=None, b_down=None):
    from pallas_kernels.relu2_mlp import relu2_mlp

    return relu2_mlp(h_ND, w_up, w_down, b_up, b_down, interpret=interpret())


def _relu2_mlp_mosaic(h_ND, w_up, w_down, b_up=None, b_down=None):
    from pallas_kernels.relu2_mlp import relu2_mlp

    _check_hopper("mlp")
    return relu2_mlp(h_ND, w_up, w_down, b_up, b_down, gemms="mosaic", interpret=interpret())


_RELU2_MLP = {"xla": _relu2_mlp_xla, "pallas": _relu2_mlp_pallas, "mosaic": _relu2_mlp_mosaic}


def relu2_mlp(cfg: ModelConfig) -> Callable[..., jax.Array]:
    """`fn(h [N, D], w_up, w_down, b_up, b_down) -> [N, D]`: relu(h W_up + b)² W_down + b."""
    return _RELU2_MLP[mlp_impl(cfg)]


def _rms_norm_bwd_pallas(x_ND, g_ND, r_ND, rstd_N, gain_D, *, column_sum):
    from pallas_kernels.rms_norm_bwd import rms_norm_bwd

    return rms_norm_bwd(x_ND, g_ND, r_ND, rstd_N, gain_D, column_sum=column_sum, interpret=interpret())


def rms_norm_bwd(cfg: ModelConfig) -> Callable[..., tuple] | None:
    """`fn(x [N, D], g, r, rstd [N], gain [D] | None, *, column_sum) -> (r + dx, dgain, Σ_rows)`:
    RMSNorm's backward with the residual stream's gradient added, as one kernel; None where XLA
    differentiates the norm."""
    return _rms_norm_bwd_pallas if norm_impl(cfg) == "pallas" else None


def _qkv_grad_pallas(*args, heads, column_sum):
    from pallas_kernels.qkv_grad import qkv_grad

    return qkv_grad(*args, heads=heads, column_sum=column_sum, interpret=interpret())


def qkv_grad(cfg: ModelConfig) -> Callable[..., tuple] | None:
    """`fn(dq, dk, dv, q, k, rstd_q, rstd_k, cos, sin, *, heads, column_sum) -> ([dq | dk | dv],
    column sums)`: the backward of the q/k/v projections' norm and rotation as one kernel
    (jaxrun/model/qkv.py); None where autodiff runs it in XLA."""
    return _qkv_grad_pallas if qkv_impl(cfg) == "pallas" else None


def _softcap_ce_pallas(h_ND, w_DV, targets_N, b_V, *, cap, cap_value):
    """Head matmul, softcap and cross-entropy in one Pallas kernel: no [N, V] logits in memory."""
    from pallas_kernels.softcap_ce import softcap_ce

    return softcap_ce(h_ND, w_DV, targets_N, b_V, cap=cap, cap_value=cap_value, interpret=interpret())


# "xla_fused": one custom VJP in XLA, bf16 logits saved once, no float32 [N, V] (jaxrun.model.head_loss)
_LOSS = {"xla_fused": head_loss.softcap_ce, "pallas": _softcap_ce_pallas}


def _logit_grad_pallas(zraw_NV, b_V, targets_N, lse_N, g_N, *, cap, cap_value):
    from pallas_kernels.logit_grad import logit_grad

    return logit_grad(
        zraw_NV, b_V, targets_N, lse_N, g_N, cap=cap, cap_value=cap_value, interpret=interpret()
    )


def _logit_lse_pallas(zraw_NV, b_V, *, cap, cap_value):
    from pallas_kernels.logit_lse import logit_lse

    return logit_lse(zraw_NV, b_V, cap=cap, cap_value=cap_value, interpret=interpret())


def fused_loss(cfg: ModelConfig) -> Callable[..., jax.Array] | None:
    """`fn(h [N, D], w [D, V], targets [N], b [V], *, cap, cap_value) -> losses [N]` when the head
    and loss run fused; None for the plain autodiff path ("xla") and for the FP8 head (`fp8_head_loss`)."""
    if cfg.head.fp8 is not None:
        return None
    passes = {  # the config checks that loss is "xla_fused" where either is "pallas"
        "logit_lse": _logit_lse_pallas if logit_lse_impl(cfg) == "pallas" else None,
        "logit_grad": _logit_grad_pallas if logit_grad_impl(cfg) == "pallas" else None,
    }
    if any(passes.values()):
        return functools.partial(head_loss.softcap_ce, **passes)
    return _LOSS.get(loss_impl(cfg))


def _mtp_ce_pallas(logits_NV, targets_NK, weights_K, *, cap_value, grad_scale):
    """Record #77's loss and e5m2 logit gradient in one Pallas kernel over the bf16 logits."""
    from pallas_kernels.mtp_ce import mtp_ce

    return mtp_ce(
        logits_NV, targets_NK, weights_K, cap_value=cap_value, grad_scale=grad_scale, interpret=interpret()
    )


def _mtp_ce_xla(logits_NV, targets_NK, weights_K, *, cap_value, grad_scale):
    from jaxrun.model.head_mtp_loss import mtp_ce_xla

    return mtp_ce_xla(logits_NV, targets_NK, weights_K, cap_value=cap_value, grad_scale=grad_scale)


# The pass over the FP8 head's bf16 logits that forms the loss and its e5m2 gradient together.
_FP8_HEAD_CE = {"xla_fused": _mtp_ce_xla, "pallas": _mtp_ce_pallas}


def fp8_head_loss(cfg: ModelConfig) -> Callable[..., jax.Array] | None:
    """Record #77's training head (FP8 GEMM, sigmoid cap, multi-token CE) as one custom VJP:
    `fn(h [N, D], w [D, V], targets [N], weights [K], *, row_len, scales, cap_value) -> losses [N]`;
    None for the plain autodiff path ("xla") or a head without FP8."""
    from jaxrun.model import head_mtp_loss  # it reads head.py's FP8 pieces; head.py imports this module

    ce = _FP8_HEAD_CE.get(loss_impl(cfg))
    if ce is None or cfg.head.fp8 is None:
        return None
    if cfg.kernels.fp8_logits == "mosaic":
        _check_hopper("fp8_logits")
        return functools.partial(head_mtp_loss.fp8_mtp_loss, ce=ce, logits=_fp8_logits_mosaic)
    return functools.partial(head_mtp_loss.fp8_mtp_loss, ce=ce)


def _fp8_logits_mosaic(x8_ND, w8_DV, s):
    """`head.fp8_logits` as one Mosaic GPU GEMM that writes the bf16 logits (Hopper; the simulator
    elsewhere): the weight goes K-major, as FP8 wgmma reads it."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from pallas_kernels.fp8_logits_mgpu import fp8_logits

    sim = plgpu.InterpretGPUParams() if interpret() else None
    return fp8_logits(x8_ND, w8_DV.T, scale=s.x_scale * s.w_scale, interpret=sim)
