"""Text generation with a KV cache, for the end of a run, `launch.py sample` and notebooks.

`generate(params, cfg, prompt)` feeds the prompt and then its own samples one
token at a time through the layers, keeping each attention layer's keys and
values in a cache `[L, B, C, H, K]` of the context length C: a step costs one
token's forward plus attention over the cache, not a forward over the whole
sequence. The whole loop (prompt, then sampling) is one `lax.while_loop` in one
jitted program, compiled once per config, context length and `top_k`.

The per-token forward is `jaxrun.model`'s, component by component (embeddings,
attention projections and rotary tables, MLP, residual, head); only attention
itself reads the cache. Techniques that look across positions other than
through attention (smear, bigram hash, paired heads, key offset) are refused.

Shape legend as in `jaxrun.model`, plus C: cache (context) length.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxrun import model
from jaxrun.config import Config, ConfigError, ModelConfig
from jaxrun.model import attention, embeddings, head, mlp, residual
from jaxrun.model.gpt import layer_params
from jaxrun.model.layers import linear, norm, rms_norm, scaled
from jaxrun.tokenizer import get_tokenizer

EOT = 50256  # GPT-2's <|endoftext|>: the BOS of every document; ids past it are vocab padding


def _check_cacheable(cfg: ModelConfig) -> None:
    plan = model.layer_plan(cfg)
    off = {
        "model.embed.smear": cfg.embed.smear is not None,
        "model.embed.bigram": cfg.embed.bigram is not None,
        "model.attn.paired_layers": any(lp.paired for lp in plan),
        "model.attn.key_offset": any(lp.key_offset for lp in plan),
    }
    if used := [name for name, on in off.items() if on]:
        raise ConfigError(f"KV-cache generation does not support {', '.join(used)} yet")


def _attend(p, h_B1D, lp, cfg: ModelConfig, cache, pos, ve_B1D):
    """One token's attention at position `pos`, its k and v written into this layer's cache."""
    k_cache, v_cache = cache
    B, C = h_B1D.shape[0], k_cache.shape[1]
    H, K, dtype = cfg.num_heads, cfg.head_dim, h_B1D.dtype
    mode = model.default_mode(cfg)
    w = {name: p[name] for name in ("w_q", "w_k", "w_v", "w_o")}
    if "sa_lambdas" in p:
        w = {name: scaled(p["sa_lambdas"][0 if name != "w_o" else 1], m, dtype) for name, m in w.items()}
    q, k, v = (linear(h_B1D, p | w, f"w_{n}", f"b_{n}").reshape(B, 1, H, K) for n in ("q", "k", "v"))
    if cfg.attn.qk_norm:
        q, k = rms_norm(q), rms_norm(k)
    if cfg.attn.rope is not None:
        cos, sin = (jax.lax.dynamic_slice_in_dim(t, pos, 1) for t in attention.rotary_tables(cfg, C, mode))
        q, k = (attention.rotate(x, cos, sin, cfg.attn.rope.pairing) for x in (q, k))
    if ve_B1D is not None:
        v = v + attention.value_embedding(p["ve_gate"], h_B1D, ve_B1D, lp, cfg).reshape(v.shape)
    k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), pos, axis=1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), pos, axis=1)
    s_BHC = jnp.einsum("bhk,bchk->bhc", q[:, 0], k_cache, preferred_element_type=jnp.float32)
    s_BHC = s_BHC * attention.attention_scale(cfg, mode)
    keys = jnp.arange(C)
    mask_C = keys <= pos
    if (window := attention.window_tokens(cfg, lp, mode)) is not None:
        mask_C &= keys >= pos - window
    p_BHC = jax.nn.softmax(jnp.where(mask_C, s_BHC, -jnp.inf), axis=-1).astype(v_cache.dtype)
    y_B1HK = jnp.einsum("bhc,bchk->bhk", p_BHC, v_cache)[:, None]
    if "gate" in p:
        gate_B1H = jax.nn.sigmoid(h_B1D[..., : attention.GATE_WIDTH] @ p["gate"].astype(dtype))
        y_B1HK = y_B1HK * gate_B1H[..., None]
    return linear(y_B1HK.reshape(B, 1, H * K), p | w, "w_o", "b_o"), (k_cache, v_cache)


def _embed(params, tokens_B1, cfg: ModelConfig, pos) -> jax.Array:
    """x0 for one token at position `pos` (`embeddings.embed` reads positions from 0)."""
    dtype = jnp.dtype(cfg.compute_dtype)
    x_B1D = embeddings.token_table(params, cfg, model.default_mode(cfg))[tokens_B1].astype(dtype)
    if cfg.embed.learned_positions:
        x_B1D = x_B1D + jax.lax.dynamic_slice_in_dim(params["embed"]["positions"], pos, 1).astype(dtype)[None]
    if cfg.embed.norm:
        x_B1D = norm(x_B1D, params.get("embed_norm", {}), cfg)
    return x_B1D


def decode_step(params, tokens_B1, cfg: ModelConfig, caches, pos):
    """Logits [B, V] of the next token after `tokens_B1` at position `pos`, and the updated caches.

    `caches` holds (k, v) per attention layer, each [B, C, H, K]; positions < pos
    must already be in them.
    """
    res = params.get("residual", {})
    x0 = _embed(params, tokens_B1, cfg, pos)
    ve = embeddings.value_embeddings(params, tokens_B1, cfg)
    x, skip, saved, caches = residual.start(res, x0, None), None, None, list(caches)
    for lp in model.layer_plan(cfg):
        layer = layer_params(params["blocks"], lp)
        if lp.skip_in:
            x = x + residual.skip_gate(res, x0) * skip
        elif lp.attn_slot is not None:
            h = norm(saved if lp.reads_saved else x, layer.get("attn_norm", {}), cfg)
            table = ve[lp.value_table] if lp.value_table is not None else None
            a, caches[lp.attn_slot] = _attend(layer["attn"], h, lp, cfg, caches[lp.attn_slot], pos, table)
            x = residual.after_attention(res, lp.index, x, a, x0, None)
        h = norm(x, layer.get("mlp_norm", {}), cfg)
        x = residual.after_mlp(res, lp.index, x, mlp.forward(layer["mlp"], h, cfg))
        if cfg.residual.skip is not None and lp.index == cfg.residual.skip.source:
            skip = x
        if lp.index == cfg.residual.saved_layer:
            saved = x
    if cfg.residual.backout:
        x = residual.backout(res, x, saved)
    return head.logits(params, norm(x, params.get("final_norm", {}), cfg), cfg)[:, 0], tuple(caches)


@functools.partial(jax.jit, static_argnames=("cfg", "top_k"))
def generate_ids(params, buf_BC, prompt_len, end, key, temperature, *, cfg: ModelConfig, top_k: int):
    """Fill `buf_BC[:, prompt_len:end]` with sampled tokens, the prompt in `buf_BC[:, :prompt_len]`.

    One token per loop step: positions before `prompt_len` feed the prompt into the
    cache, later ones sample. `temperature` 0 is greedy; `top_k` 0 samples the whole
    vocabulary. Vocab padding (ids past 50256) is never drawn.
    """
    B, C = buf_BC.shape
    dtype = jnp.dtype(cfg.compute_dtype)
    empty = jnp.zeros((B, C, cfg.num_heads, cfg.head_dim), dtype)
    caches = tuple((empty, empty) for _ in range(cfg.num_attn_layers))

    def body(carry):
        pos, buf, caches, key = carry
        logits_BV, caches = decode_step(params, buf[:, pos, None], cfg, caches, pos)
        logits_BV = logits_BV.at[:, EOT + 1 :].set(-jnp.inf)
        if top_k:
            kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
            logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
        key, sub = jax.random.split(key)
        drawn = jax.random.categorical(sub, logits_BV / jnp.maximum(temperature, 1e-6))
        token = jnp.where(temperature > 0, drawn, jnp.argmax(logits_BV, axis=-1)).astype(buf.dtype)
        keep = pos + 1 < prompt_len  # still reading the prompt: keep its next token
        buf = buf.at[:, pos + 1].set(jnp.where(keep, buf[:, pos + 1], token))
        return pos + 1, buf, caches, key

    _, buf_BC, _, _ = jax.lax.while_loop(
        lambda carry: carry[0] < end - 1, body, (jnp.int32(0), buf_BC, caches, key)
    )
    return buf_BC


def context_length(cfg: Config | ModelConfig) -> int:
    """How many tokens fit: the run's sequence length, or the model's position table."""
    if isinstance(cfg, Config):
        return cfg.data.seq_len
    return cfg.max_seq_len


def generate(
    params,
    cfg: Config | ModelConfig,
    prompt: str,
    num_tokens: int = 100,
    *,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
) -> str:
    """The prompt and `num_tokens` tokens sampled after it, as text.

    Args:
      params: the model's params (e.g. from `jaxrun.load_checkpoint`).
      cfg: the run's `Config` or just its `ModelConfig`.
      prompt: text; the document-start token goes before it, as in training.
      num_tokens: how many tokens to add; with the prompt they must fit the context
        (`data.seq_len`, or `max_seq_len` for a bare ModelConfig): a longer prompt
        keeps its end.
      temperature: softmax temperature; 0 is greedy.
      top_k: sample among the k likeliest tokens (0: all).
      seed: the sampling key.
    """
    context, model_cfg = context_length(cfg), cfg.model if isinstance(cfg, Config) else cfg
    _check_cacheable(model_cfg)
    if not 0 < num_tokens < context:
        raise ConfigError(f"num_tokens={num_tokens} must be in 1..{context - 1} (the context is {context})")
    # Via the host onto one device: params from a mesh carry its shardings into the cache updates.
    params = jax.device_put(jax.device_get(params), jax.local_devices()[0])
    enc = get_tokenizer()
    ids = ([EOT] + enc.encode_ordinary(prompt))[-(context - num_tokens) :]
    buf = jnp.zeros((1, context), jnp.int32).at[0, : len(ids)].set(jnp.asarray(ids, jnp.int32))
    out = generate_ids(
        params,
        buf,
        jnp.int32(len(ids)),
        jnp.int32(len(ids) + num_tokens),
        jax.random.key(seed),
        jnp.float32(temperature),
        cfg=model_cfg,
        top_k=top_k,
    )
    new = [int(t) for t in out[0, len(ids) : len(ids) + num_tokens]]
    return prompt + enc.decode([t for t in new if t < EOT])


def generate_text(params, cfg: Config, prompt: str, num_tokens: int, seed: int = 0) -> str:
    """`generate` with its default sampling: the sample at the end of a run."""
    return generate(params, cfg, prompt, min(num_tokens, context_length(cfg) - 1), seed=seed)
