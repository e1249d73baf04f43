"""The functional GPT: shapes, finiteness, causality, and the loss at init."""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import launch
from jaxrun import model
from jaxrun.config import (
    AttentionConfig,
    EmbedConfig,
    HeadConfig,
    KernelConfig,
    MLPConfig,
    ModelConfig,
    RopeConfig,
)
from jaxrun.model import embeddings

TINY = {"num_layers": 2, "model_dim": 64, "head_dim": 16, "vocab_size": 256, "max_seq_len": 64}
SIMPLE_STYLE = ModelConfig(**TINY, compute_dtype="float32")
LLMC_STYLE = ModelConfig(
    **TINY,
    norm="layernorm",
    init="gpt2",
    compute_dtype="float32",
    embed=EmbedConfig(learned_positions=True, norm=False),
    attn=AttentionConfig(qk_norm=False, scale=None, rope=None),
    mlp=MLPConfig(activation="gelu"),
    head=HeadConfig(tie="always", softcap="none"),
)
B, T = 2, 64


def tokens(seed=0, vocab=256):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, vocab)


@pytest.mark.parametrize("cfg", [SIMPLE_STYLE, LLMC_STYLE], ids=["simple", "llmc"])
@pytest.mark.parametrize("scan", [True, False])
def test_shapes_and_finite(cfg, scan):
    import dataclasses

    cfg = dataclasses.replace(cfg, scan_layers=scan, init="gpt2")
    params = model.init(jax.random.key(0), cfg)
    logits = model.apply(params, tokens(), cfg)
    chex.assert_shape(logits, (B, T, cfg.vocab_size))
    chex.assert_tree_all_finite((params, logits))
    assert logits.dtype == jnp.float32


def test_scan_and_unrolled_layers_agree():
    import dataclasses

    cfg = dataclasses.replace(SIMPLE_STYLE, init="gpt2")
    params = model.init(jax.random.key(1), cfg)
    a = model.apply(params, tokens(), cfg)
    b = model.apply(params, tokens(), dataclasses.replace(cfg, scan_layers=False))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [SIMPLE_STYLE, LLMC_STYLE], ids=["simple", "llmc"])
def test_causal_through_gradients(cfg):
    """Token i sits only at position i, so d(hidden at t)/d(embedding row i) = 0 for i > t.

    Hidden states rather than logits: a tied head reads every embedding row.
    """
    import dataclasses

    cfg = dataclasses.replace(cfg, vocab_size=T, init="gpt2")
    params = model.init(jax.random.key(2), cfg)
    seq = jnp.arange(T)[None]
    probe_D = jax.random.normal(jax.random.key(9), (cfg.model_dim,))  # a plain sum is 0 after LayerNorm
    for t in (0, 17, T - 1):
        grads = jax.grad(lambda p, t=t: (model.hidden_states(p, seq, cfg)[0, t] * probe_D).sum())(params)
        row_norms = jnp.linalg.norm(grads["embed"]["tokens"], axis=-1)
        assert float(row_norms[t + 1 :].max(initial=0.0)) == 0.0, f"position {t} sees the future"
        assert float(row_norms[: t + 1].min()) > 0.0, f"position {t} ignores its past"


def test_init_loss_is_log_vocab_for_zero_head():
    """The speedrun init zeroes the head, so every logit is 0 and the loss is ln(50304) exactly."""
    import dataclasses

    cfg = dataclasses.replace(SIMPLE_STYLE, vocab_size=50304)
    params = model.init(jax.random.key(3), cfg)
    batch = {"inputs": tokens(3, 50257), "targets": tokens(4, 50257)}
    assert float(model.loss(params, batch, cfg)) == pytest.approx(math.log(50304), abs=1e-4)


def test_gpt2_init_loss_is_near_log_vocab():
    params = model.init(jax.random.key(3), LLMC_STYLE)
    batch = {"inputs": tokens(3), "targets": tokens(4)}
    assert float(model.loss(params, batch, LLMC_STYLE)) == pytest.approx(math.log(256), abs=0.05)


def test_ignored_targets_carry_no_loss():
    import dataclasses

    cfg = dataclasses.replace(SIMPLE_STYLE, init="gpt2")
    params = model.init(jax.random.key(5), cfg)
    targets = tokens(6).at[:, T // 2 :].set(model.IGNORE_INDEX)
    losses = model.token_losses(params, {"inputs": tokens(5), "targets": targets}, cfg)
    assert float(jnp.abs(losses[:, T // 2 :]).max()) == 0.0
    assert float(losses[:, : T // 2].min()) > 0.0


def test_document_mask_blocks_attention_across_documents():
    """With segment ids, logits of document 2 do not depend on document 1's tokens."""
    import dataclasses

    cfg = dataclasses.replace(SIMPLE_STYLE, init="gpt2")
    params = model.init(jax.random.key(7), cfg)
    seg = jnp.concatenate([jnp.zeros((B, 20), jnp.int32), jnp.ones((B, T - 20), jnp.int32)], axis=1)
    a, b = tokens(8), tokens(8).at[:, :20].set(3)
    la, lb = model.apply(params, a, cfg, seg), model.apply(params, b, cfg, seg)
    np.testing.assert_allclose(la[:, 20:], lb[:, 20:], rtol=1e-5, atol=1e-5)
    assert not np.allclose(la[:, :20], lb[:, :20])


def test_rotary_half_truncated():
    cfg = ModelConfig(head_dim=128, model_dim=768)
    cos, sin = model.rotary_tables(cfg, 16)
    chex.assert_shape((cos, sin), (16, 64))
    np.testing.assert_array_equal(sin[:, 32:], 0.0)  # the second half of the frequencies are zero
    np.testing.assert_allclose(cos[1, 0], math.cos(1.0), rtol=1e-6)
    np.testing.assert_allclose(sin[1, 31], math.sin(1 / 1024), rtol=1e-5)


@pytest.mark.slow
def test_pallas_impls_match_xla():
    """attention, MLP and loss through the Pallas kernels (interpreted on CPU) equal the XLA path."""
    import dataclasses

    cfg = dataclasses.replace(SIMPLE_STYLE, init="gpt2")
    fused = dataclasses.replace(cfg, kernels=KernelConfig(attention="pallas", mlp="pallas", loss="pallas"))
    params = model.init(jax.random.key(11), cfg)
    batch = {"inputs": tokens(12), "targets": tokens(13)}
    loss_xla, grads_xla = jax.value_and_grad(model.loss)(params, batch, cfg)
    loss_pallas, grads_pallas = jax.value_and_grad(model.loss)(params, batch, fused)
    np.testing.assert_allclose(loss_pallas, loss_xla, rtol=1e-4)
    chex.assert_trees_all_close(grads_pallas, grads_xla, rtol=2e-2, atol=2e-4)


def test_mosaic_attention_runs_every_pass_in_mosaic(monkeypatch):
    """`kernels.attention='mosaic'` takes the Mosaic forward with documents and the Mosaic backward
    (the Mosaic GPU simulator on CPU), where 'pallas' would take Triton for both, and gives the
    plain-jnp attention's output and gradients in bf16."""
    from jaxrun.model import kernels
    from pallas_kernels import attention_mgpu, attention_mgpu_bwd

    calls = []
    for module, name in ((attention_mgpu, "forward"), (attention_mgpu_bwd, "backward")):
        original = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda *a, _f=original, _n=name, **kw: calls.append(_n) or _f(*a, **kw)
        )
    cfg = ModelConfig(
        **TINY | {"head_dim": 64}, compute_dtype="bfloat16", kernels=KernelConfig(attention="mosaic")
    )
    rng = np.random.default_rng(16)
    q, k, v, dy = (jnp.asarray(rng.standard_normal((1, 256, 1, 64)), jnp.bfloat16) for _ in range(4))
    seg = jnp.asarray(np.repeat([0, 1, 2], [37, 100, 119])[None], jnp.int32)

    def attend(fn):
        return lambda q, k, v: fn(q, k, v, scale=0.12, segment_ids_BT=seg, window=96)

    y, vjp = jax.vjp(attend(kernels.attention(cfg)), q, k, v)
    grads = vjp(dy)
    assert set(calls) == {"forward", "backward"}
    y_ref, vjp_ref = jax.vjp(attend(kernels.attention_xla), *(x.astype(jnp.float32) for x in (q, k, v)))
    for name, got, ref in zip(
        ("y", "dq", "dk", "dv"), (y, *grads), (y_ref, *vjp_ref(dy.astype(jnp.float32)))
    ):
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref))) / float(jnp.max(jnp.abs(ref)))
        assert err < 2e-2, f"{name}: {err:.2e} of its largest entry"


def test_mosaic_mlp_matches_xla():
    """The MLP with its epilogue GEMMs as Hopper kernels (in the Mosaic GPU simulator on CPU) gives
    the XLA path's loss and gradients in bf16: the same function, rounded in other places (the
    kernels keep ReLU² and its gradient in float32 up to their one bf16 output)."""
    import dataclasses

    cfg = dataclasses.replace(SIMPLE_STYLE, init="gpt2", compute_dtype="bfloat16")
    mosaic = dataclasses.replace(cfg, kernels=KernelConfig(mlp="mosaic"))
    params = model.init(jax.random.key(12), cfg)
    batch = {"inputs": tokens(14), "targets": tokens(15)}
    loss_xla, grads_xla = jax.value_and_grad(model.loss)(params, batch, cfg)
    loss_mosaic, grads_mosaic = jax.value_and_grad(model.loss)(params, batch, mosaic)
    np.testing.assert_allclose(loss_mosaic, loss_xla, rtol=1e-4)
    for path, g, g_ref in zip(
        jax.tree_util.tree_leaves_with_path(grads_mosaic),
        jax.tree.leaves(grads_mosaic),
        jax.tree.leaves(grads_xla),
    ):
        scale = float(jnp.max(jnp.abs(g_ref))) or 1.0
        err = float(jnp.max(jnp.abs(g.astype(jnp.float32) - g_ref.astype(jnp.float32)))) / scale
        assert err < 2e-2, f"{jax.tree_util.keystr(path[0])}: {err:.2e} of its largest entry"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_pallas_norm_matches_xla(dtype, scan):
    """The fused RMSNorm backward (interpreted on CPU) gives autodiff's gradients: same loss, and
    every gradient within a few roundings (bf16: the stream's gradient is rounded as autodiff does).
    Unrolled, each sublayer's output bias moves into the next norm's fork, which sums its gradient
    in float32 (XLA on the CPU sums autodiff's in bf16: the largest gap, about 1e-2)."""
    import dataclasses

    from jaxrun.model import gpt

    cfg = dataclasses.replace(SIMPLE_STYLE, init="gpt2", compute_dtype=dtype, scan_layers=scan)
    fused = dataclasses.replace(cfg, kernels=KernelConfig(norm="pallas"))
    assert gpt._folds_output_bias(fused) == (not scan)
    params = model.init(jax.random.key(12), cfg)
    batch = {"inputs": tokens(14), "targets": tokens(15)}
    loss_xla, grads_xla = jax.value_and_grad(model.loss)(params, batch, cfg)
    loss_pallas, grads_pallas = jax.value_and_grad(model.loss)(params, batch, fused)
    np.testing.assert_allclose(loss_pallas, loss_xla, rtol=1e-6)  # the same forward
    tol = {"float32": 1e-6, "bfloat16": 1.5e-2}[dtype]
    _assert_grads_close(grads_pallas, grads_xla, tol)


def test_pallas_norm_in_record77_matches_xla():
    """The fused RMSNorm backward in record #77's residual stream (lambdas, the gated skip, the
    saved layer-7 activation and its backout; no gains, no biases; interpreted on CPU) at a stage-2
    step, documents and both windows in play. In float32 it gives autodiff's loss and gradients.
    In bf16 the two round the stream's gradient at different places (up to 2% apart on the x0
    lambdas), so both are held to the float32 gradients: the fused path no farther from them than
    autodiff, within 10% and 3e-3 of the leaf's largest entry (seen: 7%, 1.8e-3)."""
    from jaxrun import schedule
    from tests.test_parity_record77 import jax_loss_and_grads, packed_batch, perturbed_params, tiny

    def fused(cfg):
        kernels = dataclasses.replace(cfg.model.kernels, norm="pallas")
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kernels=kernels))

    f32, bf16 = tiny("float32"), tiny("bfloat16")
    step = 10  # stage 2 of the test schedule: untied, the long windows, 128 tokens per rank
    assert not schedule.train_mode(f32, step).tied
    params, batch = perturbed_params(f32, tied=False), packed_batch(128, seed=1)
    loss, want = jax_loss_and_grads(f32, params, batch, step)
    loss_pallas, grads = jax_loss_and_grads(fused(f32), params, batch, step)
    np.testing.assert_allclose(loss_pallas, loss, rtol=1e-6)  # the same forward
    _, xla_bf16 = jax_loss_and_grads(bf16, params, batch, step)
    _, pallas_bf16 = jax_loss_and_grads(fused(bf16), params, batch, step)
    gap = lambda got, name: np.max(np.abs(got[name] - want[name])) / (np.max(np.abs(want[name])) or 1.0)
    for name in want:
        assert gap(grads, name) <= 2e-6, f"{name}: {gap(grads, name):.3g} from autodiff in float32"
        xla, pallas = gap(xla_bf16, name), gap(pallas_bf16, name)
        assert pallas <= 1.1 * xla + 3e-3, f"{name}: bf16 {pallas:.3g} from float32, autodiff's {xla:.3g}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pallas_logit_passes_match_xla(dtype):
    """The fused head loss with both passes over the logits as Pallas kernels (interpreted on
    CPU) gives the XLA passes' loss and gradients: the log-sum-exp summed in another order (and,
    in bf16, z + b rounded to bf16 where XLA keeps it in float32), every gradient within a bf16
    rounding of dL/dz."""
    import dataclasses

    cfg = dataclasses.replace(
        SIMPLE_STYLE, init="gpt2", compute_dtype=dtype, kernels=KernelConfig(loss="xla_fused")
    )
    fused = dataclasses.replace(
        cfg, kernels=KernelConfig(loss="xla_fused", logit_lse="pallas", logit_grad="pallas")
    )
    params = model.init(jax.random.key(16), cfg)
    batch = {"inputs": tokens(17), "targets": tokens(18)}
    loss_xla, grads_xla = jax.value_and_grad(model.loss)(params, batch, cfg)
    loss_pallas, grads_pallas = jax.value_and_grad(model.loss)(params, batch, fused)
    np.testing.assert_allclose(loss_pallas, loss_xla, rtol={"float32": 1e-6, "bfloat16": 1e-4}[dtype])
    tol = {"float32": 1e-6, "bfloat16": 1e-2}[dtype]
    _assert_grads_close(grads_pallas, grads_xla, tol)


@pytest.mark.parametrize("biases", [True, False], ids=["biases", "no_biases"])
def test_pallas_qkv_matches_xla(biases):
    """The q/k/v projections' backward as one Pallas pass and one GEMM per gradient (interpreted on
    CPU). In float32 it gives autodiff's gradients. In bf16 the forward is the same, and against
    the float32 model's gradients it is at least as close as autodiff: its weight gradients leave
    the GEMM in float32 and dL/dh is one float32 sum over q, k and v, where autodiff rounds each
    GEMM's output to bf16 (and XLA on the CPU accumulates bf16 dots in bf16)."""
    import dataclasses

    base = dataclasses.replace(
        SIMPLE_STYLE, init="gpt2", linear_biases=biases, head_dim=32
    )  # heads >= 32 wide
    params = model.init(jax.random.key(19), base)
    if biases:  # nonzero biases, so their gradients pass through a shifted projection
        params = jax.tree_util.tree_map_with_path(
            lambda path, x: x + 0.1 if "b_" in jax.tree_util.keystr(path) else x, params
        )
    batch = {"inputs": tokens(20), "targets": tokens(21)}
    grads = {}
    for dtype in ("float32", "bfloat16"):
        cfg = dataclasses.replace(base, compute_dtype=dtype)
        fused = dataclasses.replace(cfg, kernels=KernelConfig(qkv="pallas"))
        loss_xla, grads[dtype, "xla"] = jax.value_and_grad(model.loss)(params, batch, cfg)
        loss_pallas, grads[dtype, "pallas"] = jax.value_and_grad(model.loss)(params, batch, fused)
        assert loss_pallas == loss_xla, dtype  # the forward is the same XLA
    _assert_grads_close(grads["float32", "pallas"], grads["float32", "xla"], 1e-5)
    exact = grads["float32", "xla"]
    for path, want in jax.tree_util.tree_leaves_with_path(exact):
        scale = float(jnp.max(jnp.abs(want))) or 1.0
        errs = {
            impl: float(jnp.max(jnp.abs(_leaf(grads["bfloat16", impl], path) - want))) / scale
            for impl in ("xla", "pallas")
        }
        assert errs["pallas"] <= 1.1 * errs["xla"] + 1e-3, f"{jax.tree_util.keystr(path)}: {errs}"


def _leaf(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def _assert_grads_close(grads, want, tol):
    """Every leaf within `tol` of `want`'s, relative to that leaf's largest entry; names the leaf."""
    for path, g in jax.tree_util.tree_leaves_with_path(want):
        got = _leaf(grads, path)
        scale = float(jnp.max(jnp.abs(g))) or 1.0
        err = float(jnp.max(jnp.abs(got - g))) / scale
        assert err <= tol, f"{jax.tree_util.keystr(path)}: {err:.3g} of max {scale:.3g}"


def test_kernel_switches_are_validated():
    from jaxrun.config import ConfigError

    with pytest.raises(ConfigError, match="kernels.mlp='pallas' fuses ReLU²"):
        ModelConfig(kernels=KernelConfig(mlp="pallas"), mlp=MLPConfig(activation="gelu"))
    with pytest.raises(ConfigError, match="kernels.mlp='mosaic' runs bf16 GEMMs.*model_dim=96"):
        ModelConfig(kernels=KernelConfig(mlp="mosaic"), model_dim=96, head_dim=32)
    with pytest.raises(ConfigError, match="kernels.mlp='mosaic' runs bf16 GEMMs.*compute_dtype='float32'"):
        ModelConfig(kernels=KernelConfig(mlp="mosaic"), compute_dtype="float32")
    with pytest.raises(ConfigError, match="kernels.attention='mosaic' runs bf16 wgmma.*head_dim=32"):
        ModelConfig(kernels=KernelConfig(attention="mosaic"), model_dim=96, head_dim=32)
    with pytest.raises(ConfigError, match="kernels.loss='pallas' supports softcap 'isru'"):
        ModelConfig(kernels=KernelConfig(loss="pallas"), head=HeadConfig(softcap="tanh"))
    with pytest.raises(ConfigError, match="kernels.logit_grad='pallas' is a pass of the fused head loss"):
        ModelConfig(kernels=KernelConfig(loss="xla", logit_grad="pallas"))
    with pytest.raises(ConfigError, match="kernels.logit_lse='pallas' is a pass of the fused head loss"):
        ModelConfig(kernels=KernelConfig(loss="xla", logit_lse="pallas"))
    with pytest.raises(ConfigError, match="kernels.norm='pallas' is RMSNorm's backward"):
        ModelConfig(kernels=KernelConfig(norm="pallas"), norm="layernorm")
    with pytest.raises(ConfigError, match="kernels.qkv='pallas' is the backward of QK-norm"):
        ModelConfig(
            kernels=KernelConfig(qkv="pallas"), attn=AttentionConfig(rope=RopeConfig(pairing="interleaved"))
        )


def test_eval_losses_in_chunks_equal_whole(monkeypatch):
    """Long val rows are scored a chunk of tokens at a time; the losses are the same."""
    import dataclasses

    from jaxrun.model import head

    cfg = dataclasses.replace(SIMPLE_STYLE, init="gpt2")
    params = model.init(jax.random.key(21), cfg)
    batch = {"inputs": tokens(22), "targets": tokens(23)}
    whole = model.token_losses(params, batch, cfg)
    monkeypatch.setattr(head, "EVAL_CHUNK", 32)
    chunked = model.token_losses(params, batch, cfg)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)


def test_default_mode_is_the_final_validation_of_a_finished_run():
    """A notebook's `model.apply(params, tokens, cfg)` on a windowed recipe evaluates as the run's
    last validation did: its final windows after every YaRN change."""
    from configs import record77
    from jaxrun import schedule

    cfg = record77.get_config()
    assert model.default_mode(cfg) == schedule.eval_mode(cfg, cfg.train.steps)
    assert model.default_mode(cfg).windows == (6, 20)


def test_bf16_token_embedding_gradient_sums_in_float32():
    """One token 4,096 times: in bf16 its embedding row's gradient is still the float32 one.

    The row is gathered in float32 and cast after, so its gradient sums in float32, as PyTorch's
    GPU embedding backward does. Cast first and the gather's transpose is a bf16 scatter-add:
    once the sum is 256 times a term, each further term rounds away (89% off here).
    """
    cfg = dataclasses.replace(
        launch.load_config("simple").model, model_dim=64, head_dim=16, vocab_size=256, num_layers=2
    )
    params = model.init(jax.random.key(0), cfg)
    tokens = jnp.zeros((4, 1024), jnp.int32)
    weights = (jnp.arange(64, dtype=jnp.float32) / 64)[None, None]

    def row_gradient(dtype):
        c = dataclasses.replace(cfg, compute_dtype=dtype)

        def f(table):
            x0, _ = embeddings.embed(params | {"embed": {"tokens": table}}, tokens, c, model.default_mode(c))
            return jnp.sum(x0.astype(jnp.float32) * weights)

        return np.asarray(jax.grad(f)(params["embed"]["tokens"])[0])

    bf16, f32 = row_gradient("bfloat16"), row_gradient("float32")
    assert np.max(np.abs(bf16 - f32)) <= 2e-2 * np.max(np.abs(f32))
