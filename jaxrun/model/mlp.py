"""The MLP: up-projection, ReLU² (or GELU), down-projection.

Owns `model.mlp` (MLPConfig) and the params `blocks/mlp/*` (stacked over all
layers; the matrices go to Muon) and `blocks/mlp_norm/*`. The fused Pallas
kernel, when chosen, comes through `jaxrun.model.kernels`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxrun.config import ModelConfig
from jaxrun.model import kernels
from jaxrun.model.layers import Initializer, Params, init_norm, linear
from jaxrun.param_table import OptimRow

OPTIM_ROWS = (
    OptimRow(r"blocks/mlp/w_up", "hidden", shape_mult=2.0),
    OptimRow(
        r"blocks/mlp/w_down", "hidden", lr_mul=2.0, shape_mult=2.0
    ),  # record #77: W_proj at twice the lr
    OptimRow(r"blocks/mlp/b_\w+", "scalar"),
    OptimRow(r"blocks/mlp_norm/(gain|bias)", "scalar"),
)


def init(cfg: ModelConfig, rng: Initializer) -> Params:
    L, D, F = cfg.num_layers, cfg.model_dim, cfg.mlp_dim
    if cfg.init == "record":  # W_fc U(±√3·0.5/√D), W_proj zero (record #77)
        mlp = {
            "w_up": rng.uniform((L, D, F), math.sqrt(3) * 0.5 / math.sqrt(D)),
            "w_down": jnp.zeros((L, F, D)),
        }
    elif cfg.init == "speedrun":
        mlp = {"w_up": rng.normal((L, D, F), math.sqrt(0.33 / D)), "w_down": jnp.zeros((L, F, D))}
    else:
        mlp = {"w_up": rng.normal((L, D, F), 0.02), "w_down": rng.normal((L, F, D), 0.02 / math.sqrt(2 * L))}
    if cfg.linear_biases:
        mlp |= {"b_up": jnp.zeros((L, F)), "b_down": jnp.zeros((L, D))}
    out = {"mlp": mlp}
    if norm := init_norm(cfg, L):
        out["mlp_norm"] = norm
    return out


def forward(p: Params, h_BTD: jax.Array, cfg: ModelConfig) -> jax.Array:
    """MLP output [B, T, D] for a normed input, with this layer's params `p`."""
    if cfg.mlp.activation == "gelu":
        return linear(jax.nn.gelu(linear(h_BTD, p, "w_up", "b_up"), approximate=True), p, "w_down", "b_down")
    B, T, D = h_BTD.shape
    y_ND = kernels.relu2_mlp(cfg)(
        h_BTD.reshape(B * T, D), p["w_up"], p["w_down"], p.get("b_up"), p.get("b_down")
    )
    return y_ND.reshape(B, T, D)
