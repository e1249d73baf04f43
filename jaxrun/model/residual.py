"""The residual stream: learned scales and injections, the gated skip, the saved activation, backout.

Owns `model.residual` (ResidualConfig, SkipConfig) and the params
`residual/*`: per-sublayer residual and branch lambdas, per-layer x0 and
bigram injection lambdas, the skip gate, and the backout lambda (all Adam).
Without lambdas a sublayer simply adds its output (x + f(norm(x))).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxrun.config import ModelConfig
from jaxrun.model.layers import Params, mul
from jaxrun.param_table import OptimRow

SKIP_GATE_WIDTH = 12

OPTIM_ROWS = (
    OptimRow(r"residual/resid_lambdas", "scalar", lr_mul=5.0, wd_mul=0.0, betas=(0.9, 0.95)),
    OptimRow(r"residual/(post|x0|bigram)_lambdas", "scalar", wd_mul=0.0, betas=(0.9, 0.95)),
    OptimRow(r"residual/skip_gate", "gate", lr_mul=0.05, wd_mul=0.0, betas=(0.9, 0.99)),
    OptimRow(r"residual/(skip|backout)_lambda", "scalar", lr_mul=5.0, wd_mul=0.0, betas=(0.9, 0.99)),
)


def init(cfg: ModelConfig) -> Params:
    r, L = cfg.residual, cfg.num_layers
    p: Params = {}
    # float32 given, not taken from the Python scalars: a weakly typed leaf would compile the jitted
    # step again once its first update makes it float32
    if r.lambdas:  # record #77's inits: √1.1 per sublayer (1.1 per layer), x0 0, bigram 0.05
        p["resid_lambdas"] = jnp.full((L, 2), math.sqrt(1.1), jnp.float32)
        p["post_lambdas"] = jnp.ones((L, 2))
        p["x0_lambdas"] = jnp.zeros((L,))
        if cfg.embed.bigram is not None:
            p["bigram_lambdas"] = jnp.full((L,), 0.05, jnp.float32)
    if r.skip is not None:
        p["skip_gate"] = jnp.zeros((SKIP_GATE_WIDTH, 1))
        p["skip_lambda"] = jnp.full((), -1.5, jnp.float32)  # σ(-1.5) ≈ 0.18
    if r.backout:
        p["backout_lambda"] = jnp.full((), 0.5, jnp.float32)
    return {"residual": p} if p else {}


def _lam(p: Params, name: str, *index: int, dtype) -> jax.Array:
    return p[name][index].astype(dtype)


def start(p: Params, x0_BTD: jax.Array, bigram_BTD: jax.Array | None) -> jax.Array:
    """The residual entering layer 0: x0, plus the first bigram injection."""
    if bigram_BTD is None:
        return x0_BTD
    return x0_BTD + mul(bigram_BTD, _lam(p, "bigram_lambdas", 0, dtype=x0_BTD.dtype))


def after_attention(p: Params, i: int, x_BTD, a_BTD, x0_BTD, bigram_BTD) -> jax.Array:
    """x ← ρ·x + π·attn + ξ·x0 (+ λ·bigram from layer 1 on), or x + attn without lambdas."""
    if "resid_lambdas" not in p:
        return x_BTD + a_BTD
    dtype = x_BTD.dtype
    resid, post = _lam(p, "resid_lambdas", i, 0, dtype=dtype), _lam(p, "post_lambdas", i, 0, dtype=dtype)
    x_BTD = mul(x_BTD, resid) + mul(a_BTD, post)
    inject = mul(x0_BTD, _lam(p, "x0_lambdas", i, dtype=dtype))
    if bigram_BTD is not None and i > 0:  # layer 0's share entered with `start`
        inject = inject + mul(bigram_BTD, _lam(p, "bigram_lambdas", i, dtype=dtype))
    return x_BTD + inject


def after_mlp(p: Params, i: int, x_BTD, m_BTD) -> jax.Array:
    if "resid_lambdas" not in p:
        return x_BTD + m_BTD
    dtype = x_BTD.dtype
    resid, post = _lam(p, "resid_lambdas", i, 1, dtype=dtype), _lam(p, "post_lambdas", i, 1, dtype=dtype)
    return mul(x_BTD, resid) + mul(m_BTD, post)


def skip_gate(p: Params, x0_BTD: jax.Array) -> jax.Array:
    """σ(λ)·2σ(w · x0[:12]) per token, [B, T, 1] (record #77's layer 3 → 6 skip)."""
    dtype = x0_BTD.dtype
    gate = 2 * jax.nn.sigmoid(x0_BTD[..., :SKIP_GATE_WIDTH] @ p["skip_gate"].astype(dtype))
    return (jax.nn.sigmoid(p["skip_lambda"]) * gate.astype(jnp.float32)).astype(dtype)


def backout(p: Params, x_BTD: jax.Array, saved_BTD: jax.Array) -> jax.Array:
    """x - λ·x_saved: take back most of what the early layers wrote, before the head."""
    return x_BTD - (p["backout_lambda"] * saved_BTD.astype(jnp.float32)).astype(x_BTD.dtype)
