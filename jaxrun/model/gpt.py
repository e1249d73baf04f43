"""The GPT as pure functions over a nested dict of arrays.

`init(key, cfg)` builds the params, `apply(params, tokens, cfg)` returns
softcapped logits and `loss(params, batch, cfg)` the mean token loss. Every
switch the recipes use is a field of `ModelConfig`; per-layer weights are
stacked on a leading L axis so the layers run under one `lax.scan` (or
unrolled) and Muon sees an explicit batch of matrices.

Param paths say which optimizer owns a leaf (see `jaxrun.optim.PARAM_TABLE`):
`embed/*` and `lm_head/*` go to Adam, `blocks/{attn,mlp}/w_*` to Muon, and
norm gains and biases (`*/gain`, `*/bias`, `blocks/*/b_*`) to Adam as scalars.

Shape legend for names such as `x_BTD`:
  B batch, T time (sequence), D model width, H heads, K head dim,
  F MLP width, L layers, V vocab.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxrun.config import ModelConfig

Params = dict[str, Any]
IGNORE_INDEX = -1  # targets below zero (padding) carry no loss


def init(key: jax.Array, cfg: ModelConfig) -> Params:
    """Initialize params in float32 as the recipe's `cfg.init` scheme says.

    "speedrun" (train_gpt_simple.py): embeddings N(0, 1), matrices
    N(0, 0.33/fan_in), output projections and the head zero, biases zero.
    "gpt2" (llm.c): matrices N(0, 0.02²), residual projections scaled by
    1/sqrt(2L), embeddings N(0, 0.02²).
    """
    L, D, F, V = cfg.num_layers, cfg.model_dim, cfg.mlp_dim, cfg.vocab_size
    HK = cfg.num_heads * cfg.head_dim
    keys = iter(jax.random.split(key, 16))

    def normal(shape, std):
        return std * jax.random.normal(next(keys), shape, jnp.float32)

    if cfg.init == "speedrun":
        embed_std = 1.0

        def matrix(shape, output_proj=False):
            return jnp.zeros(shape) if output_proj else normal(shape, math.sqrt(0.33 / shape[-2]))
    else:
        embed_std = 0.02

        def matrix(shape, output_proj=False):
            return normal(shape, 0.02 / math.sqrt(2 * L) if output_proj else 0.02)

    def norm_params(*lead):
        p = {}
        if cfg.norm_gains:
            p["gain"] = jnp.ones((*lead, D))
        if cfg.norm == "layernorm":
            p["bias"] = jnp.zeros((*lead, D))
        return p

    attn = {
        "w_q": matrix((L, D, HK)),
        "w_k": matrix((L, D, HK)),
        "w_v": matrix((L, D, HK)),
        "w_o": matrix((L, HK, D), output_proj=True),
    }
    mlp = {"w_up": matrix((L, D, F)), "w_down": matrix((L, F, D), output_proj=True)}
    if cfg.linear_biases:
        attn |= {name: jnp.zeros((L, HK)) for name in ("b_q", "b_k", "b_v")} | {"b_o": jnp.zeros((L, D))}
        mlp |= {"b_up": jnp.zeros((L, F)), "b_down": jnp.zeros((L, D))}
    params: Params = {
        "embed": {"tokens": normal((V, D), embed_std)},
        "blocks": {"attn_norm": norm_params(L), "attn": attn, "mlp_norm": norm_params(L), "mlp": mlp},
        "final_norm": norm_params(),
    }
    if cfg.positions == "learned":
        params["embed"]["positions"] = normal((cfg.max_seq_len, D), embed_std)
    if cfg.embed_norm:
        params["embed_norm"] = norm_params()
    if not cfg.tied_embeddings:
        params["lm_head"] = {"w": matrix((D, V), output_proj=cfg.init == "speedrun")}
        if cfg.linear_biases:
            params["lm_head"]["b"] = jnp.zeros((V,))
    return {name: group for name, group in params.items() if group}


def _lead(v: jax.Array, ndim: int) -> jax.Array:
    """Give a trailing-axis vector (gain, bias) explicit leading axes for broadcasting."""
    return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def _norm(x: jax.Array, p: Params, cfg: ModelConfig) -> jax.Array:
    """LayerNorm or RMSNorm over the last axis, computed in float32.

    RMSNorm uses eps = machine epsilon of the input dtype, as torch's
    `F.rms_norm` does by default; LayerNorm uses GPT-2's 1e-5.
    """
    xf = x.astype(jnp.float32)
    if cfg.norm == "layernorm":
        xf = xf - xf.mean(-1, keepdims=True)
        eps = 1e-5
    else:
        eps = float(jnp.finfo(x.dtype).eps)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps)
    if "gain" in p:
        y = y * _lead(p["gain"], y.ndim)
    if "bias" in p:
        y = y + _lead(p["bias"], y.ndim)
    return y.astype(x.dtype)


def _rms_norm_heads(x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    eps = float(jnp.finfo(x.dtype).eps)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps)).astype(x.dtype)


def rotary_tables(cfg: ModelConfig, seq_len: int) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables [T, K/2] for half-truncated RoPE.

    The first `rope_fraction * K / 2` frequencies run from 1 down to
    1/rope_base; the rest are zero, so those dims pass through unrotated.
    """
    half = cfg.head_dim // 2
    rotating = int(cfg.head_dim * cfg.rope_fraction) // 2
    freqs = (1.0 / cfg.rope_base) ** jnp.linspace(0.0, 1.0, rotating, dtype=jnp.float32)
    freqs = jnp.concatenate([freqs, jnp.zeros(half - rotating, jnp.float32)])
    theta_TK = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * freqs[None, :]
    return jnp.cos(theta_TK), jnp.sin(theta_TK)


def _rotate(x_BTHK: jax.Array, cos_TK: jax.Array, sin_TK: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x_BTHK.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos_TK[None, :, None, :], sin_TK[None, :, None, :]
    y = jnp.concatenate([x1 * cos + x2 * sin, x2 * cos - x1 * sin], axis=-1)
    return y.astype(x_BTHK.dtype)


def attention(
    q_BTHK: jax.Array,
    k_BTHK: jax.Array,
    v_BTHK: jax.Array,
    *,
    scale: float,
    impl: str = "xla",
    segment_ids_BT: jax.Array | None = None,
    window: int | None = None,
) -> jax.Array:
    """Causal attention, optionally windowed (query i sees keys [i-window, i])
    and document-masked (a query sees only keys with its own segment id)."""
    if impl == "xla":
        return attention_xla(
            q_BTHK, k_BTHK, v_BTHK, scale=scale, segment_ids_BT=segment_ids_BT, window=window
        )
    if impl == "cudnn":
        if segment_ids_BT is not None:
            raise ValueError("attention_impl='cudnn' has no document mask; use 'xla' or 'pallas'")
        return jax.nn.dot_product_attention(
            q_BTHK,
            k_BTHK,
            v_BTHK,
            scale=scale,
            is_causal=True,  # always with a window: jax issue #39576
            local_window_size=None if window is None else (window, 0),
            implementation="cudnn",
        )
    if impl == "pallas":
        from pallas_kernels.attention import flash_attention

        return flash_attention(
            q_BTHK,
            k_BTHK,
            v_BTHK,
            segment_ids=segment_ids_BT,
            window=window,
            scale=scale,
            interpret=_interpret(),
        )
    raise ValueError(f"unknown attention impl {impl!r}")


def attention_xla(q_BTHK, k_BTHK, v_BTHK, *, scale, segment_ids_BT=None, window=None) -> jax.Array:
    """Plain-jnp attention: the T×T scores in float32, masked, then softmax."""
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


def _interpret() -> bool:
    """Pallas kernels run compiled on a GPU and in the interpreter elsewhere (CPU tests)."""
    return jax.default_backend() != "gpu"


def _linear(x: jax.Array, p: Params, w: str, b: str) -> jax.Array:
    y = x @ p[w].astype(x.dtype)
    return y + _lead(p[b].astype(x.dtype), y.ndim) if b in p else y


def _block(x_BTD: jax.Array, layer: Params, cfg: ModelConfig, rope, segment_ids_BT) -> jax.Array:
    B, T, _ = x_BTD.shape
    H, K = cfg.num_heads, cfg.head_dim
    attn = layer["attn"]
    h_BTD = _norm(x_BTD, layer["attn_norm"], cfg)
    q_BTHK = _linear(h_BTD, attn, "w_q", "b_q").reshape(B, T, H, K)
    k_BTHK = _linear(h_BTD, attn, "w_k", "b_k").reshape(B, T, H, K)
    v_BTHK = _linear(h_BTD, attn, "w_v", "b_v").reshape(B, T, H, K)
    if cfg.qk_norm:
        q_BTHK, k_BTHK = _rms_norm_heads(q_BTHK), _rms_norm_heads(k_BTHK)
    if rope is not None:
        q_BTHK, k_BTHK = _rotate(q_BTHK, *rope), _rotate(k_BTHK, *rope)
    scale = cfg.attention_scale if cfg.attention_scale is not None else 1 / math.sqrt(K)
    y_BTHK = attention(
        q_BTHK, k_BTHK, v_BTHK, scale=scale, impl=cfg.attention_impl, segment_ids_BT=segment_ids_BT
    )
    x_BTD = x_BTD + _linear(y_BTHK.reshape(B, T, H * K), attn, "w_o", "b_o")

    mlp = layer["mlp"]
    h_BTD = _norm(x_BTD, layer["mlp_norm"], cfg)
    if cfg.mlp_impl == "pallas":
        from pallas_kernels.relu2_mlp import relu2_mlp

        y_ND = relu2_mlp(
            h_BTD.reshape(B * T, -1),
            mlp["w_up"],
            mlp["w_down"],
            mlp.get("b_up"),
            mlp.get("b_down"),
            interpret=_interpret(),
        )
        return x_BTD + y_ND.reshape(x_BTD.shape)
    u_BTF = _linear(h_BTD, mlp, "w_up", "b_up")
    if cfg.activation == "relu2":
        u_BTF = jnp.square(jax.nn.relu(u_BTF))
    else:
        u_BTF = jax.nn.gelu(u_BTF, approximate=True)
    return x_BTD + _linear(u_BTF, mlp, "w_down", "b_down")


def _softcap(z: jax.Array, cfg: ModelConfig) -> jax.Array:
    c = cfg.softcap_value
    if cfg.softcap == "isru":
        return c * z * jax.lax.rsqrt(z * z + c * c)
    if cfg.softcap == "tanh":
        return c * jnp.tanh(z / c)
    return z


def hidden_states(
    params: Params, tokens_BT: jax.Array, cfg: ModelConfig, segment_ids_BT: jax.Array | None = None
) -> jax.Array:
    """The final normalized hidden states [B, T, D] in the compute dtype."""
    dtype = jnp.dtype(cfg.compute_dtype)
    T = tokens_BT.shape[1]
    x_BTD = params["embed"]["tokens"].astype(dtype)[tokens_BT]
    if cfg.positions == "learned":
        x_BTD = x_BTD + params["embed"]["positions"][:T].astype(dtype)[None]
    if cfg.embed_norm:
        x_BTD = _norm(x_BTD, params["embed_norm"], cfg)
    rope = rotary_tables(cfg, T) if cfg.positions == "rope" else None

    def body(x, layer):
        return _block(x, layer, cfg, rope, segment_ids_BT), None

    if cfg.scan_layers:
        x_BTD, _ = jax.lax.scan(body, x_BTD, params["blocks"])
    else:
        for i in range(cfg.num_layers):
            x_BTD, _ = body(x_BTD, jax.tree.map(lambda w, i=i: w[i], params["blocks"]))
    return _norm(x_BTD, params["final_norm"], cfg)


def head(params: Params, h_BTD: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Softcapped logits [B, T, V] in float32 from hidden states."""
    if cfg.tied_embeddings:
        logits = h_BTD @ params["embed"]["tokens"].astype(h_BTD.dtype).T
    else:
        logits = _linear(h_BTD, params["lm_head"], "w", "b")
    return _softcap(logits.astype(jnp.float32), cfg)


def apply(
    params: Params, tokens_BT: jax.Array, cfg: ModelConfig, segment_ids_BT: jax.Array | None = None
) -> jax.Array:
    """Softcapped float32 logits [B, T, V] for int tokens [B, T]."""
    return head(params, hidden_states(params, tokens_BT, cfg, segment_ids_BT), cfg)


def token_losses(params: Params, batch: dict[str, jax.Array], cfg: ModelConfig) -> jax.Array:
    """Cross-entropy per token [B, T] in float32; zero where targets < 0."""
    targets_BT = batch["targets"]
    if cfg.loss_impl == "pallas":
        from pallas_kernels.softcap_ce import softcap_ce

        h_BTD = hidden_states(params, batch["inputs"], cfg, batch.get("segment_ids"))
        if cfg.tied_embeddings:
            w_DV, b_V = params["embed"]["tokens"].T, None
        else:
            w_DV, b_V = params["lm_head"]["w"], params["lm_head"].get("b")
        B, T, D = h_BTD.shape
        losses_N = softcap_ce(
            h_BTD.reshape(B * T, D),
            w_DV,
            targets_BT.reshape(-1),
            b_V,
            cap="isru",
            cap_value=cfg.softcap_value,
            interpret=_interpret(),
        )
        return losses_N.reshape(B, T)
    logits_BTV = apply(params, batch["inputs"], cfg, batch.get("segment_ids"))
    logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, jnp.maximum(targets_BT, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(targets_BT >= 0, logz_BT - target_logit_BT, 0.0)


def loss(params: Params, batch: dict[str, jax.Array], cfg: ModelConfig) -> jax.Array:
    """Mean cross-entropy over the batch's scored tokens (targets >= 0)."""
    losses_BT = token_losses(params, batch, cfg)
    return losses_BT.sum() / jnp.maximum((batch["targets"] >= 0).sum(), 1)


def count_params(params: Params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6·N for the matmuls plus causal attention."""
    L, D, F, HK = cfg.num_layers, cfg.model_dim, cfg.mlp_dim, cfg.num_heads * cfg.head_dim
    matmul_params = L * (4 * D * HK + 2 * D * F) + D * cfg.vocab_size
    attention = L * 2 * 2 * seq_len * HK / 2  # QK^T and PV, causal half, per token
    return 6 * matmul_params + 3 * attention
