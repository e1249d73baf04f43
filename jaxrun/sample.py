"""Text generation from trained params, for the end of a run and for notebooks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxrun import model
from jaxrun.config import Config
from jaxrun.tokenizer import get_tokenizer


@functools.partial(jax.jit, static_argnames=("cfg", "num_tokens", "temperature", "top_k"))
def generate(
    params,
    prompt_T: jax.Array,
    prompt_len: jax.Array,
    key: jax.Array,
    *,
    cfg: Config,
    num_tokens: int,
    temperature: float = 0.8,
    top_k: int = 50,
) -> jax.Array:
    """Sample `num_tokens` tokens after a prompt held in a [seq_len] buffer.

    The context is the last seq_len tokens: once the buffer is full it slides.
    Each token costs one forward over the buffer (no KV cache: this is for
    looking at a model, not serving it).
    """
    T = prompt_T.shape[0]

    def body(i, carry):
        buf_T, pos, key, out = carry
        h_1TD = model.hidden_states(params, buf_T[None], cfg.model)
        last = jnp.minimum(pos, T) - 1
        logits_V = model.head(params, jax.lax.dynamic_slice_in_dim(h_1TD[0], last, 1), cfg.model)[0]
        logits_V = logits_V.at[50257:].set(-jnp.inf)  # never sample the vocab padding
        top_vals, top_ids = jax.lax.top_k(logits_V / temperature, top_k)
        key, sub = jax.random.split(key)
        token = top_ids[jax.random.categorical(sub, top_vals)]
        buf_T = jnp.where(pos < T, buf_T.at[pos].set(token), jnp.roll(buf_T, -1).at[T - 1].set(token))
        return buf_T, pos + 1, key, out.at[i].set(token)

    out = jnp.zeros((num_tokens,), jnp.int32)
    _, _, _, out = jax.lax.fori_loop(0, num_tokens, body, (prompt_T, prompt_len, key, out))
    return out


def generate_text(params, cfg: Config, prompt: str, num_tokens: int, seed: int = 0) -> str:
    """Prompt in, prompt plus `num_tokens` sampled tokens out, as text."""
    enc = get_tokenizer()
    ids = [50256] + enc.encode_ordinary(prompt)
    T = cfg.data.seq_len
    ids = ids[-T:]
    buf = jnp.zeros((T,), jnp.int32).at[: len(ids)].set(jnp.asarray(ids, jnp.int32))
    out = generate(params, buf, jnp.int32(len(ids)), jax.random.key(seed), cfg=cfg, num_tokens=num_tokens)
    return prompt + enc.decode([int(t) for t in out if int(t) < 50256])
