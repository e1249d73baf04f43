"""Tests for jaxrun.record_optim against a numpy replay of record #77's NorMuonAndAdam.

The reference below is written from the source's formulas, in the source's
own layout: torch [out, in] matrices (jaxrun's w_q..w_o and w_up transposed,
w_down as is), its param_table, its shape and per-matrix lr rules, its
polar_express (tall matrices via XᵀX), lerp-form momentum, variance
reduction, mantissa-precise cautious update, Adam on odd steps with grads
kept over the even step, the tied lm_head and the copy of its state at the
split step. It runs in float64; jaxrun runs with float32 Newton–Schulz.
"""

from itertools import accumulate, pairwise

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.extend import core as jax_core

from jaxrun import muon as jm
from jaxrun import record_optim as ro
from jaxrun.config import OptimConfig

ROWS = (
    ro.OptimRow(pattern=r"blocks/attn/w_[qkvo]", group="hidden"),
    ro.OptimRow(pattern=r"blocks/mlp/w_up", group="hidden", shape_mult=2.0),
    ro.OptimRow(pattern=r"blocks/mlp/w_down", group="hidden", lr_mul=2.0, shape_mult=2.0),
    ro.OptimRow(
        pattern=r"blocks/attn/sa_lambdas|smear/lambda|residual/(skip|backout)_lambda",
        group="adam",
        lr_mul=5.0,
        wd_mul=0.0,
        betas=(0.9, 0.99),
    ),
    ro.OptimRow(pattern=r"smear/gate", group="adam", lr_mul=0.01, wd_mul=0.0, betas=(0.9, 0.99)),
    ro.OptimRow(pattern=r"residual/skip_gate", group="adam", lr_mul=0.05, wd_mul=0.0, betas=(0.9, 0.99)),
    ro.OptimRow(pattern=r"blocks/attn/(ve_)?gate", group="adam", betas=(0.9, 0.99)),
    ro.OptimRow(pattern=r"lm_head/w|embed/tokens", group="adam", wd_mul=150.0, betas=(0.5, 0.95)),
    ro.OptimRow(
        pattern=r"bigram/table|value_embed/tables", group="adam", lr_mul=75.0, wd_mul=5.0, betas=(0.75, 0.95)
    ),
    ro.OptimRow(pattern=r"residual/(post|x0|bigram)_lambdas", group="adam", wd_mul=0.0, betas=(0.9, 0.95)),
    ro.OptimRow(pattern=r"residual/resid_lambdas", group="adam", lr_mul=5.0, wd_mul=0.0, betas=(0.9, 0.95)),
)

# The record-77 layout at test size (L = 11 layers, 10 with attention).
D, F, V, H, L, LA = 16, 64, 32, 2, 11, 10
SHAPES = {
    "embed/tokens": (V, D),
    "lm_head/w": (D, V),
    "value_embed/tables": (5, V, D),
    "bigram/table": (5 * V, D),
    "smear/gate": (12, 1),
    "smear/lambda": (),
    **{f"blocks/attn/w_{x}": (LA, D, D) for x in "qkvo"},
    "blocks/attn/gate": (LA, 12, H),
    "blocks/attn/ve_gate": (5, 12, H),
    "blocks/attn/sa_lambdas": (L, 2),
    "blocks/mlp/w_up": (L, D, F),
    "blocks/mlp/w_down": (L, F, D),
    "residual/resid_lambdas": (L, 2),
    "residual/post_lambdas": (L, 2),
    "residual/x0_lambdas": (L,),
    "residual/bigram_lambdas": (L,),
    "residual/skip_gate": (12, 1),
    "residual/skip_lambda": (),
    "residual/backout_lambda": (),
}
# jaxrun path -> the source's param label, and its param_table entry (lr_mul, wd_mul, betas).
SOURCE_LABEL = {
    **{f"blocks/attn/w_{x}": "attn_bank" for x in "qkvo"},
    "blocks/mlp/w_up": "mlp_bank",
    "blocks/mlp/w_down": "mlp_bank",
    **dict.fromkeys(["blocks/attn/sa_lambdas", "smear/lambda", "residual/skip_lambda"], "scalars"),
    "residual/backout_lambda": "scalars",
    "smear/gate": "smear_gate",
    "residual/skip_gate": "skip_gate",
    "blocks/attn/gate": "attn_gate_bank",
    "blocks/attn/ve_gate": "ve_gate_bank",
    "lm_head/w": "lm_head",
    "embed/tokens": "embed",
    "bigram/table": "bigram_embed",
    "value_embed/tables": "value_embeds",
    **{f"residual/{x}_lambdas": f"{x}_lambdas" for x in ("post", "x0", "bigram", "resid")},
}
SOURCE_ADAM = {
    "scalars": (5.0, 0.0, (0.9, 0.99)),
    "smear_gate": (0.01, 0.0, (0.9, 0.99)),
    "skip_gate": (0.05, 0.0, (0.9, 0.99)),
    "attn_gate_bank": (1.0, 1.0, (0.9, 0.99)),
    "ve_gate_bank": (1.0, 1.0, (0.9, 0.99)),
    "lm_head": (1.0, 150.0, (0.5, 0.95)),
    "bigram_embed": (75.0, 5.0, (0.75, 0.95)),
    "post_lambdas": (1.0, 0.0, (0.9, 0.95)),
    "x0_lambdas": (1.0, 0.0, (0.9, 0.95)),
    "bigram_lambdas": (1.0, 0.0, (0.9, 0.95)),
    "resid_lambdas": (5.0, 0.0, (0.9, 0.95)),
    "value_embeds": (75.0, 5.0, (0.75, 0.95)),
    "embed": (1.0, 150.0, (0.5, 0.95)),
}
# jaxrun [in, out] leaves that are transposes of the source's [out, in] matrices.
TRANSPOSED = {*(f"blocks/attn/w_{x}" for x in "qkvo"), "blocks/mlp/w_up"}


def record_cfg(**overrides) -> OptimConfig:
    fields = dict(
        muon_lr=0.023,
        muon_weight_decay=1.2,
        muon_normuon_b2=0.95,
        muon_ns="polar_express",
        muon_ns_dtype="float32",
        muon_scaling="normuon",
        muon_weight_decay_mode="cautious",
        muon_momentum=0.95,
        muon_momentum_warmup_from=0.85,
        muon_momentum_warmup_steps=300,
        muon_momentum_cooldown_steps=50,
        adam_lr=0.008,
        adam_weight_decay=0.005,
        adam_eps=1e-10,
        adam_every=2,
        lr_stage_muls=(1.0, 1.52, 1.73),
        cooldown_frac=0.6,
        final_lr_frac=0.15,
        extension_steps=40,
    )
    return OptimConfig(**{**fields, **overrides})


def nest(flat: dict) -> dict:
    out: dict = {}
    for path, x in flat.items():
        *heads, last = path.split("/")
        node = out
        for h in heads:
            node = node.setdefault(h, {})
        node[last] = x
    return out


def flatten(tree) -> dict:
    return {ro.path_of(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def random_flat(rng, scale: float) -> dict:
    return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in SHAPES.items()}


# ----------------------------------------------------------------------------
# The source, replayed in numpy


def source_get_lr(step, scheduled, extension, cooldown_frac=0.6):
    muls = (1.0, 1.52, 1.73, 1.0)  # the extension stage's lr_mul is never used
    ends = [0] + [round(c * scheduled) for c in accumulate([1 / 3] * 3)] + [scheduled + extension]
    stage = next((i for i, (_, end) in enumerate(pairwise(ends)) if step < end), 3)
    lr = muls[stage]
    cd_start = int(scheduled * (1 - cooldown_frac))
    if step >= cd_start:
        t = min(1.0, (step - cd_start) / (scheduled - cd_start))
        lr = lr * (1 - t) + 0.15 * t
    return lr


def source_momentum(step, total, warmup=300, cooldown=50, lo=0.85, hi=0.95):
    cd_start = total - cooldown
    if step < warmup:
        return lo + step / warmup * (hi - lo)
    if step > cd_start:
        return hi - (step - cd_start) / cooldown * (hi - lo)
    return hi


def source_polar_express(g):
    x = g / (np.linalg.norm(g, axis=(-2, -1), keepdims=True) * 1.02 + 1e-6)
    tall = x.shape[-2] > x.shape[-1]
    for a, b, c in jm.NS_PRESETS["polar_express"].coeffs:
        if tall:
            gram = np.swapaxes(x, -1, -2) @ x
            x = a * x + x @ (b * gram + c * gram @ gram)
        else:
            gram = x @ np.swapaxes(x, -1, -2)
            x = a * x + (b * gram + c * gram @ gram) @ x
    return x


def source_variance_reduction(v, buf, beta2):
    red = -1 if v.shape[-2] >= v.shape[-1] else -2
    v_mean = np.mean(v**2, axis=red, keepdims=True)
    size = v.shape[red]
    v_norm = np.sqrt(np.sum(v_mean, axis=(-2, -1), keepdims=True) * size)
    buf = buf + (1 - beta2) * (v_mean - buf)
    step_size = 1 / np.sqrt(np.maximum(buf, 1e-10))
    v_norm_new = np.sqrt(np.sum(v_mean * size * step_size**2, axis=(-2, -1), keepdims=True))
    return v * (step_size * v_norm / np.maximum(v_norm_new, 1e-10)), buf


class SourceOptimizer:
    """NorMuonAndAdam + TrainingManager.step_optimizers on one process, float64, torch layout."""

    def __init__(self, flat_params, scheduled, extension, warmup=300, cooldown=50):
        self.sched = (scheduled, extension, warmup, cooldown)
        self.split_step = (round(2 / 3 * scheduled)) | 1
        self.p = {k: self.to_torch(k, v) for k, v in flat_params.items()}
        self.mom = {
            k: np.zeros_like(v) for k, v in self.p.items() if SOURCE_LABEL[k] in ("attn_bank", "mlp_bank")
        }
        self.buf = {}
        self.adam = {
            k: [0, np.zeros_like(v), np.zeros_like(v)] for k, v in self.p.items() if k not in self.mom
        }
        self.acc = {k: np.zeros_like(v) for k, v in self.p.items() if k not in self.mom}
        self.split = False

    @staticmethod
    def to_torch(path, x):
        x = np.asarray(x, np.float64)
        return np.swapaxes(x, -1, -2) if path in TRANSPOSED else x

    def params(self):
        return {k: np.swapaxes(v, -1, -2) if k in TRANSPOSED else v for k, v in self.p.items()}

    def step(self, k, grads):
        scheduled, extension, warmup, cooldown = self.sched
        s = source_get_lr(k, scheduled, extension)
        mu = source_momentum(k, scheduled + extension, warmup, cooldown)
        grads = {path: self.to_torch(path, g) for path, g in grads.items()}
        for path in self.mom:
            self.normuon(path, grads[path], s, mu)
        for path in self.acc:
            self.acc[path] = self.acc[path] + grads[path]
        if k % 2 == 1:
            if not self.split:
                self.acc["lm_head/w"] = self.acc["lm_head/w"] + self.acc["embed/tokens"].T
            for path in self.acc:
                if path != "embed/tokens" or self.split:
                    self.adam_update(path, self.acc[path], s)
            if not self.split:
                self.p["embed/tokens"] = self.p["lm_head/w"].T.copy()
            self.acc = {path: np.zeros_like(a) for path, a in self.acc.items()}
        if k == self.split_step:
            lm, emb = self.adam["lm_head/w"], self.adam["embed/tokens"]
            emb[0], emb[1], emb[2] = lm[0], lm[1].T.copy(), lm[2].T.copy()
            self.split = True

    def normuon(self, path, g, s, mu):
        self.mom[path] = self.mom[path] + (1 - mu) * (g - self.mom[path])
        u = g + mu * (self.mom[path] - g)
        x = source_polar_express(u)
        buf = self.buf.get(path, np.zeros(()))
        x, self.buf[path] = source_variance_reduction(x, buf, 0.95)
        rows, cols = x.shape[-2:]
        shape_mult = max(1.0, rows / cols) ** 0.5
        per_matrix = 2.0 if path == "blocks/mlp/w_down" else 1.0  # odd mlp_bank index: c_proj
        lr = 0.023 * s
        lr_factor, wd_factor = shape_mult * per_matrix * lr, 1.0 * 1.2 * lr
        p = self.p[path]
        mask = x * p >= 0
        self.p[path] = p - p * mask * wd_factor * lr_factor - x * lr_factor

    def adam_update(self, path, g, s):
        lr_mul, wd_mul, (b1, b2) = SOURCE_ADAM[SOURCE_LABEL[path]]
        lr = 0.008 * s * lr_mul
        state = self.adam[path]
        state[0] += 1
        t = state[0]
        step_size = lr * (1 - b2**t) ** 0.5 / (1 - b1**t)
        state[1] = state[1] * b1 + g * (1 - b1)
        state[2] = state[2] * b2 + g * g * (1 - b2)
        u = state[1] / (np.sqrt(state[2]) + 1e-10) * step_size
        p = self.p[path]
        u = u + p * (u * p > 0) * (lr * lr * 0.005 * wd_mul)
        self.p[path] = p - u


# ----------------------------------------------------------------------------
# One trajectory of 12 + 2 steps, split at step 9, shared by several tests

S, E = 12, 2
MOMENTUM_WARMUP, MOMENTUM_COOLDOWN = 4, 3  # short enough to cross every branch in 14 steps


def grads_for(rng, k, split):
    g = random_flat(rng, 1.0)
    if k <= split:  # tied: the forward reads lm_head/w.T, so embed/tokens gets nothing
        g["embed/tokens"] = np.zeros_like(g["embed/tokens"])
    return g


@pytest.fixture(scope="module")
def trajectory():
    cfg = record_cfg(
        extension_steps=E,
        muon_momentum_warmup_steps=MOMENTUM_WARMUP,
        muon_momentum_cooldown_steps=MOMENTUM_COOLDOWN,
    )
    tx = ro.make_record_optimizer(cfg, ROWS, S + E)
    split = ro.split_step(S)
    rng = np.random.default_rng(0)
    flat = random_flat(rng, 0.3)
    ref = SourceOptimizer(flat, S, E, MOMENTUM_WARMUP, MOMENTUM_COOLDOWN)
    params = nest({k: jnp.asarray(v) for k, v in flat.items()})
    state = tx.init(params)
    update = jax.jit(tx.update)
    untie = jax.jit(ro.untie)
    steps = []
    for k in range(S + E):
        g = grads_for(rng, k, split)
        updates, state = update(nest({k: jnp.asarray(v) for k, v in g.items()}), state, params)
        params = optax.apply_updates(params, updates)
        if k == split:
            params, state = untie(params, state)
        ref.step(k, g)
        steps.append(
            {"updates": flatten(updates), "params": flatten(params), "ref": ref.params(), "state": state}
        )
    return {"split": split, "steps": steps, "init": flat, "update": update}


def assert_params_match(got, want, skip=()):
    """Elementwise, up to rare cautious-mask flips where X'·W ≈ 0.

    Grads are inputs here, so a flip changes only its own element, by one
    step's decay (|W|·λ·η_M·s·η ≲ 2e-4 at these sizes) per flip.
    """
    for path, w in want.items():
        if path in skip:
            continue
        diff = np.abs(np.asarray(got[path], np.float64) - w)
        bad = diff > 2e-6 + 2e-4 * np.abs(w)
        assert bad.sum() <= max(1, bad.size // 2000), (path, bad.sum(), diff.max())
        assert diff.max() <= 1e-3, (path, diff.max())


def test_split_step_and_stage_starts():
    assert ro.stage_starts(1450, 3) == (0, 483, 967)
    assert ro.split_step(1450) == 967
    assert ro.split_step(1270) == 847
    assert ro.split_step(S) == 9


def test_first_step_matches_source(trajectory):
    step0 = trajectory["steps"][0]
    assert_params_match(step0["params"], step0["ref"])
    # Step 0 is even: Adam leaves are untouched, NorMuon ones move.
    for path, u in step0["updates"].items():
        moved = np.any(np.asarray(u) != 0)
        assert moved == (ro.row_of(ROWS, path).kind == "normuon"), path


def test_every_step_matches_source(trajectory):
    split = trajectory["split"]
    for k, step in enumerate(trajectory["steps"]):
        # While tied the source keeps embed = lm_headᵀ; jaxrun leaves embed alone until untie.
        skip = ("embed/tokens",) if k < split else ()
        assert_params_match(step["params"], step["ref"], skip=skip)


def test_tied_embedding_is_untouched_until_untie(trajectory):
    init, split = trajectory["init"], trajectory["split"]
    for step in trajectory["steps"][:split]:
        np.testing.assert_array_equal(step["params"]["embed/tokens"], init["embed/tokens"])
    after = trajectory["steps"][split]
    np.testing.assert_array_equal(after["params"]["embed/tokens"], after["params"]["lm_head/w"].T)


def test_adam_counts_only_its_updates(trajectory):
    split = trajectory["split"]
    for k, step in enumerate(trajectory["steps"]):
        normuon, adam = step["state"].inner_states["normuon"], step["state"].inner_states["adam"]
        assert int(normuon.inner_state[0].count) == k + 1
        assert int(adam.inner_state.count) == k + 1
        assert int(adam.inner_state.inner_state.count) == (k + 1) // 2
        # Kept after an even step, cleared by the odd step's update (embed/tokens has none while tied).
        for path, x in flatten(adam.inner_state.grad_sum).items():
            assert bool(jnp.all(x == 0)) == (k % 2 == 1 or path == "embed/tokens" and k <= split), (k, path)


def test_untie_copies_head_state_transposed(trajectory):
    split = trajectory["split"]
    before, after = trajectory["steps"][split - 1]["state"], trajectory["steps"][split]["state"]
    adam = after.inner_states["adam"].inner_state.inner_state
    for moments in (adam.mu, adam.nu):
        np.testing.assert_array_equal(moments["embed"]["tokens"], moments["lm_head"]["w"].T)
    # Before the split, embed's moments were still zero.
    adam_before = before.inner_states["adam"].inner_state.inner_state
    assert not np.any(np.asarray(adam_before.mu["embed"]["tokens"]))


def test_untie_on_flat_padded_state():
    params = nest({"lm_head/w": jnp.arange(6.0).reshape(2, 3), "embed/tokens": jnp.zeros((3, 2))})
    flat_state = ro.RecordAdamState(
        count=jnp.array(3),
        mu=nest({"lm_head/w": jnp.arange(8.0), "embed/tokens": jnp.zeros(8)}),
        nu=nest({"lm_head/w": jnp.arange(8.0) + 1, "embed/tokens": jnp.zeros(8)}),
    )
    new_params, new_state = ro.untie(params, flat_state)
    np.testing.assert_array_equal(new_params["embed"]["tokens"], np.arange(6.0).reshape(2, 3).T)
    np.testing.assert_array_equal(new_state.mu["embed"]["tokens"], [0, 3, 1, 4, 2, 5, 0, 0])
    np.testing.assert_array_equal(new_state.nu["embed"]["tokens"], [1, 4, 2, 5, 3, 6, 0, 0])
    np.testing.assert_array_equal(new_state.mu["lm_head"]["w"], np.arange(8.0))


def test_update_compiles_once(trajectory):
    assert trajectory["update"]._cache_size() == 1


# ----------------------------------------------------------------------------
# Schedules


@pytest.mark.parametrize("scheduled,extension", [(1450, 40), (1270, 15), (12, 2)])
def test_lr_schedule_matches_source(scheduled, extension):
    s = ro.lr_schedule(scheduled, stage_lr_muls=(1.0, 1.52, 1.73), cooldown_frac=0.6, floor=0.15)
    steps = np.arange(scheduled + extension)
    got = np.asarray(jax.jit(jax.vmap(s))(steps))
    want = [source_get_lr(int(k), scheduled, extension) for k in steps]
    np.testing.assert_allclose(got, want, rtol=2e-6)


def test_lr_schedule_named_steps():
    s = ro.lr_schedule(1450, stage_lr_muls=(1.0, 1.52, 1.73), cooldown_frac=0.6, floor=0.15)
    assert all(float(s(k)) == 1.0 for k in range(483))
    np.testing.assert_allclose([float(s(k)) for k in (483, 580)], 1.52, rtol=1e-7)
    assert float(s(581)) < 1.52
    np.testing.assert_allclose(float(s(966)), 0.912161, rtol=1e-5)
    np.testing.assert_allclose(float(s(967)), 1.027172, rtol=1e-5)
    np.testing.assert_allclose(float(s(1449)), 0.151816, rtol=1e-5)
    np.testing.assert_allclose([float(s(k)) for k in range(1450, 1490)], 0.15, rtol=1e-7)


def test_momentum_schedule_matches_source():
    mu = ro.momentum_schedule(1490, low=0.85, high=0.95, warmup_steps=300, cooldown_steps=50)
    steps = np.arange(1490)
    got = np.asarray(jax.jit(jax.vmap(mu))(steps))
    np.testing.assert_allclose(got, [source_momentum(int(k), 1490) for k in steps], rtol=1e-6)
    np.testing.assert_allclose(float(mu(1489)), 0.852, rtol=1e-6)
    assert float(mu(0)) == np.float32(0.85) and float(mu(1440)) == np.float32(0.95)


# ----------------------------------------------------------------------------
# Pieces


def test_adam_folds_bias_correction_into_step_size():
    # With |g| ≈ eps the placement of eps decides the step: on sqrt(v), not on sqrt(v̂).
    rows = (ro.OptimRow(pattern="w", group="adam", wd_mul=0.0, betas=(0.5, 0.95)),)
    tx = ro.scale_by_record_adam(rows, base_lr=0.1, weight_decay=0.0, eps=1e-10, lr_of_count=lambda t: 1.0)
    p, g = {"w": jnp.ones(3)}, {"w": jnp.full(3, 1e-10)}
    u, state = tx.update(g, tx.init(p), p)
    m, v = 0.5 * 1e-10, 0.05 * 1e-20
    want = -0.1 * np.sqrt(0.05) / 0.5 * m / (np.sqrt(v) + 1e-10)
    np.testing.assert_allclose(u["w"], want, rtol=1e-5)
    assert int(state.count) == 1


def test_cautious_masks():
    # NorMuon decays where X'·W >= 0, so also where X' = 0; Adam only where u·p > 0.
    o = {"w": jnp.array([[0.0, 1.0], [-1.0, 1.0]])}
    p = {"w": jnp.array([[1.0, 1.0], [1.0, -1.0]])}
    rows = (ro.OptimRow(pattern="w", group="hidden"),)
    step = ro._normuon_step(rows, base_lr=0.5, weight_decay=2.0, lr=lambda c: 1.0, ns_dtype=jnp.float32)
    u, _ = step.update(o, step.init(p), p)
    mask = np.array([[1.0, 1.0], [0.0, 0.0]])
    np.testing.assert_allclose(u["w"], -(np.asarray(p["w"]) * mask * 1.0 * 0.5 + np.asarray(o["w"]) * 0.5))

    rows = (ro.OptimRow(pattern="w", group="adam", betas=(0.9, 0.99)),)
    adam = ro.scale_by_record_adam(rows, base_lr=0.5, weight_decay=1.0, eps=1e-10, lr_of_count=lambda t: 1.0)
    g = {"w": jnp.array([[0.0, 1.0], [-1.0, 1.0]])}
    u, _ = adam.update(g, adam.init(p), p)
    u = np.asarray(u["w"])
    assert u[0, 0] == 0.0  # zero step: no decay although p > 0
    np.testing.assert_allclose(-u[0, 1], 0.5 + 0.25, rtol=1e-5)  # same sign: decay lr²·wd·p
    np.testing.assert_allclose(-u[1, 0], -0.5, rtol=1e-5)


def test_slices_of_the_leading_axis_update_like_the_whole():
    cfg = record_cfg(extension_steps=2)
    tx = ro.make_record_optimizer(cfg, ROWS, 14)
    rng = np.random.default_rng(1)
    flat = random_flat(rng, 0.3)
    normuon = {k for k in SHAPES if ro.row_of(ROWS, k).kind == "normuon"}

    def halves(path, x):
        """ZeRO-1 on 2 devices: NorMuon leaves by leading axis, Adam leaves flat, both padded."""
        x = np.asarray(x) if path in normuon else np.asarray(x).reshape(-1)
        x = np.pad(x, [(0, x.shape[0] % 2)] + [(0, 0)] * (x.ndim - 1))
        return np.split(x, 2)

    def part(tree, i):
        return nest({k: jnp.asarray(halves(k, v)[i]) for k, v in tree.items()})

    update = jax.jit(tx.update)
    whole = nest({k: jnp.asarray(v) for k, v in flat.items()})
    parts = [part(flat, i) for i in range(2)]
    states = [tx.init(x) for x in parts]
    state = tx.init(whole)
    for _ in range(3):
        g = random_flat(rng, 1.0)
        updates, state = update(nest({k: jnp.asarray(v) for k, v in g.items()}), state, whole)
        whole = optax.apply_updates(whole, updates)
        for i in range(2):
            u, states[i] = update(part(g, i), states[i], parts[i])
            parts[i] = optax.apply_updates(parts[i], u)
        got, want = [flatten(x) for x in parts], flatten(whole)
        for path, w in want.items():
            joined = np.concatenate([got[0][path], got[1][path]])
            np.testing.assert_allclose(
                joined, np.concatenate(halves(path, w)), rtol=1e-5, atol=1e-7, err_msg=path
            )


def test_bf16_first_step_is_close_to_float32():
    rng = np.random.default_rng(2)
    flat = random_flat(rng, 0.3)
    params = nest({k: jnp.asarray(v) for k, v in flat.items()})
    grads = nest({k: jnp.asarray(v) for k, v in random_flat(rng, 1.0).items()})
    out = {}
    for dtype in ("float32", "bfloat16"):
        tx = ro.make_record_optimizer(record_cfg(muon_ns_dtype=dtype), ROWS, 1490)
        out[dtype] = flatten(tx.update(grads, tx.init(params), params)[0])
    for path in SHAPES:
        if ro.row_of(ROWS, path).kind == "normuon":
            want, got = out["float32"][path], out["bfloat16"][path]
            assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.06, path
            assert not np.array_equal(got, want), path


def _has_dot(eqn) -> bool:
    """Whether a jaxpr equation is, or contains (cond branches, loops, pjit), a dot_general."""
    if eqn.primitive.name == "dot_general":
        return True
    subs = []
    for v in eqn.params.values():
        for x in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(x, jax_core.ClosedJaxpr):
                subs.append(x.jaxpr)
            elif isinstance(x, jax_core.Jaxpr):
                subs.append(x)
    return any(_has_dot(e) for j in subs for e in j.eqns)


def test_partition_in_order_equals_optax_partition():
    """Same updates and state as `optax.partition`, bit for bit, with the groups in either order."""
    rng = np.random.default_rng(3)
    params = {
        "a": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=5), jnp.float32),
    }

    def labels(tree):
        return {"a": "sgd", "b": "adam"}

    transforms = {"adam": optax.adam(0.1), "sgd": optax.sgd(0.1, momentum=0.9)}
    ordered, plain = ro.partition_in_order(transforms, labels), optax.partition(transforms, labels)
    state, state_plain = ordered.init(params), plain.init(params)
    for _ in range(2):
        g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        u, state = jax.jit(ordered.update)(g, state, params)
        u_plain, state_plain = jax.jit(plain.update)(g, state_plain, params)
        jax.tree.map(np.testing.assert_array_equal, u, u_plain)
        jax.tree.map(np.testing.assert_array_equal, state, state_plain)


def test_record_optimizer_runs_adam_before_polar_express():
    """Every leaf passes one barrier after Adam's update; all of NorMuon's matmuls come after it."""
    tx = ro.make_record_optimizer(record_cfg(extension_steps=2), ROWS, 14)
    rng = np.random.default_rng(4)
    params = nest({k: jnp.asarray(v) for k, v in random_flat(rng, 0.3).items()})
    grads = nest({k: jnp.asarray(v) for k, v in random_flat(rng, 1.0).items()})
    eqns = jax.make_jaxpr(tx.update)(grads, tx.init(params), params).jaxpr.eqns
    names = [e.primitive.name for e in eqns]
    assert names.count("optimization_barrier") == 1
    barrier = names.index("optimization_barrier")
    assert len(eqns[barrier].invars) == len(jax.tree.leaves(params))
    assert any(e.primitive.name == "cond" for e in eqns[:barrier])  # Adam, every other step
    matmuls = [i for i, e in enumerate(eqns) if _has_dot(e)]
    assert matmuls and min(matmuls) > barrier
