"""The MLP: up-projection, ReLU² (or GELU), down-projection.

Owns `model.mlp` (MLPConfig) and the params `blocks/mlp/*` (stacked over all
layers; the matrices go to Muon) and `blocks/mlp_norm/*`. The fused Pallas
kernel, when chosen, comes through `jaxrun.model.kernels`.

`model.mlp.fp8_up` runs the up-projection as the speedrun's later records do in training: an e4m3
GEMM with current scaling (the input's scale from its amax over the whole micro-batch, the weight's
from its own amax, each mapping the amax to e4m3's largest value 448), float32 accumulation rescaled
to bf16. The gradient does not see the quantization: the backward is the bf16 GEMMs' (the record's
backward takes the bf16 input and weight). Eval stays in bf16.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax.linen import fp8_ops

from jaxrun.config import ModelConfig
from jaxrun.model import kernels
from jaxrun.model.attention import Mode
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


def forward(p: Params, h_BTD: jax.Array, cfg: ModelConfig, mode: Mode | None = None) -> jax.Array:
    """MLP output [B, T, D] for a normed input, with this layer's params `p`."""
    if cfg.mlp.activation == "gelu":
        return linear(jax.nn.gelu(linear(h_BTD, p, "w_up", "b_up"), approximate=True), p, "w_down", "b_down")
    B, T, D = h_BTD.shape
    h_ND = h_BTD.reshape(B * T, D)
    if cfg.mlp.fp8_up and mode is not None and mode.training:  # the config keeps kernels.mlp at "xla"
        pre_NF = fp8_up_projection(h_ND, p["w_up"])
        if "b_up" in p:
            pre_NF = pre_NF + p["b_up"].astype(pre_NF.dtype)
        y_ND = linear(jnp.square(jax.nn.relu(pre_NF)), p, "w_down", "b_down")
    else:
        y_ND = kernels.relu2_mlp(cfg)(h_ND, p["w_up"], p["w_down"], p.get("b_up"), p.get("b_down"))
    return y_ND.reshape(B, T, D)


E4M3 = jnp.float8_e4m3fn


def current_scale(x: jax.Array) -> jax.Array:
    """The scale that maps x's amax to e4m3's largest value (float32; 1e-12 floors an all-zero x)."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)))
    return jnp.maximum(amax, 1e-12) / fp8_ops.get_fp8_max(E4M3, jnp.float32)


@jax.custom_vjp
def fp8_up_projection(h_ND: jax.Array, w_DF: jax.Array) -> jax.Array:
    """h @ w as an e4m3 GEMM with current scaling, float32-accumulated, rounded to h's dtype [N, F]."""
    sx, sw = current_scale(h_ND), current_scale(w_DF)
    h8 = fp8_ops.quantize(h_ND, E4M3, sx, jnp.float32)
    w8 = fp8_ops.quantize(w_DF, E4M3, sw, jnp.float32)
    y_NF = jax.lax.dot_general(h8, w8, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return (y_NF * (sx * sw)).astype(h_ND.dtype)


def _up_forward(h_ND, w_DF):
    return fp8_up_projection(h_ND, w_DF), (h_ND, w_DF)


def _up_backward(res, g_NF):
    h_ND, w_DF = res
    _, vjp = jax.vjp(lambda h, w: h @ w.astype(h.dtype), h_ND, w_DF)  # the bf16 GEMMs', as if unquantized
    return vjp(g_NF)


fp8_up_projection.defvjp(_up_forward, _up_backward)
