"""`model.mlp.fp8_up` and `fp8_down`: the MLP's projections as e4m3 GEMMs in training
(jaxrun/model/mlp_fp8.py), with current and with delayed scaling.

Checked against plain-jnp readings of the records' formulas, against the bf16 GEMMs they replace, for
their straight-through backward, and, for the delayed scales, through the real train step on two
devices with accumulation. Seeded random inputs; the CPU computes FP8 dots exactly.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrun import model, sharding, train
from jaxrun.config import ConfigError, MeshConfig, apply_overrides
from jaxrun.model import mlp_fp8
from jaxrun.model.attention import Mode

N, D, F = 256, 96, 384


def _inputs(seed: int):
    k = jax.random.split(jax.random.key(seed), 2)
    h = jax.random.normal(k[0], (N, D), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.uniform(k[1], (D, F), jnp.float32, -0.09, 0.09)  # record init's bound at D = 96
    return h, w


def _reference(h, w):
    """The record's formula in plain jnp (no flax): each operand at 448/amax, e4m3, f32 sums."""
    a, aw = jnp.max(jnp.abs(h.astype(jnp.float32))), jnp.max(jnp.abs(w))
    h8 = (h.astype(jnp.float32) * (448.0 / a)).astype(jnp.float8_e4m3fn).astype(jnp.float32)
    w8 = (w * (448.0 / aw)).astype(jnp.float8_e4m3fn).astype(jnp.float32)
    with jax.default_matmul_precision("highest"):
        return ((h8 @ w8) * (a / 448.0) * (aw / 448.0)).astype(jnp.bfloat16)


@pytest.mark.parametrize("seed", [0, 1])
def test_forward_matches_the_record_formula(seed):
    h, w = _inputs(seed)
    got = np.asarray(mlp_fp8.up_projection(h, w), np.float32)
    want = np.asarray(_reference(h, w), np.float32)
    # x/s and x·(448/a) round differently in the last float32 bit, which now and then moves an
    # element to the neighbouring e4m3 value: bound the worst output by 1% of the largest
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-2 * np.abs(want).max())
    assert np.mean(got == want) > 0.95


def test_forward_is_near_the_bf16_gemm():
    h, w = _inputs(2)
    got = np.asarray(mlp_fp8.up_projection(h, w), np.float32)
    exact = np.asarray(h.astype(jnp.float32) @ w, np.float32)
    err = np.abs(got - exact).max() / np.abs(exact).max()
    assert 1e-4 < err < 5e-2, err  # e4m3 has 3 mantissa bits; zero error would mean no quantization


def test_backward_is_the_bf16_gemms():
    h, w = _inputs(3)
    g = jax.random.normal(jax.random.key(4), (N, F), jnp.float32).astype(jnp.bfloat16)
    _, vjp = jax.vjp(mlp_fp8.up_projection, h, w)
    _, vjp_ref = jax.vjp(lambda h, w: h @ w.astype(h.dtype), h, w)
    for got, want in zip(vjp(g), vjp_ref(g), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def _fp8_cfg(tiny_cfg, **kernels):
    """tiny_cfg's model in bf16 with gpt2 init (no zero matrices), with and without the FP8 MLP."""
    m = apply_overrides(tiny_cfg, ["model.compute_dtype=bfloat16", "model.init=gpt2"]).model
    mlp8 = dataclasses.replace(m.mlp, fp8_up=True, fp8_down=True)
    return dataclasses.replace(m, mlp=mlp8, kernels=dataclasses.replace(m.kernels, **kernels)), m


def test_model_quantizes_in_training_only(tiny_cfg):
    m8, m = _fp8_cfg(tiny_cfg)
    params = model.init(jax.random.key(5), m)
    fp8 = mlp_fp8.init_state(params["blocks"]["mlp"]["w_down"])  # step 0's delayed scales
    tokens = jax.random.randint(jax.random.key(6), (2, 64), 0, m.vocab_size)
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1)}
    training = Mode(training=True)

    @jax.jit
    def losses(params):  # eval (FP8 off) and train, with and without the FP8 MLP
        modes, cfgs = (model.default_mode(m), training), (m8, m)
        return [model.token_losses(params, batch, c, mode, None, fp8).mean() for mode in modes for c in cfgs]

    (e8, e), (t8, t) = np.split(np.asarray(losses(params)), 2)
    assert e8 == e  # eval is bf16
    assert t8 != t and abs(t8 - t) < 1e-2 * t, (t8, t)
    grads = jax.jit(jax.grad(lambda p: model.token_losses(p, batch, m8, training, None, fp8).mean()))(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    with pytest.raises(ValueError, match="fp8_down in training needs the delayed scales"):
        model.token_losses(params, batch, m8, training)


def test_pallas_mlp_kernel_refuses_fp8_up(tiny_cfg):
    with pytest.raises(ConfigError, match="fp8_up.*kernels.mlp"):
        _fp8_cfg(tiny_cfg, mlp="pallas")


def _down_reference(post, w, s_act, s_w):
    """The record's delayed-scaling GEMM in plain jnp: e4m3(min(post/s_act, 448)), e4m3(clamp(w/s_w, ±448))."""
    post8 = jnp.minimum(post.astype(jnp.float32) / s_act, 448.0).astype(jnp.float8_e4m3fn).astype(jnp.float32)
    w8 = jnp.clip(w / s_w, -448.0, 448.0).astype(jnp.float8_e4m3fn).astype(jnp.float32)
    with jax.default_matmul_precision("highest"):
        return ((post8 @ w8) * (s_act * s_w)).astype(post.dtype)


def _down_inputs(seed):
    k = jax.random.split(jax.random.key(seed), 2)
    post = jnp.square(jax.nn.relu(jax.random.normal(k[0], (N, F), jnp.float32))).astype(jnp.bfloat16)
    w = jax.random.normal(k[1], (F, D), jnp.float32) * 0.02
    return post, w


@pytest.mark.parametrize("clamp", [False, True], ids=["in_range", "clamped"])
def test_down_projection_matches_the_record_formula(clamp):
    post, w = _down_inputs(8)
    amax_post, amax_w = float(jnp.max(post.astype(jnp.float32))), float(jnp.max(jnp.abs(w)))
    # stale scales, as delayed scaling has them: the clamped case saturates the largest entries
    s_act = jnp.float32(amax_post * (0.5 if clamp else 1.8) / 448)
    s_w = jnp.float32(amax_w * (0.5 if clamp else 1.12) / 448)
    got = np.asarray(mlp_fp8.down_projection(post, w, s_act, s_w), np.float32)
    want = np.asarray(_down_reference(post, w, s_act, s_w), np.float32)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-2 * np.abs(want).max())
    assert np.mean(got == want) > 0.95


def test_down_projection_backward_is_bf16_and_reports_the_amax():
    post, w = _down_inputs(9)
    g = jax.random.normal(jax.random.key(10), (N, D), jnp.float32).astype(jnp.bfloat16)
    s_act, s_w = jnp.float32(0.05), jnp.float32(1e-4)
    _, vjp = jax.vjp(mlp_fp8.down_projection, post, w, s_act, s_w)
    d_post, d_w, d_act, d_w_scale = vjp(g)
    _, vjp_ref = jax.vjp(lambda p, w: p @ w.astype(p.dtype), post, w)
    for got, want in zip((d_post, d_w), vjp_ref(g), strict=True):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    assert float(d_act) == float(jnp.max(post.astype(jnp.float32)))  # the amax rides the scale's cotangent
    assert float(d_w_scale) == 0.0


def test_delayed_weight_scale_bootstraps_for_16_updates():
    w_before = jnp.full((2, 3, 4), 0.5).at[1].set(-2.0)
    w_after = 2 * w_before
    amax = jnp.array([3.0, 0.0])
    for step, w_scale in (
        (0, [1.0 / 448, 4.0 / 448]),
        (15, [1.0 / 448, 4.0 / 448]),
        (16, [0.56 / 448, 2.24 / 448]),
    ):
        got = mlp_fp8.next_state(amax, w_before, w_after, jnp.int32(step))
        np.testing.assert_allclose(got["w_scale"], w_scale, rtol=1e-6)
        np.testing.assert_allclose(got["act_scale"], [3.0 * 1.8 / 448, 1e-12 * 1.8 / 448], rtol=1e-6)
    init = mlp_fp8.init_state(jnp.zeros((2, 3, 4)))  # zero-initialised W_proj: the 1e-12 floor
    np.testing.assert_allclose(init["w_scale"], [1e-12 / 448] * 2, rtol=1e-6)
    assert init["act_scale"].tolist() == [1.0, 1.0]


def test_train_step_carries_the_delayed_scales(tiny_cfg, monkeypatch):
    """One step on 2 devices × 2 micro-batches: the next activation scales come from the max amax over
    all four micro-batches (read here from an eager forward), the weight scales from the updated W."""
    cfg = apply_overrides(
        tiny_cfg,
        ["model.init=gpt2", "model.mlp.fp8_up=true", "model.mlp.fp8_down=true", "train.micro_batch_seqs=2"],
    )
    cfg = dataclasses.replace(cfg, mesh=MeshConfig(num_devices=2))
    mesh = sharding.make_mesh(cfg.mesh)
    state0 = train.init_state(cfg, jax.random.key(0), mesh)
    assert state0.fp8["act_scale"].tolist() == [1.0, 1.0]
    B, T, V = cfg.data.batch_seqs, cfg.data.seq_len, cfg.model.vocab_size
    tokens = np.asarray(jax.random.randint(jax.random.key(11), (B, T + 1), 0, V))
    batch = {"inputs": tokens[:, :-1].reshape(2, 4, T), "targets": tokens[:, 1:].reshape(2, 4, T)}
    params0, fp8_0 = jax.device_get((state0.params, state0.fp8))
    state1, _ = train.make_train_step(cfg, mesh)(
        state0, sharding.global_batch(batch, sharding.batch_sharding(mesh))
    )

    seen = []
    real = mlp_fp8.down_projection
    monkeypatch.setattr(
        mlp_fp8, "down_projection", lambda post, *a: seen.append(jnp.max(post)) or real(post, *a)
    )
    mode = train.schedule.train_mode(cfg, 0)
    unrolled = dataclasses.replace(cfg.model, scan_layers=False)  # eager layers; the step scans them
    for micro in range(2):
        for rows in (slice(0, 2), slice(2, 4)):  # device 0's and device 1's share of the micro-batch
            part = {k: v[micro, rows] for k, v in batch.items()}
            model.token_losses(params0, part, unrolled, mode, None, fp8_0)
    amax = np.max(np.asarray(seen).reshape(4, cfg.model.num_layers), axis=0)
    np.testing.assert_allclose(state1.fp8["act_scale"], amax * 1.8 / 448, rtol=1e-5)
    w1 = np.abs(np.asarray(state1.params["blocks"]["mlp"]["w_down"])).max(axis=(1, 2))
    w0 = np.abs(np.asarray(params0["blocks"]["mlp"]["w_down"])).max(axis=(1, 2))
    np.testing.assert_allclose(fp8_0["w_scale"], w0 / 448, rtol=1e-6)
    assert not np.allclose(w1, w0)
    np.testing.assert_allclose(state1.fp8["w_scale"], w1 / 448, rtol=1e-6)  # step 0 < 16: bootstrap
