"""The GPT: components composed into one readable forward.

`init(key, cfg)` builds the params, `hidden_states` runs the layers,
`apply` returns softcapped logits and `token_losses`/`loss` the losses. Every
technique is a component's switch (see `jaxrun.config`); which layers use
which technique comes from the layer plan (`jaxrun.model.plan`), and which
kernel runs from `jaxrun.model.kernels`. A `Mode` says where training is
(windows, YaRN, FP8 and multi-token loss, tied embeddings); it is static, so
each mode compiles its own step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrun.config import Config, ModelConfig
from jaxrun.model import attention, embeddings, head, kernels, mlp, residual
from jaxrun.model.attention import Mode
from jaxrun.model.layers import Initializer, Params, add_update, mul, norm, stream_norm
from jaxrun.model.plan import LayerPlan, layer_plan


def _model_cfg(cfg: ModelConfig | Config) -> ModelConfig:
    """Accept a whole run config (what load_checkpoint returns) wherever the model's is meant."""
    return cfg.model if isinstance(cfg, Config) else cfg


def init(key: jax.Array, cfg: ModelConfig | Config) -> Params:
    """Params in float32, drawn as the recipe's `cfg.init` says.

    "speedrun" (train_gpt_simple.py): embeddings N(0, 1), matrices N(0, 0.33/fan_in), output
    projections and the head zero. "gpt2" (llm.c): N(0, 0.02²), residual projections scaled by
    1/√(2L). "record" (record #77): uniform attention and MLP-in, zero MLP-out, head N(0, 0.005²),
    the token embedding a copy of the head's transpose, tables and gates as its components say.
    """
    cfg = _model_cfg(cfg)
    rng = Initializer(key)
    blocks = attention.init(cfg, rng) | mlp.init(cfg, rng)  # this draw order fixes the golden losses
    params = {"blocks": blocks} | embeddings.init(cfg, rng) | head.init(cfg, rng) | residual.init(cfg)
    if cfg.init == "record":
        params["embed"] = {"tokens": params["lm_head"]["w"].T}
    return params


def default_mode(cfg: ModelConfig | Config) -> Mode:
    """Eval as at the end of training, what a notebook or a finished run wants: the final eval
    windows (`windows.final_eval`, else the last stage's) after every long-window change (YaRN)."""
    w = _model_cfg(cfg).attn.windows
    if w is None:
        return Mode()
    longs = [long for _, long in w.stages]
    history = tuple(long for i, long in enumerate(longs) if i == 0 or longs[i - 1] != long)
    return Mode(windows=w.final_eval or w.stages[-1], long_history=history)


def _layer(
    x_BTD, lp: LayerPlan, layer: Params, res: Params, cfg: ModelConfig, mode: Mode, ctx: dict, fp8=None
) -> jax.Array:
    """One layer: attention (or the gated skip), then the MLP, each into the residual.

    `layer` holds this layer's slices of the stacked block params (see `layer_params`), `fp8`
    this layer's row of the MLP's delayed FP8 scales, if any.
    """
    fused_bwd, fold = kernels.rms_norm_bwd(cfg), ctx["fold_bias"]
    if lp.skip_in:
        x_BTD = x_BTD + mul(ctx["skip"], residual.skip_gate(res, ctx["x0"]))
    elif lp.attn_slot is not None:
        if lp.reads_saved:
            h_BTD = norm(ctx["saved"], layer.get("attn_norm", {}), cfg)
        else:
            x_BTD, h_BTD = stream_norm(
                x_BTD, layer.get("attn_norm", {}), cfg, fused_bwd, ctx.pop("pending", None)
            )
        ve = ctx["ve"][lp.value_table] if lp.value_table is not None else None
        attn_p, b_o = _split_bias(layer["attn"], "b_o", fold)
        a_BTD = attention.forward(attn_p, h_BTD, lp, cfg, mode, ctx["segment_ids"], ve)
        if fold:
            ctx["pending"] = (a_BTD, b_o)
        else:
            x_BTD = residual.after_attention(res, lp.index, x_BTD, a_BTD, ctx["x0"], ctx["bigram"])
    x_BTD, h_BTD = stream_norm(x_BTD, layer.get("mlp_norm", {}), cfg, fused_bwd, ctx.pop("pending", None))
    mlp_p, b_down = _split_bias(layer["mlp"], "b_down", fold)
    m_BTD = mlp.forward(mlp_p, h_BTD, cfg, mode, fp8)
    if fold:
        ctx["pending"] = (m_BTD, b_down)
        return x_BTD
    return residual.after_mlp(res, lp.index, x_BTD, m_BTD)


def _folds_output_bias(cfg: ModelConfig) -> bool:
    """Whether each sublayer's output bias joins the stream inside the next norm's fork, whose fused
    backward then sums the bias's gradient in the same pass (`layers.stream_norm`). Only for a plain
    stream `x + f(norm(x))` over unrolled layers: the sublayer's output waits in the trace's
    context until the next norm adds it."""
    r = cfg.residual
    plain = not (r.lambdas or r.skip is not None or r.saved_layer is not None or r.backout)
    return kernels.norm_impl(cfg) == "pallas" and cfg.linear_biases and plain and not cfg.scan_layers


def _split_bias(p: Params, name: str, fold: bool) -> tuple[Params, jax.Array | None]:
    """`p` without its output bias `name`, and that bias, when the bias is folded; else `p` as is."""
    if not fold:
        return p, None
    return {k: v for k, v in p.items() if k != name}, p.get(name)


def layer_params(blocks: Params, lp: LayerPlan) -> Params:
    """Layer `lp`'s params: its slot of the stacked attention weights, its row of the rest.

    The value-embedding gate bank stays whole (the layer picks its table's gate).
    """
    layer = {"mlp": _slice(blocks["mlp"], lp.index)}
    if "mlp_norm" in blocks:
        layer["mlp_norm"] = _slice(blocks["mlp_norm"], lp.index)
    if lp.attn_slot is not None:
        attn = blocks["attn"]
        layer["attn"] = {k: v[lp.attn_slot] for k, v in attn.items() if k not in ("ve_gate", "sa_lambdas")}
        if "ve_gate" in attn:
            layer["attn"]["ve_gate"] = attn["ve_gate"]
        if "sa_lambdas" in attn:
            layer["attn"]["sa_lambdas"] = attn["sa_lambdas"][lp.index]
        if "attn_norm" in blocks:
            layer["attn_norm"] = _slice(blocks["attn_norm"], lp.attn_slot)
    return layer


def _slice(tree: Params, i: int) -> Params:
    return jax.tree.map(lambda w: w[i], tree)


def hidden_states(
    params: Params,
    tokens_BT: jax.Array,
    cfg: ModelConfig | Config,
    segment_ids_BT: jax.Array | None = None,
    mode: Mode | None = None,
    fp8: dict | None = None,
) -> jax.Array:
    """The final normalized hidden states [B, T, D] in the compute dtype.

    `fp8`: the MLP's delayed FP8 scales, [L] each (the train state's; `model.mlp.fp8_down` only).
    """
    cfg = _model_cfg(cfg)
    mode = default_mode(cfg) if mode is None else mode
    res = params.get("residual", {})
    x0_BTD, bigram_BTD = embeddings.embed(params, tokens_BT, cfg, mode)
    ctx = {
        "x0": x0_BTD,
        "bigram": bigram_BTD,
        "ve": embeddings.value_embeddings(params, tokens_BT, cfg),
        "segment_ids": segment_ids_BT,
        "saved": None,
        "skip": None,
        "fold_bias": _folds_output_bias(cfg),
    }
    x_BTD = residual.start(res, x0_BTD, bigram_BTD)
    plan = layer_plan(cfg)
    if cfg.scan_layers:  # identical layers (the config checks it): one traced body over the stack

        def body(x, xs):
            return _layer(x, plan[0], xs[0], res, cfg, mode, ctx, xs[1]), None

        x_BTD, _ = jax.lax.scan(body, x_BTD, (params["blocks"], fp8))
    else:
        for lp in plan:
            layer_fp8 = None if fp8 is None else _slice(fp8, lp.index)
            x_BTD = _layer(x_BTD, lp, layer_params(params["blocks"], lp), res, cfg, mode, ctx, layer_fp8)
            if cfg.residual.skip is not None and lp.index == cfg.residual.skip.source:
                ctx["skip"] = x_BTD
            if lp.index == cfg.residual.saved_layer:
                ctx["saved"] = x_BTD
    if (update := ctx.pop("pending", None)) is not None:  # the last sublayer's output, with its bias
        x_BTD = add_update(x_BTD, update)
    if cfg.residual.backout:
        x_BTD = residual.backout(res, x_BTD, ctx["saved"])
    return norm(x_BTD, params.get("final_norm", {}), cfg)


def apply(
    params: Params,
    tokens_BT: jax.Array,
    cfg: ModelConfig | Config,
    segment_ids_BT: jax.Array | None = None,
    mode: Mode | None = None,
) -> jax.Array:
    """Softcapped float32 logits [B, T, V] for int tokens [B, T]."""
    cfg = _model_cfg(cfg)
    mode = default_mode(cfg) if mode is None else mode
    return head.logits(params, hidden_states(params, tokens_BT, cfg, segment_ids_BT, mode), cfg, mode)


def token_losses(
    params: Params,
    batch: dict[str, jax.Array],
    cfg: ModelConfig | Config,
    mode: Mode | None = None,
    multi_token_weights: jax.Array | None = None,
    fp8: dict | None = None,
) -> jax.Array:
    """Cross-entropy per token [B, T] in float32; zero where targets < 0."""
    cfg = _model_cfg(cfg)
    mode = default_mode(cfg) if mode is None else mode
    h_BTD = hidden_states(params, batch["inputs"], cfg, batch.get("segment_ids"), mode, fp8)
    return head.token_losses(params, h_BTD, batch["targets"], cfg, mode, multi_token_weights)


def loss(
    params: Params, batch: dict[str, jax.Array], cfg: ModelConfig | Config, mode: Mode | None = None
) -> jax.Array:
    """Mean next-token cross-entropy over the batch's scored tokens (targets >= 0)."""
    losses_BT = token_losses(params, batch, cfg, mode)
    return losses_BT.sum() / jnp.maximum((batch["targets"] >= 0).sum(), 1)


def count_params(params: Params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def flops_per_token(cfg: ModelConfig | Config, seq_len: int) -> float:
    """Training FLOPs per token: 6·N for the matmuls plus causal attention."""
    cfg = _model_cfg(cfg)
    L, D, F, HK = cfg.num_layers, cfg.model_dim, cfg.mlp_dim, cfg.num_heads * cfg.head_dim
    La = cfg.num_attn_layers
    matmul_params = La * 4 * D * HK + L * 2 * D * F + D * cfg.vocab_size
    attn = La * 2 * 2 * seq_len * HK / 2  # QK^T and PV, causal half, per token
    return 6 * matmul_params + 3 * attn
