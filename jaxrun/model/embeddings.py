"""The input side: token embedding, learned positions, value embeddings, bigram hash, smear.

Owns `model.embed` (EmbedConfig, ValueEmbedConfig, BigramConfig, SmearConfig)
and the params `embed/*`, `embed_norm/*`, `value_embed/tables`,
`bigram/table` and `smear/*`. Tables are gathered in float32 and then cast, so
their gradients are float32 scatter-adds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrun.config import ModelConfig
from jaxrun.model.attention import Mode
from jaxrun.model.layers import Initializer, Params, init_norm, mul, norm
from jaxrun.param_table import OptimRow

# Hash multipliers of record #77's bigram embedding
BIGRAM_MUL_CURRENT, BIGRAM_MUL_PREVIOUS = 36313, 27191

OPTIM_ROWS = (
    OptimRow(r"embed/(tokens|positions)", "embed", wd_mul=150.0, betas=(0.5, 0.95)),
    OptimRow(r"embed_norm/(gain|bias)", "scalar"),
    OptimRow(r"value_embed/tables", "embed", lr_mul=75.0, wd_mul=5.0, betas=(0.75, 0.95)),
    OptimRow(r"bigram/table", "embed", lr_mul=75.0, wd_mul=5.0, betas=(0.75, 0.95)),
    OptimRow(r"smear/gate", "gate", lr_mul=0.01, wd_mul=0.0, betas=(0.9, 0.99)),
    OptimRow(r"smear/lambda", "scalar", lr_mul=5.0, wd_mul=0.0, betas=(0.9, 0.99)),
)


def init(cfg: ModelConfig, rng: Initializer) -> Params:
    """The input-side params. record #77's token table is the head's transpose: see `gpt.init`."""
    V, D, e = cfg.vocab_size, cfg.model_dim, cfg.embed
    params: Params = {}
    if cfg.init != "record":
        params["embed"] = {"tokens": rng.normal((V, D), 1.0 if cfg.init == "speedrun" else 0.02)}
        if e.learned_positions:
            params["embed"]["positions"] = rng.normal(
                (cfg.max_seq_len, D), 1.0 if cfg.init == "speedrun" else 0.02
            )
    if e.norm and (norm_params := init_norm(cfg)):
        params["embed_norm"] = norm_params
    if e.value is not None:
        params["value_embed"] = {"tables": rng.normal((len(e.value.layers), V, D), 0.01)}
    if e.bigram is not None:
        params["bigram"] = {"table": jnp.zeros((bigram_rows(cfg), D))}
    if e.smear is not None:
        params["smear"] = {"gate": jnp.zeros((e.smear.gate_width, 1)), "lambda": jnp.zeros(())}
    return params


def bigram_rows(cfg: ModelConfig) -> int:
    return cfg.embed.bigram.rows_per_vocab * cfg.vocab_size


def bigram_ids(tokens_BT: jax.Array, rows: int) -> jax.Array:
    """Each position's bigram-table row: a hash of (previous, current) token, per row of tokens.

    Position 0 gets the reserved row M = rows - 1 and stands in as the previous token of
    position 1, as record #77's hash does; products wrap in int32 as there.
    """
    mod = rows - 1
    tok = tokens_BT.astype(jnp.int32)
    prev = jnp.concatenate([jnp.full_like(tok[:, :1], mod), tok[:, 1:-1]], axis=1)
    mixed = jnp.bitwise_xor(BIGRAM_MUL_CURRENT * tok[:, 1:], BIGRAM_MUL_PREVIOUS * prev)
    return jnp.concatenate([jnp.full_like(tok[:, :1], mod), jnp.remainder(mixed, mod)], axis=1)


def token_table(params: Params, cfg: ModelConfig, mode: Mode) -> jax.Array:
    """[V, D]: the head's weight, transposed, while they are tied; else the token embedding."""
    if cfg.head.tie == "until_split" and mode.tied:
        return params["lm_head"]["w"].T
    return params["embed"]["tokens"]


def embed(params: Params, tokens_BT: jax.Array, cfg: ModelConfig, mode: Mode) -> tuple[jax.Array, jax.Array]:
    """(x0, the bigram embedding or None): the normed, smeared token embedding the residual starts from."""
    dtype = jnp.dtype(cfg.compute_dtype)
    T = tokens_BT.shape[1]
    x_BTD = token_table(params, cfg, mode)[tokens_BT].astype(dtype)
    if cfg.embed.learned_positions:
        x_BTD = x_BTD + params["embed"]["positions"][:T].astype(dtype)[None]
    if cfg.embed.smear is not None:
        x_BTD = smear(params["smear"], x_BTD)
    if cfg.embed.norm:
        x_BTD = norm(x_BTD, params.get("embed_norm", {}), cfg)
    bigram_BTD = None
    if cfg.embed.bigram is not None:
        bigram_BTD = params["bigram"]["table"][bigram_ids(tokens_BT, bigram_rows(cfg))].astype(dtype)
    return x_BTD, bigram_BTD


def smear(p: Params, x_BTD: jax.Array) -> jax.Array:
    """x[t] += λ·σ(w · x[t][:12])·x[t-1] for t ≥ 1, across document boundaries (record #77)."""
    dtype = x_BTD.dtype
    gate_BT1 = jax.nn.sigmoid(x_BTD[:, 1:, : p["gate"].shape[0]] @ p["gate"].astype(dtype))
    gate_BT1 = (p["lambda"] * gate_BT1.astype(jnp.float32)).astype(dtype)
    return jnp.concatenate([x_BTD[:, :1], x_BTD[:, 1:] + mul(x_BTD[:, :-1], gate_BT1)], axis=1)


def value_embeddings(params: Params, tokens_BT: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, ...]:
    """One [B, T, D] value embedding per table, in compute dtype (empty when off)."""
    if cfg.embed.value is None:
        return ()
    dtype = jnp.dtype(cfg.compute_dtype)
    tables = params["value_embed"]["tables"]
    return tuple(tables[k][tokens_BT].astype(dtype) for k in range(tables.shape[0]))
