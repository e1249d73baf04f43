"""The MLP: up-projection, ReLU² (or GELU), down-projection.

Owns `model.mlp` (MLPConfig) and the params `blocks/mlp/*` (stacked over all
layers; the matrices go to Muon) and `blocks/mlp_norm/*`. The fused Pallas
kernel, when chosen, comes through `jaxrun.model.kernels`.

In training, `model.mlp.fp8_up` and `model.mlp.fp8_down` run the projections as e4m3 GEMMs, as the
speedrun's later records do (jaxrun/model/mlp_fp8.py); eval stays in bf16.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxrun.config import ModelConfig
from jaxrun.model import kernels, mlp_fp8
from jaxrun.model.attention import Mode
from jaxrun.model.layers import Initializer, Params, init_norm, lead, linear
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


def forward(
    p: Params, h_BTD: jax.Array, cfg: ModelConfig, mode: Mode | None = None, fp8: dict | None = None
) -> jax.Array:
    """MLP output [B, T, D] for a normed input, with this layer's params `p` (and, with
    `model.mlp.fp8_down` in training, this layer's delayed scales `fp8`; see mlp_fp8.py)."""
    if cfg.mlp.activation == "gelu":
        return linear(jax.nn.gelu(linear(h_BTD, p, "w_up", "b_up"), approximate=True), p, "w_down", "b_down")
    B, T, D = h_BTD.shape
    h_ND = h_BTD.reshape(B * T, D)
    training = mode is not None and mode.training
    if training and (cfg.mlp.fp8_up or cfg.mlp.fp8_down):  # the config keeps kernels.mlp at "xla"
        if cfg.mlp.fp8_up:
            pre_NF = mlp_fp8.up_projection(h_ND, p["w_up"])
            pre_NF = pre_NF + lead(p["b_up"].astype(pre_NF.dtype), 2) if "b_up" in p else pre_NF
        else:
            pre_NF = linear(h_ND, p, "w_up", "b_up")
        post_NF = jnp.square(jax.nn.relu(pre_NF))
        if cfg.mlp.fp8_down:
            if fp8 is None:
                raise ValueError("model.mlp.fp8_down in training needs the delayed scales: pass fp8=")
            y_ND = mlp_fp8.down_projection(post_NF, p["w_down"], fp8["act_scale"], fp8["w_scale"])
            y_ND = y_ND + lead(p["b_down"].astype(y_ND.dtype), 2) if "b_down" in p else y_ND
        else:
            y_ND = linear(post_NF, p, "w_down", "b_down")
    else:
        y_ND = kernels.relu2_mlp(cfg)(h_ND, p["w_up"], p["w_down"], p.get("b_up"), p.get("b_down"))
    return y_ND.reshape(B, T, D)
