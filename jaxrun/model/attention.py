"""Causal self-attention and its per-layer variants.

Owns `model.attn` (AttentionConfig, RopeConfig, WindowConfig): the q/k/v/o
weights stacked over attention layers (`blocks/attn/w_*`, Muon), their norm,
the per-head output gate and value-embedding gate banks, and the per-layer
`sa_lambdas` that scale the weights (Adam). Rotary positions are
half-truncated, in split halves (train_gpt_simple.py) or adjacent pairs with
YaRN rescaling (record #77). Paired layers (record #77) let each pair of heads
attend over a doubled sequence in which a token's two heads sit at virtual
positions 2t and 2t+1.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxrun.config import ModelConfig
from jaxrun.model import kernels, qkv
from jaxrun.model.layers import Initializer, Params, init_norm, linear, mul, rms_norm, scaled
from jaxrun.model.plan import LayerPlan
from jaxrun.param_table import OptimRow

GATE_WIDTH = 12  # the gates read the first 12 dims of the attention input

OPTIM_ROWS = (
    OptimRow(r"blocks/attn/w_[qkvo]", "hidden"),
    OptimRow(r"blocks/attn/b_[qkvo]", "scalar"),
    OptimRow(r"blocks/attn_norm/(gain|bias)", "scalar"),
    OptimRow(r"blocks/attn/sa_lambdas", "scalar", lr_mul=5.0, wd_mul=0.0, betas=(0.9, 0.99)),
    OptimRow(r"blocks/attn/gate", "gate", betas=(0.9, 0.99)),
    OptimRow(r"blocks/attn/ve_gate", "gate", betas=(0.9, 0.99)),
)


@dataclasses.dataclass(frozen=True)
class Mode:
    """Where training is, as the forward needs it; static, so each value compiles its own step.

    `windows`: (short, long) in blocks (None: full causal, or `gpt.default_mode`'s pair where
    the config has windows). `long_history`: the long
    windows the run has moved through, first to current, for YaRN (empty: none). `training`:
    FP8 head and multi-token loss on; off for eval. `tied`: read the token embedding from the
    head's weight (record #77 before the split step).
    """

    training: bool = False
    windows: tuple[int, int] | None = None
    long_history: tuple[int, ...] = ()
    tied: bool = False


def init(cfg: ModelConfig, rng: Initializer) -> Params:
    """`blocks/attn` and `blocks/attn_norm` (stacked over attention layers), in the init order."""
    La, D, HK, H = cfg.num_attn_layers, cfg.model_dim, cfg.num_heads * cfg.head_dim, cfg.num_heads
    if cfg.init == "record":  # U(±√3·0.5/√D), O included (record #77)
        bound = math.sqrt(3) * 0.5 / math.sqrt(D)
        attn = {name: rng.uniform((La, D, D), bound) for name in ("w_q", "w_k", "w_v", "w_o")}
    else:
        attn = {name: _matrix(cfg, rng, (La, D, HK)) for name in ("w_q", "w_k", "w_v")}
        attn["w_o"] = _matrix(cfg, rng, (La, HK, D), output_proj=True)
    if cfg.linear_biases:
        attn |= {name: jnp.zeros((La, HK)) for name in ("b_q", "b_k", "b_v")} | {"b_o": jnp.zeros((La, D))}
    if cfg.attn.gate:
        attn["gate"] = jnp.zeros((La, GATE_WIDTH, H))
    if cfg.embed.value is not None:
        attn["ve_gate"] = jnp.zeros((len(cfg.embed.value.layers), GATE_WIDTH, H))
    if cfg.residual.lambdas:  # scales of W_qkv and W_o per layer, layer-indexed as in record #77
        attn["sa_lambdas"] = jnp.tile(jnp.array([0.5, 1.0]), (cfg.num_layers, 1))
    out = {"attn": attn}
    if norm := init_norm(cfg, La):
        out["attn_norm"] = norm
    return out


def _matrix(cfg: ModelConfig, rng: Initializer, shape, output_proj=False) -> jax.Array:
    """train_gpt_simple.py: N(0, 0.33/fan_in), zero output projections; GPT-2: N(0, 0.02²) scaled by 1/√(2L)."""
    if cfg.init == "speedrun":
        return jnp.zeros(shape) if output_proj else rng.normal(shape, math.sqrt(0.33 / shape[-2]))
    return rng.normal(shape, 0.02 / math.sqrt(2 * cfg.num_layers) if output_proj else 0.02)


# ---- rotary positions and YaRN ----


def _base_freqs(cfg: ModelConfig) -> np.ndarray:
    """The distinct rotary frequencies, float32: 1 down to 1/base, over the rotating share."""
    rope = cfg.attn.rope
    n = int(cfg.head_dim * rope.fraction) // 2
    return ((1.0 / rope.base) ** np.linspace(0.0, 1.0, n, dtype=np.float32)).astype(np.float32)


def _long_window_changes(cfg: ModelConfig, mode: Mode) -> list[tuple[int, int]]:
    """(old, new) long windows in tokens at each change the run went through, for YaRN."""
    if cfg.attn.rope is None or not cfg.attn.rope.yarn:
        return []
    block, hist = cfg.attn.windows.block, mode.long_history
    return [(old * block, new * block) for old, new in zip(hist, hist[1:]) if old != new]


def yarn(cfg: ModelConfig, mode: Mode) -> np.ndarray:
    """Rotary frequencies after the long-window changes in `mode.long_history` (YaRN).

    At each change old → new (tokens), a frequency rotating r = old·f/2π times inside the old
    window is scaled by ρ + β(1 - ρ), ρ = old/new, β = clamp((r - 1)/31, 0, 1): fast ones stay,
    slow ones stretch with the window. Cumulative, in float32 as record #77 computes it.
    """
    freqs = _base_freqs(cfg)
    for old_w, new_w in _long_window_changes(cfg, mode):
        rotations = np.float32(old_w) * freqs / np.float32(2 * math.pi)
        ratio = old_w / new_w
        beta = np.clip((rotations - 1) / (32 - 1), 0, 1).astype(np.float32)
        freqs = (freqs * (ratio + beta * (1 - ratio))).astype(np.float32)
    return freqs


def attention_scale(cfg: ModelConfig, mode: Mode) -> float:
    """The softmax scale: the configured one (1/√K if None), grown by 1 + 0.2·ln(new/old) at each
    YaRN window change."""
    scale = cfg.attn.scale if cfg.attn.scale is not None else 1 / math.sqrt(cfg.head_dim)
    for old_w, new_w in _long_window_changes(cfg, mode):
        scale *= 0.2 * math.log(new_w / old_w) + 1
    return scale


def rotary_tables(cfg: ModelConfig, seq_len: int, mode: Mode = Mode(), paired: bool = False):
    """cos and sin tables for positions 0..seq_len-1 (2t and 2t+1 side by side when `paired`).

    "halves": [T, K/2], one column per pair (j, j + K/2). "interleaved": [T, K], a column per dim,
    each frequency repeated for its pair (2j, 2j+1); non-rotating dims have frequency 0.
    """
    rope = cfg.attn.rope
    freqs = yarn(cfg, mode)
    width = cfg.head_dim // 2 if rope.pairing == "halves" else cfg.head_dim
    per_dim = freqs if rope.pairing == "halves" else np.repeat(freqs, 2)
    per_dim = jnp.asarray(np.concatenate([per_dim, np.zeros(width - per_dim.size, np.float32)]))
    t = jnp.arange(seq_len, dtype=jnp.float32)
    if paired:
        theta = jnp.concatenate([jnp.outer(2 * t, per_dim), jnp.outer(2 * t + 1, per_dim)], axis=-1)
    else:
        theta = jnp.outer(t, per_dim)
    dtype = jnp.dtype(rope.table_dtype)
    return jnp.cos(theta).astype(dtype), jnp.sin(theta).astype(dtype)


def rotate(x_BTHK: jax.Array, cos_TK: jax.Array, sin_TK: jax.Array, pairing: str) -> jax.Array:
    """Rotate each head's dim pairs by position × frequency."""
    if pairing == "halves":
        return qkv.rotate_halves(x_BTHK, cos_TK, sin_TK)
    # adjacent pairs, in the activation dtype with the tables cast to it, as record #77 does
    cos, sin = cos_TK[None, :, None, :], sin_TK[None, :, None, :]
    dtype = x_BTHK.dtype
    pairs = x_BTHK.reshape(*x_BTHK.shape[:-1], -1, 2)
    swapped = jnp.stack([pairs[..., 1], -pairs[..., 0]], axis=-1).reshape(x_BTHK.shape)
    return cos.astype(dtype) * x_BTHK + sin.astype(dtype) * swapped


# ---- the layer ----


def forward(
    p: Params,
    h_BTD: jax.Array,
    lp: LayerPlan,
    cfg: ModelConfig,
    mode: Mode,
    segment_ids_BT: jax.Array | None,
    ve_BTD: jax.Array | None,
) -> jax.Array:
    """Attention output [B, T, D] for a normed input `h_BTD` with this layer's params `p`.

    `p` holds this layer's slices: w_q/k/v/o (and biases), gate, ve_gate, sa_lambdas.
    """
    B, T, _ = h_BTD.shape
    H, K, dtype = cfg.num_heads, cfg.head_dim, h_BTD.dtype
    w = {name: p[name] for name in ("w_q", "w_k", "w_v", "w_o")}
    if "sa_lambdas" in p:  # the lambdas scale the weights, so their gradients follow (record #77)
        w = {name: scaled(p["sa_lambdas"][0 if name != "w_o" else 1], m, dtype) for name, m in w.items()}
    qkv_grad = kernels.qkv_grad(cfg)
    fused = qkv_grad is not None and not lp.paired and not lp.key_offset
    if fused:  # projections, norm and rotation with their backward as one pass (qkv.py)
        cos, sin = rotary_tables(cfg, T, mode)
        q_BTHK, k_BTHK, v_BTHK = qkv.project(p | w, h_BTD, cos, sin, H, qkv_grad)
    else:
        q_BTHK, k_BTHK, v_BTHK = (
            linear(h_BTD, p | w, f"w_{n}", f"b_{n}").reshape(B, T, H, K) for n in qkv.NAMES
        )
        if cfg.attn.qk_norm:
            q_BTHK, k_BTHK = rms_norm(q_BTHK), rms_norm(k_BTHK)
    if lp.paired:
        q_BTHK, k_BTHK, v_BTHK, segment_ids_BT = _pair_heads(
            q_BTHK, k_BTHK, v_BTHK, segment_ids_BT, cfg, mode
        )
    elif cfg.attn.rope is not None and not fused:
        cos, sin = rotary_tables(cfg, T, mode)
        pairing = cfg.attn.rope.pairing
        q_BTHK, k_BTHK = rotate(q_BTHK, cos, sin, pairing), rotate(k_BTHK, cos, sin, pairing)
    scale = attention_scale(cfg, mode)
    window = window_tokens(cfg, lp, mode)
    if lp.key_offset:  # keys' still half looks one token back: 1-layer induction heads (record #77)
        still = k_BTHK[:, :, :, K // 2 :]
        shifted = jnp.concatenate([still[:, :1], still[:, :-1]], axis=1)
        k_BTHK = jnp.concatenate([k_BTHK[:, :, :, : K // 2], shifted], axis=-1)
    if ve_BTD is not None:
        v_BTHK = v_BTHK + value_embedding(p["ve_gate"], h_BTD, ve_BTD, lp, cfg).reshape(v_BTHK.shape)
    y_BTHK = kernels.attention(cfg)(
        q_BTHK, k_BTHK, v_BTHK, scale=scale, segment_ids_BT=segment_ids_BT, window=window
    ).reshape(B, T, H, K)
    if "gate" in p:
        y_BTHK = mul(y_BTHK, jax.nn.sigmoid(h_BTD[..., :GATE_WIDTH] @ p["gate"].astype(dtype))[..., None])
    return linear(y_BTHK.reshape(B, T, H * K), p | w, "w_o", "b_o")


def window_tokens(cfg: ModelConfig, lp: LayerPlan, mode: Mode) -> int | None:
    """The layer's window in tokens (virtual positions on paired layers), or None."""
    if lp.window is None:
        return None
    if mode.windows is None:
        raise ValueError(
            "model.attn.windows is set but the mode names no (short, long) pair: "
            "use jaxrun.model.default_mode(cfg) or jaxrun.schedule.eval_mode(cfg, step)"
        )
    short, long = mode.windows
    return (long if lp.window == "long" else short) * cfg.attn.windows.block


def _pair_heads(q_BTHK, k_BTHK, v_BTHK, segment_ids_BT, cfg: ModelConfig, mode: Mode):
    """The doubled sequence of a paired layer: [B, 2T, H/2, K] with pair g's two heads at 2t, 2t+1.

    q and k rotate as 2K-vectors (first half at position 2t, second at 2t+1) before the split;
    v is the token's D-vector read as two virtual positions of H/2 heads, a different grouping
    than q/k's that record #77 uses as it is.
    """
    B, T, H, K = q_BTHK.shape
    cos, sin = rotary_tables(cfg, T, mode, paired=True)
    pairing = cfg.attn.rope.pairing
    q, k = (
        rotate(x.reshape(B, T, H // 2, 2 * K), cos, sin, pairing).reshape(B, 2 * T, H // 2, K)
        for x in (q_BTHK, k_BTHK)
    )
    v = v_BTHK.reshape(B, 2 * T, H // 2, K)
    seg = None if segment_ids_BT is None else jnp.repeat(segment_ids_BT, 2, axis=1)
    return q, k, v, seg


def value_embedding(gate_w: jax.Array, h_BTD, ve_BTD, lp: LayerPlan, cfg: ModelConfig) -> jax.Array:
    """The gated value embedding [B, T, D] to add to v, laid out as v is on this layer.

    Gate per head 2σ(w · u): u = [h[:6], ve[:6]] on plain layers, h[:12] on paired ones (record #77).
    """
    B, T, D = h_BTD.shape
    H, K, dtype = cfg.num_heads, cfg.head_dim, h_BTD.dtype
    ve_BTD = ve_BTD.astype(dtype)
    half = GATE_WIDTH // 2
    u = h_BTD[..., :GATE_WIDTH] if lp.paired else jnp.concatenate([h_BTD[..., :half], ve_BTD[..., :half]], -1)
    g_BTH = 2 * jax.nn.sigmoid(u @ gate_w[lp.value_table].astype(dtype))
    if lp.paired:  # gate h of token t goes with virtual position 2t + h // (H/2), group h mod H/2
        return mul(ve_BTD.reshape(B, 2 * T, H // 2, K), g_BTH.reshape(B, 2 * T, H // 2, 1)).reshape(B, T, D)
    return mul(ve_BTD.reshape(B, T, H, K), g_BTH[..., None]).reshape(B, T, D)
