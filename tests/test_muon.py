"""Tests for jaxrun.muon: Newton–Schulz bands, a step-by-step reference, optax parity."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from optax.contrib import _muon as optax_muon

from jaxrun import muon as jm

# Singular-value band each preset promises, for inputs whose condition number
# is at most COND (normalized smallest singular value ≳ 1e-3, Polar Express's
# design range). Measured extremes over seeds, plus margin: simple converges
# (1 ± 1e-5 in fp32); quintic lands in ≈[0.68, 1.20]; Polar Express in
# ≈[0.86, 1.14]. bf16 rounding adds ≈±0.01.
COND = 100.0
BANDS = {
    ("simple", "float32"): (1 - 1e-5, 1 + 1e-5),
    ("simple", "bfloat16"): (0.99, 1.01),
    ("quintic", "float32"): (0.67, 1.21),
    ("quintic", "bfloat16"): (0.66, 1.22),
    ("polar_express", "float32"): (0.85, 1.15),
    ("polar_express", "bfloat16"): (0.84, 1.16),
}
# |Uᵀ Y V - diag| for the exact SVD X = U S Vᵀ: Y shares X's singular vectors.
OFF_DIAGONAL_ATOL = {"float32": 1e-5, "bfloat16": 4e-2}
# |Y - U Vᵀ| for the converging simple preset.
POLAR_ATOL = {"float32": 2e-6, "bfloat16": 3e-2}
# Whole-step comparisons against the float64 reference. float32: elementwise,
# atol in units of lr. bfloat16: relative Frobenius error per leaf (measured
# ≤ 3.5%), since bf16 Newton–Schulz carries 1-3% RMS noise, most of it in the
# poorly determined small singular directions, and can flip a cautious mask.
STEP_TOL = {"float32": {"rtol": 1e-4, "atol": 1e-5}, "bfloat16": {"fro_rtol": 0.06}}
SHAPES = [(64, 64), (96, 48), (48, 96), (3, 40, 72)]


def random_matrix(rng: np.random.Generator, shape, cond: float = COND) -> np.ndarray:
    """Random singular vectors, log-uniform singular values in [1/cond, 1]."""
    *lead, m, n = shape
    r = min(m, n)
    u = np.linalg.qr(rng.standard_normal((*lead, m, r)))[0]
    v = np.linalg.qr(rng.standard_normal((*lead, n, r)))[0]
    s = np.exp(rng.uniform(-np.log(cond), 0.0, (*lead, r)))
    s[..., 0], s[..., 1] = 1.0, 1.0 / cond
    return (u * s[..., None, :]) @ np.swapaxes(v, -1, -2)


def svd(x: np.ndarray):
    u, s, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
    return u, s, np.swapaxes(vt, -1, -2)


# ----------------------------------------------------------------------------
# Newton–Schulz


def test_presets():
    assert set(jm.NS_PRESETS) == {"simple", "quintic", "polar_express"}
    assert [len(p.coeffs) for p in jm.NS_PRESETS.values()] == [12, 5, 5]
    assert jm.NS_PRESETS["polar_express"].safety == pytest.approx(1.02)
    assert jm.NS_PRESETS["simple"].safety == jm.NS_PRESETS["quintic"].safety == 1.0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("preset", ["simple", "quintic", "polar_express"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_newton_schulz_band(preset, dtype, shape):
    x = random_matrix(np.random.default_rng(0), shape)
    y = jm.newton_schulz(jnp.asarray(x, jnp.float32), jm.NS_PRESETS[preset], dtype=jnp.dtype(dtype))
    chex.assert_shape(y, shape)
    chex.assert_type(y, jnp.float32)
    y = np.asarray(y, np.float64)
    lo, hi = BANDS[preset, dtype]
    sv = np.linalg.svd(y, compute_uv=False)
    assert lo <= sv.min() and sv.max() <= hi, (sv.min(), sv.max())
    # Y = U f(S) Vᵀ with X's own singular vectors.
    u, _, v = svd(x)
    d = np.swapaxes(u, -1, -2) @ y @ v
    diag = np.diagonal(d, axis1=-2, axis2=-1)
    np.testing.assert_allclose(
        d, diag[..., None] * np.eye(d.shape[-1]), rtol=0, atol=OFF_DIAGONAL_ATOL[dtype]
    )
    assert lo <= diag.min() and diag.max() <= hi


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_simple_preset_reaches_polar_factor(dtype, shape):
    x = random_matrix(np.random.default_rng(1), shape)
    y = jm.newton_schulz(jnp.asarray(x, jnp.float32), jm.NS_PRESETS["simple"], dtype=jnp.dtype(dtype))
    u, _, v = svd(x)
    polar = u @ np.swapaxes(v, -1, -2)
    np.testing.assert_allclose(np.asarray(y, np.float64), polar, rtol=0, atol=POLAR_ATOL[dtype])


def test_newton_schulz_is_transpose_and_scale_equivariant():
    x = jnp.asarray(random_matrix(np.random.default_rng(2), (2, 24, 40)), jnp.float32)
    c = jm.NS_PRESETS["polar_express"]
    y = jm.newton_schulz(x, c, dtype=jnp.float32)
    yt = jm.newton_schulz(jnp.swapaxes(x, -1, -2), c, dtype=jnp.float32)
    chex.assert_trees_all_close(jnp.swapaxes(yt, -1, -2), y, rtol=0, atol=1e-5)
    chex.assert_trees_all_close(jm.newton_schulz(37.0 * x, c, dtype=jnp.float32), y, rtol=0, atol=1e-5)


@pytest.mark.parametrize("coeffs", ["quintic", "polar_express_unit_safety"])
def test_newton_schulz_matches_optax_contrib(coeffs):
    # optax has no safety factor, so Polar Express is compared at safety 1.
    ours = jm.NS_PRESETS[coeffs.removesuffix("_unit_safety")]._replace(safety=1.0)
    x = jnp.asarray(random_matrix(np.random.default_rng(3), (3, 40, 72)), jnp.float32)
    got = jm.newton_schulz(x, ours, eps=1e-8, dtype=jnp.float32)
    want = optax_muon.orthogonalize_via_newton_schulz(
        x,
        jnp.asarray(ours.coeffs, jnp.float32),
        ns_steps=len(ours.coeffs),
        eps=1e-8,
        dimension_numbers=optax_muon.MuonDimensionNumbers(reduction_axis=1, output_axis=2),
    )
    chex.assert_trees_all_close(got, want, rtol=0, atol=2e-5)


def test_newton_schulz_rejects_vectors():
    with pytest.raises(ValueError, match="m, n"):
        jm.newton_schulz(jnp.ones(5), jm.NS_PRESETS["simple"])


# ----------------------------------------------------------------------------
# One Muon step against a float64 reference written out step by step


def reference_newton_schulz(x, coeffs: jm.NSCoefficients, eps):
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = np.swapaxes(x, -1, -2)
    x = x / (np.linalg.norm(x, axis=(-2, -1), keepdims=True) * coeffs.safety + eps)
    for a, b, c in coeffs.coeffs:
        gram = x @ np.swapaxes(x, -1, -2)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return np.swapaxes(x, -1, -2) if tall else x


def reference_muon(params, grads_per_step, *, lr, wd, betas, nesterov, ns, scaling, b2, wd_mode, eps):
    """Plain numpy Muon, one leaf at a time, in float64."""
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    mom = {k: np.zeros_like(v) for k, v in params.items()}
    nu = {k: None for k in params}
    all_updates = []
    for beta, grads in zip(betas, grads_per_step, strict=True):
        updates = {}
        for k, p in params.items():
            g = np.asarray(grads[k], np.float64)
            mom[k] = mom[k] + (1 - beta) * (g - mom[k])
            u = g + beta * (mom[k] - g) if nesterov else mom[k]
            o = reference_newton_schulz(u, jm.NS_PRESETS[ns], eps)
            fan_in, fan_out = p.shape[-2], p.shape[-1]
            if scaling == "normuon":
                axis = -2 if fan_out >= fan_in else -1
                row_ms = np.mean(o**2, axis=axis, keepdims=True)
                nu[k] = (1 - b2) * row_ms if nu[k] is None else b2 * nu[k] + (1 - b2) * row_ms
                v = o / np.sqrt(np.maximum(nu[k], 1e-10))
                o = (
                    v
                    * np.linalg.norm(o, axis=(-2, -1), keepdims=True)
                    / np.linalg.norm(v, axis=(-2, -1), keepdims=True)
                )
            o = o * np.sqrt(max(1.0, fan_out / fan_in))
            if wd_mode == "decoupled":
                o = o + wd * p
            else:
                o = o + wd * p * (o * p >= 0)
            updates[k] = -lr * o
            params[k] = p + updates[k]
        all_updates.append(updates)
    return all_updates


STEP_CASES = [
    {"scaling": "shape", "wd_mode": "decoupled", "nesterov": True, "ns": "simple"},
    {"scaling": "normuon", "wd_mode": "cautious", "nesterov": True, "ns": "polar_express"},
    {"scaling": "shape", "wd_mode": "cautious", "nesterov": False, "ns": "quintic"},
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_muon_steps_match_reference(case, dtype):
    rng = np.random.default_rng(4)
    shapes = {"wide": (2, 24, 40), "tall": (40, 24), "square": (3, 16, 16)}
    params = {k: jnp.asarray(rng.standard_normal(s) * 0.1, jnp.float32) for k, s in shapes.items()}
    grads = [
        {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()} for _ in range(3)
    ]
    lr, wd, eps, b2 = 0.02, 0.5, 1e-7, 0.95
    momentum = optax.linear_schedule(0.85, 0.95, transition_steps=2)
    opt = jm.muon(
        lr,
        weight_decay=wd,
        weight_decay_mode=case["wd_mode"],
        momentum=momentum,
        nesterov=case["nesterov"],
        ns=case["ns"],
        scaling=case["scaling"],
        normuon_b2=b2,
        eps=eps,
        ns_dtype=jnp.dtype(dtype),
    )
    want = reference_muon(
        params,
        grads,
        lr=lr,
        wd=wd,
        betas=[float(momentum(i)) for i in range(3)],
        nesterov=case["nesterov"],
        ns=case["ns"],
        scaling=case["scaling"],
        b2=b2,
        wd_mode=case["wd_mode"],
        eps=eps,
    )
    state = opt.init(params)
    tol = STEP_TOL[dtype]
    for g, w in zip(grads, want, strict=True):
        updates, state = opt.update(g, state, params)
        chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
        if dtype == "float32":
            chex.assert_trees_all_close(updates, w, rtol=tol["rtol"], atol=tol["atol"] * lr)
        else:
            for k, u in updates.items():
                err = np.linalg.norm(np.asarray(u, np.float64) - w[k]) / np.linalg.norm(w[k])
                assert err <= tol["fro_rtol"], (k, err)
        params = optax.apply_updates(params, updates)
    assert int(state[0].count) == 3


@pytest.mark.parametrize("beta,nesterov", [(0.9, False), (0.0, True)])
def test_muon_matches_optax_contrib_where_they_coincide(beta, nesterov):
    # Without Nesterov, optax's bias-corrected momentum is ours times
    # 1/(1 - β^t); with β = 0 both are the raw gradient. Newton–Schulz is
    # scale invariant, so the updates agree.
    rng = np.random.default_rng(5)
    shapes = {"w1": (24, 40), "w2": (40, 24)}
    params = {k: jnp.asarray(rng.standard_normal(s) * 0.1, jnp.float32) for k, s in shapes.items()}
    ours = jm.muon(
        0.03, momentum=beta, nesterov=nesterov, ns="quintic", eps=1e-8, ns_dtype=jnp.float32, weight_decay=0.1
    )
    theirs = optax.contrib.muon(0.03, beta=beta, nesterov=nesterov, ns_steps=5, eps=1e-8, weight_decay=0.1)
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    update_ours, update_theirs = jax.jit(ours.update), jax.jit(theirs.update)
    for _ in range(3):
        g = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
        u_ours, s_ours = update_ours(g, s_ours, params)
        u_theirs, s_theirs = update_theirs(g, s_theirs, params)
        chex.assert_trees_all_close(u_ours, u_theirs, rtol=1e-4, atol=1e-6)
        params = optax.apply_updates(params, u_ours)


# ----------------------------------------------------------------------------
# Properties


def frobenius(tree):
    return jax.tree.map(lambda a: jnp.linalg.norm(a, axis=(-2, -1)), tree)


def test_normuon_preserves_frobenius_norm():
    rng = np.random.default_rng(6)
    shapes = {"wide": (2, 24, 40), "tall": (2, 40, 24), "square": (16, 16)}
    grads = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
    opt = jm.scale_by_muon(scaling="normuon", ns="polar_express", ns_dtype=jnp.float32)
    state = opt.init(grads)
    # Statistics per unit of the longer axis; per output unit when square.
    chex.assert_shape(state.second_moment["wide"], (2, 1, 40))
    chex.assert_shape(state.second_moment["tall"], (2, 40, 1))
    chex.assert_shape(state.second_moment["square"], (1, 16))
    plain = jm.scale_by_muon(scaling="shape", ns="polar_express", ns_dtype=jnp.float32)
    s_plain = plain.init(grads)
    for step in range(3):
        out, state = opt.update(grads, state)
        ref, s_plain = plain.update(grads, s_plain)
        chex.assert_trees_all_close(frobenius(out), frobenius(ref), rtol=1e-5)
        if step == 0:
            # One EMA step from zero: every kept unit ends at the same RMS.
            rms = jnp.sqrt(jnp.mean(jnp.square(out["tall"]), axis=-1))
            chex.assert_trees_all_close(rms, jnp.broadcast_to(rms[:, :1], rms.shape), rtol=1e-5)
        assert not np.allclose(out["tall"], ref["tall"], atol=1e-3)
        grads = jax.tree.map(
            lambda g: g + 0.5 * jnp.asarray(rng.standard_normal(g.shape), jnp.float32), grads
        )


def test_cautious_weight_decay_mask():
    updates = jnp.array([[1.0, -1.0, 0.0, 2.0], [-2.0, 3.0, 1.0, -1.0]])
    params = jnp.array([[1.0, 1.0, -3.0, -1.0], [-1.0, 0.0, -2.0, 2.0]])
    # decay where update·param >= 0: (+,+), (0,-), (-,-), (+,0)
    mask = jnp.array([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    tx = jm.add_cautious_decayed_weights(0.5)
    out, _ = tx.update(updates, tx.init(params), params)
    chex.assert_trees_all_close(out, updates + 0.5 * params * mask, rtol=0, atol=0)
    with pytest.raises(ValueError, match="params"):
        tx.update(updates, tx.init(params))


def test_jit_compiles_once_while_momentum_changes():
    traces = []
    rng = np.random.default_rng(7)
    params = {"w": jnp.asarray(rng.standard_normal((2, 16, 32)), jnp.float32)}
    momentum = optax.linear_schedule(0.85, 0.95, transition_steps=3)
    lr = optax.linear_schedule(0.02, 0.0, transition_steps=5)
    opt = jm.muon(lr, momentum=momentum, weight_decay=0.05, weight_decay_mode="cautious", scaling="normuon")

    @jax.jit
    def step(params, state, grads):
        traces.append(1)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    fixed = jm.muon(lr, momentum=0.95, weight_decay=0.05, weight_decay_mode="cautious", scaling="normuon")
    s_fixed = fixed.init(params)
    for i in range(5):
        g = {"w": jnp.asarray(rng.standard_normal((2, 16, 32)), jnp.float32)}
        new_params, state = step(params, state, g)
        u_fixed, s_fixed = fixed.update(g, s_fixed, params)
        if i == 1:  # the schedule is live inside the one compiled program
            assert not np.allclose(new_params["w"], optax.apply_updates(params, u_fixed)["w"], atol=1e-6)
        params = new_params
    assert len(traces) == 1
    assert step._cache_size() == 1
    assert int(state[0].count) == 5


@pytest.mark.parametrize("ns", ["simple", "quintic", "polar_express"])
def test_converges_on_least_squares(ns):
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.standard_normal((256, 32)), jnp.float32)
    w_star = jnp.asarray(rng.standard_normal((2, 32, 48)) / np.sqrt(32), jnp.float32)
    y = jnp.einsum("ni,lio->lno", x, w_star)

    def loss(w):
        return jnp.mean(jnp.square(jnp.einsum("ni,lio->lno", x, w) - y))

    steps = 100
    opt = jm.muon(optax.linear_schedule(0.1, 0.0, steps), ns=ns, momentum=0.9)

    @jax.jit
    def train(w):
        def body(carry, _):
            w, state = carry
            value, g = jax.value_and_grad(loss)(w)
            updates, state = opt.update(g, state, w)
            return (optax.apply_updates(w, updates), state), value

        (w, _), losses = jax.lax.scan(body, (w, opt.init(w)), length=steps)
        return w, losses

    w, losses = train(jnp.zeros_like(w_star))
    chex.assert_tree_all_finite(losses)
    assert float(losses[0]) / float(loss(w)) > 1e3


def test_sharded_update_matches_unsharded():
    # Each of 8 devices holds one slice of the stacked leading axis.
    mesh = jax.make_mesh((8,), ("dp",))
    rng = np.random.default_rng(9)
    shapes = {"wide": (8, 16, 24), "tall": (8, 24, 16)}
    params = {k: jnp.asarray(rng.standard_normal(s) * 0.1, jnp.float32) for k, s in shapes.items()}
    grads = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
    # fp32 Newton–Schulz: bf16 rounding differs between differently batched programs.
    opt = jm.muon(
        0.02,
        weight_decay=0.1,
        weight_decay_mode="cautious",
        scaling="normuon",
        ns="polar_express",
        ns_dtype=jnp.float32,
    )
    state = opt.init(params)
    stacked = P("dp")
    state_specs = jax.tree.map(lambda a: stacked if a.ndim else P(), state)
    sharded = jax.jit(
        jax.shard_map(
            opt.update,
            mesh=mesh,
            in_specs=(stacked, state_specs, stacked),
            out_specs=(stacked, state_specs),
        )
    )

    def place(tree, specs):
        shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
        return jax.device_put(tree, shardings)

    for _ in range(2):
        want, state_want = opt.update(grads, state, params)
        got, state_got = sharded(place(grads, stacked), place(state, state_specs), place(params, stacked))
        chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)
        chex.assert_trees_all_close(state_got, state_want, rtol=1e-5, atol=1e-7)
        state = state_want
        params = optax.apply_updates(params, want)


def test_partition_with_adam():
    params = {"blocks": {"w": jnp.ones((2, 8, 12))}, "bias": jnp.ones(12)}
    labels = {"blocks": {"w": "muon"}, "bias": "adam"}
    opt = optax.partition({"muon": jm.muon(0.02, weight_decay=0.1), "adam": optax.adam(1e-3)}, labels)
    state = opt.init(params)
    grads = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape), params)
    updates, state = opt.update(grads, state, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
    chex.assert_tree_all_finite(updates)


def test_rejects_vectors_and_unknown_options():
    with pytest.raises(ValueError, match="fan_in"):
        jm.scale_by_muon().init({"b": jnp.ones(4)})
    with pytest.raises(ValueError, match="scaling"):
        jm.scale_by_muon(scaling="adafactor")
    with pytest.raises(ValueError, match="weight_decay_mode"):
        jm.muon(0.1, weight_decay_mode="l2")


def test_round_first_and_shape_factor_switches():
    rng = np.random.default_rng(10)
    x = jnp.asarray(rng.standard_normal((2, 24, 40)), jnp.float32)
    c = jm.NS_PRESETS["polar_express"]
    # In float32 rounding first changes nothing; in bf16 it changes the input's last bits only.
    f32 = jm.newton_schulz(x, c, dtype=jnp.float32)
    chex.assert_trees_all_equal(jm.newton_schulz(x, c, dtype=jnp.float32, round_first=True), f32)
    bf = jm.newton_schulz(x, c, round_first=True)
    assert not np.array_equal(bf, jm.newton_schulz(x, c))
    assert float(jnp.linalg.norm(bf - f32) / jnp.linalg.norm(f32)) < 0.05
    # Without the shape factor the update is the scaled one divided by sqrt(fan_out / fan_in).
    grads = {"w": jnp.asarray(rng.standard_normal((2, 16, 64)), jnp.float32)}
    on = jm.scale_by_muon(scaling="normuon", ns_dtype=jnp.float32)
    off = jm.scale_by_muon(scaling="normuon", ns_dtype=jnp.float32, shape_factor=False)
    u_on, _ = on.update(grads, on.init(grads))
    u_off, _ = off.update(grads, off.init(grads))
    chex.assert_trees_all_close(u_off["w"] * 2.0, u_on["w"], rtol=1e-6)
