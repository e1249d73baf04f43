"""The MLP's FP8 GEMMs in training (`model.mlp.fp8_up`, `model.mlp.fp8_down`), as modded-nanogpt's
records after #77 run them. Both are e4m3 × e4m3 GEMMs with float32 sums rescaled to bf16, and in
both the gradient does not see the quantization: the backward is the bf16 GEMMs' on the unquantized
input and weight (the records' backward takes the bf16 tensors).

Up-projection, current scaling: each operand's scale maps its amax over the whole tensor (the
micro-batch's input, the layer's weight) to e4m3's largest value, 448.

Down-projection, delayed scaling: the scales come from earlier steps, carried in the train state
(`init_state`, `next_state`):
- the ReLU² activation's scale is max(amax, 1e-12)·1.80/448 of its amax in the previous step's
  forward (1.0 at the first step), values above 448 clamped;
- the weight's scale is max(amax, 1e-12)·1.12/448 of the weight one update earlier, clamped to ±448;
  for the first 16 updates (and at init) it is the current weight's amax/448, with no headroom.
The record keeps one activation scale per layer and rank; jaxrun keeps one per layer, the max over
the step's micro-batches and devices.

The activation amax leaves the backward pass as the "gradient" of the activation scale (the delayed
scaling trick flax's fp8_ops use); the train step combines those with a max, not a sum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax.linen import fp8_ops

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = float(jnp.finfo(E4M3).max)  # 448
ACT_HEADROOM, W_HEADROOM, W_BOOTSTRAP_UPDATES = 1.80, 1.12, 16


def amax_scale(amax: jax.Array, headroom: float = 1.0) -> jax.Array:
    """The scale that maps amax (times the headroom) to 448; 1e-12 floors an all-zero tensor."""
    return jnp.maximum(amax.astype(jnp.float32), 1e-12) * headroom / E4M3_MAX


def _amax(x: jax.Array, axis=None) -> jax.Array:
    return jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axis)


def _scaled_dot(a8: jax.Array, b8: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    y = jax.lax.dot_general(a8, b8, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return (y * scale).astype(dtype)


def _bf16_vjp(x_NK, w_KM, g_NM):
    """The unquantized GEMM's gradients (x's dtype for x, float32 for the master weight)."""
    _, vjp = jax.vjp(lambda x, w: x @ w.astype(x.dtype), x_NK, w_KM)
    return vjp(g_NM)


@jax.custom_vjp
def up_projection(h_ND: jax.Array, w_DF: jax.Array) -> jax.Array:
    """h @ w as an e4m3 GEMM with current scaling, rounded to h's dtype [N, F]."""
    sx, sw = amax_scale(_amax(h_ND)), amax_scale(_amax(w_DF))
    h8 = fp8_ops.quantize(h_ND, E4M3, sx, jnp.float32)
    w8 = fp8_ops.quantize(w_DF, E4M3, sw, jnp.float32)
    return _scaled_dot(h8, w8, sx * sw, h_ND.dtype)


def _up_forward(h_ND, w_DF):
    return up_projection(h_ND, w_DF), (h_ND, w_DF)


def _up_backward(res, g_NF):
    return _bf16_vjp(*res, g_NF)


up_projection.defvjp(_up_forward, _up_backward)


@jax.custom_vjp
def down_projection(
    post_NF: jax.Array, w_FD: jax.Array, act_scale: jax.Array, w_scale: jax.Array
) -> jax.Array:
    """post @ w as an e4m3 GEMM at the delayed scales (fast accumulation), rounded to post's dtype [N, D].

    Its gradient with respect to `act_scale` is not one: it is this forward's activation amax."""
    post8 = fp8_ops.quantize(post_NF, E4M3, act_scale, jnp.float32)  # post >= 0: clamps at 448
    w8 = fp8_ops.quantize(w_FD, E4M3, w_scale, jnp.float32)  # clamps at ±448
    return _scaled_dot(post8, w8, act_scale * w_scale, post_NF.dtype)


def _down_forward(post_NF, w_FD, act_scale, w_scale):
    return down_projection(post_NF, w_FD, act_scale, w_scale), (post_NF, w_FD, w_scale)


def _down_backward(res, g_ND):
    post_NF, w_FD, w_scale = res
    d_post, d_w = _bf16_vjp(post_NF, w_FD, g_ND)
    return d_post, d_w, _amax(post_NF), jnp.zeros_like(w_scale)


down_projection.defvjp(_down_forward, _down_backward)


def init_state(w_down_LFD: jax.Array) -> dict[str, jax.Array]:
    """The delayed scales at step 0: activations at 1.0, weights at their amax/448, per layer [L]."""
    return {
        "act_scale": jnp.ones(w_down_LFD.shape[:1], jnp.float32),
        "w_scale": amax_scale(_amax(w_down_LFD, axis=(1, 2))),
    }


def next_state(
    act_amax_L: jax.Array, w_before_LFD: jax.Array, w_after_LFD: jax.Array, step: jax.Array
) -> dict:
    """The delayed scales after update `step` (0-based), from this step's activation amaxes [L] and the
    down-projection weights before and after the update."""
    bootstrap = amax_scale(_amax(w_after_LFD, axis=(1, 2)))
    delayed = amax_scale(_amax(w_before_LFD, axis=(1, 2)), W_HEADROOM)
    return {
        "act_scale": amax_scale(act_amax_L, ACT_HEADROOM),
        "w_scale": jnp.where(step < W_BOOTSTRAP_UPDATES, bootstrap, delayed),
    }
