"""Record #77's fused training head (head_mtp_loss, pallas_kernels/mtp_ce) against plain-jnp autodiff.

The loss-and-gradient pass over bf16 logits (XLA and the Pallas kernel, interpreted) must give the
losses and e5m2 logit gradient of autodiff; the whole custom VJP (FP8 GEMM, pass, FP8 backward
GEMMs) the losses and gradients of jaxrun's plain head (`head.fp8_matmul` under autodiff), in
float32 and bf16, with 1 to 3 multi-token terms (one weight zero), ignored targets and rows whose
t + k runs past their end; and only the e5m2 gradient may reach the backward.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrun.config import ConfigError, FP8HeadConfig, HeadConfig, KernelConfig, ModelConfig
from jaxrun.model import head, head_mtp_loss, kernels
from jaxrun.model.attention import Mode
from pallas_kernels import mtp_ce as mtp_ce_kernel

N, D, V, T = 96, 64, 300, 16  # 6 rows of 16 tokens
SCALES = FP8HeadConfig()
WEIGHTS = {1: (1.0,), 2: (1.0, 0.5), 3: (1.0, 0.0, 0.25)}  # K=3 has a zero weight
LOSS_TOL = {"atol": 1e-5, "rtol": 1e-5}  # float32 sums; the log-sum-exp is shifted by c, not the row max
# The e5m2 gradient (2 mantissa bits): float32 values that differ in the last bit (the shift above,
# the order of the additions) now and then round to neighbouring e5m2 values, a step of 2^-2 of
# themselves. Such flips must stay rare and one step wide.
E5M2_FLIP_FRAC, E5M2_STEP = 1e-3, 0.25
# dh and dw (divided by max|reference|): the same flips seen through the GEMMs (read the comment on
# FP8_HEAD_GRAD_TOL in tests/test_parity_record77.py).
GRAD_TOL = 1e-3
# A cotangent g other than 1: the fused path rounds dL/dl to e5m2 and then scales by g (and rounds
# h·g/max|g| to e4m3 for dW), autodiff rounds g·dL/dl to e5m2. The largest entries of a row (the
# targets') can then land a whole e5m2 step (2^-2 of themselves) apart, and at this small V they
# dominate dh and dw; a dropped or doubled g would be off by up to 75% here (g in [0.25, 1]).
SCALED_GRAD_TOL = 0.15


def _inputs(seed, dtype=jnp.bfloat16):
    """Hidden states and head weight inside the e4m3 range of their static scales (|w| < 1.6),
    raw logits of std ~6; one target in eight ignored."""
    k = jax.random.split(jax.random.key(seed), 4)
    h = (3.0 * jax.random.normal(k[0], (N, D))).astype(dtype)
    w = 0.25 * jax.random.normal(k[1], (D, V))
    t = jax.random.randint(k[2], (N,), 0, V)
    return h, w, jnp.where(jax.random.uniform(k[3], (N,)) < 0.125, -1, t)


def _close(name, actual, expected, tol):
    scale = float(jnp.max(jnp.abs(expected.astype(jnp.float32)))) or 1.0
    chex.assert_shape(actual, expected.shape)
    chex.assert_tree_all_finite(actual)
    a, e = (x.astype(jnp.float32) / scale for x in (actual, expected))
    np.testing.assert_allclose(a, e, atol=tol, rtol=0, err_msg=f"{name} (max|ref| {scale:.3g})")


def _assert_e5m2_close(actual, expected):
    assert actual.dtype == expected.dtype == jnp.float8_e5m2
    a, e = actual.astype(jnp.float32), expected.astype(jnp.float32)
    assert float(jnp.abs(e).max()) > 0
    differ = a != e
    assert float(differ.mean()) <= E5M2_FLIP_FRAC, f"{int(differ.sum())} of {a.size} gradients differ"
    assert bool(jnp.all(jnp.abs(a - e) <= E5M2_STEP * jnp.abs(e) + 2.0**-16)), "a flip wider than one step"


CE_PASSES = {
    "xla": head_mtp_loss.mtp_ce_xla,
    "pallas": lambda *a, **kw: mtp_ce_kernel.mtp_ce(
        *a, **kw, block_sizes=mtp_ce_kernel.BlockSizes(block_n=8, block_v=128), interpret=True
    ),
}


@pytest.mark.parametrize("n_terms", [1, 2, 3])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_ce_pass_matches_autodiff(impl, n_terms):
    """Losses, term losses and the e5m2 gradient of one pass over bf16 logits, V not a multiple of 128."""
    logits = (8.0 * jax.random.normal(jax.random.key(n_terms), (N, V))).astype(jnp.bfloat16)
    _, _, t = _inputs(10 + n_terms)
    targets_NK = head_mtp_loss.shifted_targets(t, T, n_terms)
    weights = jnp.array(WEIGHTS[n_terms])
    kw = {"cap_value": 23.0, "grad_scale": SCALES.grad_scale}
    losses, ce, g8 = jax.jit(lambda *a: CE_PASSES[impl](*a, **kw))(logits, targets_NK, weights)
    losses_ref, ce_ref, g8_ref = head_mtp_loss.mtp_ce_reference(logits, targets_NK, weights, **kw)
    np.testing.assert_allclose(losses, losses_ref, **LOSS_TOL)
    np.testing.assert_allclose(ce, ce_ref, **LOSS_TOL)
    no_term = jnp.all(targets_NK < 0, axis=1)
    assert bool(no_term.any()) and float(jnp.abs(losses[no_term]).max()) == 0.0
    _assert_e5m2_close(g8, g8_ref)
    # the kernel file's own reference is the same function
    np.testing.assert_array_equal(
        mtp_ce_kernel.mtp_ce_reference(logits, targets_NK, weights, **kw)[2], g8_ref
    )


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_ce_pass_rounds_float32_logits_as_it_reads_them(impl):
    """The head hands the pass the FP8 GEMM's float32 logits: they must give exactly what their bf16
    rounding gives."""
    logits = 8.0 * jax.random.normal(jax.random.key(4), (N, V))
    _, _, t = _inputs(14)
    args = (head_mtp_loss.shifted_targets(t, T, 3), jnp.array(WEIGHTS[3]))
    run = jax.jit(lambda *a: CE_PASSES[impl](*a, cap_value=23.0, grad_scale=SCALES.grad_scale))
    chex.assert_trees_all_equal(run(logits, *args), run(logits.astype(jnp.bfloat16), *args))


def test_ce_pass_wants_an_even_vocabulary():
    logits = jnp.zeros((8, 301), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"vocabulary \(301\) must be even"):
        CE_PASSES["pallas"](logits, jnp.zeros((8, 1), jnp.int32), jnp.ones(1), cap_value=23.0, grad_scale=1.0)


def test_shifted_targets_stop_at_the_row_end():
    t = jnp.arange(2 * 4)
    np.testing.assert_array_equal(
        head_mtp_loss.shifted_targets(t, 4, 3)[:4], [[0, 1, 2], [1, 2, 3], [2, 3, -1], [3, -1, -1]]
    )
    assert int(head_mtp_loss.shifted_targets(t, 4, 6)[0, 5]) == -1  # a term longer than the row


def _loss_and_grads(fn, h, w, t, weights, g=None):
    losses, vjp = jax.vjp(lambda h, w, weights: fn(h, w, t, weights, row_len=T, scales=SCALES), h, w, weights)
    return losses, vjp(jnp.ones_like(losses) if g is None else g)


def _fused(impl, **kw):
    return lambda *a, **kw2: head_mtp_loss.fp8_mtp_loss(*a, **kw2, **kw, ce=CE_PASSES[impl])


@pytest.mark.parametrize("n_terms", [1, 2, 3])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_head_matches_the_autodiff_head(impl, dtype, n_terms):
    h, w, t = _inputs(n_terms + 3 * (dtype == jnp.float32), dtype)
    weights = jnp.array(WEIGHTS[n_terms])
    run = jax.jit(_loss_and_grads, static_argnums=0)
    losses, grads = run(_fused(impl), h, w, t, weights)
    losses_ref, grads_ref = run(head_mtp_loss.fp8_mtp_loss_reference, h, w, t, weights)
    np.testing.assert_allclose(losses, losses_ref, **LOSS_TOL)
    for name, a, e in zip(("dh", "dw", "dweights"), grads, grads_ref):
        assert a.dtype == e.dtype, name
        _close(name, a, e, GRAD_TOL)


def test_row_blocks_equal_one_block():
    h, w, t = _inputs(21)
    weights = jnp.array(WEIGHTS[3])
    run = jax.jit(_loss_and_grads, static_argnums=0)
    losses, grads = run(_fused("xla"), h, w, t, weights)
    losses_b, grads_b = run(_fused("xla", row_block=32), h, w, t, weights)
    np.testing.assert_array_equal(losses_b, losses)
    chex.assert_trees_all_equal(grads_b[:2], grads[:2])
    np.testing.assert_allclose(grads_b[2], grads[2], rtol=1e-6)  # dweights: a sum over N in another order


def test_other_cotangents_scale_the_rows():
    """Training feeds ones; a per-token cotangent g scales dh exactly and dW up to e4m3 rounding."""
    h, w, t = _inputs(31, jnp.float32)
    weights = jnp.array(WEIGHTS[2])
    g = jax.random.uniform(jax.random.key(32), (N,), minval=0.25, maxval=1.0)
    run = jax.jit(_loss_and_grads, static_argnums=0)
    _, (dh, dw, dweights) = run(_fused("xla"), h, w, t, weights, g)
    _, (dh_ref, dw_ref, dweights_ref) = run(head_mtp_loss.fp8_mtp_loss_reference, h, w, t, weights, g)
    _close("dweights", dweights, dweights_ref, 1e-5)
    _, (dh_unit, _, _) = run(_fused("xla"), h, w, t, weights)
    _close("dh", dh, dh_unit.astype(jnp.float32) * g[:, None], 2.0**-7)  # dh_unit is rounded to bf16 first
    _close("dh vs autodiff", dh, dh_ref, SCALED_GRAD_TOL)  # autodiff rounds g·dL/dl to e5m2 instead
    _close("dw", dw, dw_ref, SCALED_GRAD_TOL)
    _, (_, dw_uniform, _) = run(_fused("xla"), h, w, t, weights, jnp.full((N,), 0.5))
    _, (_, dw_unit, _) = run(_fused("xla"), h, w, t, weights)
    np.testing.assert_array_equal(dw_uniform, 0.5 * dw_unit)  # a uniform cotangent is exact


def _nv_residuals(fn):
    h, w, t = _inputs(5)
    _, vjp = jax.vjp(lambda h, w: fn(h, w, t, jnp.array(WEIGHTS[3]), row_len=T, scales=SCALES), h, w)
    return sorted(str(x.dtype) for x in jax.tree.leaves(vjp) if x.shape == (N, V))


def test_only_the_e5m2_gradient_reaches_the_backward():
    """The plain path keeps float32 [N, V] residuals; the fused one keeps 1 byte a logit, as compiled."""
    assert "float32" in _nv_residuals(head_mtp_loss.fp8_mtp_loss_reference)
    assert _nv_residuals(head_mtp_loss.fp8_mtp_loss) == ["float8_e5m2"]
    h, w, t = _inputs(6)

    def residual_bytes(fn):
        def forward(h, w):
            return jax.vjp(lambda h, w: fn(h, w, t, jnp.array(WEIGHTS[3]), row_len=T, scales=SCALES), h, w)[1]

        return jax.jit(forward).lower(h, w).compile().memory_analysis().output_size_in_bytes

    fused, plain = (
        residual_bytes(head_mtp_loss.fp8_mtp_loss),
        residual_bytes(head_mtp_loss.fp8_mtp_loss_reference),
    )
    assert N * V <= fused < N * V + 2 * (N * D + D * V), fused  # e5m2 gradient, h, e4m3 weight, [N, K]
    assert plain >= 4 * N * V, plain


def _record_head(loss: str) -> ModelConfig:
    head_cfg = HeadConfig(
        softcap="sigmoid", softcap_value=23.0, fp8=SCALES, multi_token=(((1.0, 0.5, 0.25),) * 2,)
    )
    return ModelConfig(
        vocab_size=V,
        model_dim=D,
        head_dim=16,
        linear_biases=False,
        head=head_cfg,
        kernels=KernelConfig(loss=loss),
    )


@pytest.mark.parametrize("loss", ["xla_fused", "pallas"])
def test_token_losses_follow_the_kernel_switch(loss):
    """`head.token_losses` in training runs the fused head under `model.kernels.loss`; eval stays plain."""
    h, w, t = _inputs(41)
    params = {"lm_head": {"w": w}}
    h_BTD, t_BT = h.reshape(-1, T, D), t.reshape(-1, T)
    weights = jnp.array(WEIGHTS[3])

    def value_and_grad(cfg, mode):
        fn = lambda p, h: head.token_losses(p, h, t_BT, cfg, mode, weights).sum()
        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(params, h_BTD)

    train = Mode(training=True)
    loss_ref, grads_ref = value_and_grad(_record_head("xla"), train)
    loss_f, grads_f = value_and_grad(_record_head(loss), train)
    np.testing.assert_allclose(loss_f, loss_ref, rtol=1e-5)
    for name, a, e in zip(("dw", "dh"), jax.tree.leaves(grads_f), jax.tree.leaves(grads_ref)):
        _close(name, a, e, GRAD_TOL)
    eval_mode = dataclasses.replace(train, training=False)
    np.testing.assert_array_equal(
        value_and_grad(_record_head(loss), eval_mode)[0], value_and_grad(_record_head("xla"), eval_mode)[0]
    )


def test_kernel_switch_rejects_what_cannot_fuse():
    with pytest.raises(ConfigError, match=r"model.kernels.loss='xla_fused' .* not model.head=.*fp8=None"):
        ModelConfig(
            head=HeadConfig(softcap="sigmoid", multi_token=(((1.0,), (1.0,)),)),
            kernels=KernelConfig(loss="xla_fused"),
        )
    with pytest.raises(ConfigError, match=r"model.kernels.loss='pallas' .*softcap='tanh'"):
        ModelConfig(head=HeadConfig(softcap="tanh", fp8=SCALES), kernels=KernelConfig(loss="pallas"))


def test_mosaic_logits_gemm_gives_the_xla_gemms_losses_and_gradients():
    """`kernels.fp8_logits="mosaic"` (in the Mosaic GPU simulator here) rounds the same float32 sums,
    times the same scale, to the bf16 logits the XLA GEMM's float32 result is read as."""
    n, d, v = 256, 128, 384  # the kernel's tiles: N of 256 rows, K and V of 128
    k = jax.random.split(jax.random.key(61), 3)
    h = (3.0 * jax.random.normal(k[0], (n, d))).astype(jnp.bfloat16)
    w = 0.25 * jax.random.normal(k[1], (d, v))
    t = jax.random.randint(k[2], (n,), 0, v)
    weights = jnp.array(WEIGHTS[3])

    def value_and_grad(fp8_logits):
        cfg = dataclasses.replace(
            _record_head("xla_fused"),
            vocab_size=v,
            model_dim=d,
            kernels=KernelConfig(loss="xla_fused", fp8_logits=fp8_logits),
        )
        loss = kernels.fp8_head_loss(cfg)
        fn = lambda h, w: loss(h, w, t, weights, row_len=T, scales=SCALES, cap_value=23.0).sum()
        assert ("fp8_logits_mgpu" in str(jax.make_jaxpr(fn)(h, w))) == (fp8_logits == "mosaic")
        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(h, w)

    loss_ref, grads_ref = value_and_grad("xla")
    loss_m, grads_m = value_and_grad("mosaic")
    np.testing.assert_allclose(loss_m, loss_ref, rtol=1e-5)
    for name, a, e in zip(("dh", "dw"), grads_m, grads_ref):
        _close(name, a, e, GRAD_TOL)


def test_mosaic_logits_gemm_wants_the_fused_fp8_head_and_its_tiles():
    with pytest.raises(
        ConfigError, match=r"fp8_logits='mosaic' .* not loss='xla', model_dim=64, vocab_size=300"
    ):
        dataclasses.replace(_record_head("xla"), kernels=KernelConfig(loss="xla", fp8_logits="mosaic"))
    with pytest.raises(ConfigError, match=r"fp8_logits='mosaic' .* vocab_size=300"):
        dataclasses.replace(_record_head("pallas"), kernels=KernelConfig(loss="pallas", fp8_logits="mosaic"))


def test_auto_loss_pass_is_the_kernel_on_a_gpu_for_the_record_head_only():
    """`kernels.loss="auto"`: the Pallas pass for the FP8 'sigmoid' head on a GPU, the fused XLA pass
    off one; other heads the fused XLA pass where their softcap allows it, plain autodiff otherwise."""
    record = _record_head("auto")
    assert (record.loss_impl(gpu=True), record.loss_impl(gpu=False)) == ("pallas", "xla_fused")
    for softcap, fp8, multi_token, want in [
        ("isru", None, (), "xla_fused"),
        ("tanh", None, (), "xla_fused"),
        ("none", None, (), "xla"),
        ("tanh", SCALES, (), "xla"),
        ("isru", None, (((1.0,), (1.0,)),), "xla"),
    ]:
        cfg = ModelConfig(
            head=HeadConfig(softcap=softcap, fp8=fp8, multi_token=multi_token),
            kernels=KernelConfig(loss="auto"),
        )
        assert cfg.loss_impl(gpu=True) == cfg.loss_impl(gpu=False) == want, (softcap, fp8, multi_token)
    on_this_backend = "xla_fused" if kernels.interpret() else "pallas"
    assert kernels.resolved(record, documents=True)["loss"] == on_this_backend


@pytest.mark.gpu
@pytest.mark.parametrize("n_terms", [1, 3])
def test_compiled_kernel_at_the_records_vocabulary(n_terms):
    """The Pallas kernel compiled (Triton) at V = 50304 against autodiff."""
    n, v = 1024, 50304
    logits = (4.0 * jax.random.normal(jax.random.key(51), (n, v))).astype(jnp.bfloat16)
    t = jax.random.randint(jax.random.key(52), (n,), 0, v)
    targets_NK = head_mtp_loss.shifted_targets(jnp.where(t % 8 == 0, -1, t), 256, n_terms)
    weights = jnp.array(WEIGHTS[n_terms])
    kw = {"cap_value": 23.0, "grad_scale": SCALES.grad_scale}
    losses, ce, g8 = mtp_ce_kernel.mtp_ce(logits, targets_NK, weights, **kw)
    losses_ref, ce_ref, g8_ref = jax.jit(lambda *a: head_mtp_loss.mtp_ce_reference(*a, **kw))(
        logits, targets_NK, weights
    )
    np.testing.assert_allclose(losses, losses_ref, **LOSS_TOL)
    np.testing.assert_allclose(ce, ce_ref, **LOSS_TOL)
    _assert_e5m2_close(g8, g8_ref)


@pytest.mark.gpu
def test_compiled_kernel_past_2_31_gradient_entries():
    """At 49,152 × 50,304 (record #77's stage 2 on one GPU) the last rows, past 2^31 entries, match
    autodiff: one-byte entries there would be written through wrapped 32-bit offsets."""
    n, v, tail = 49152, 50304, 512
    logits = (4.0 * jax.random.normal(jax.random.key(53), (n, v))).astype(jnp.bfloat16)
    t = jax.random.randint(jax.random.key(54), (n,), 0, v)
    targets_NK = head_mtp_loss.shifted_targets(t, 256, 3)
    weights = jnp.array(WEIGHTS[3])
    kw = {"cap_value": 23.0, "grad_scale": SCALES.grad_scale}
    losses, _, g8 = mtp_ce_kernel.mtp_ce(logits, targets_NK, weights, **kw)
    chex.assert_tree_all_finite(losses)
    for rows in (slice(0, tail), slice(n - tail, n)):
        losses_ref, _, g8_ref = jax.jit(lambda *a: head_mtp_loss.mtp_ce_reference(*a, **kw))(
            logits[rows], targets_NK[rows], weights
        )
        np.testing.assert_allclose(losses[rows], losses_ref, **LOSS_TOL)
        _assert_e5m2_close(g8[rows], g8_ref)
