"""jaxrun against its PyTorch twin (benchmarks/torch_reference), recipe by recipe.

Each recipe is shrunk to D=64, L=2, V=256, T=32 and run in float32 on the CPU,
Newton–Schulz included. From the same weights and batch both sides must give
the same loss and the same gradient for every param, and the same params after
three full optimizer steps (micro-batched, scheduled, Muon and Adam).

The torch side runs in this process when it has torch; otherwise in the
interpreter named by $JAXRUN_TORCH_PYTHON or found at ./.venv-torch (see
`benchmarks.torch_reference.torch_python`), through `benchmarks.torch_reference.worker`.
Without either, the tests that need torch skip.
"""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import launch
from benchmarks import bench
from benchmarks.torch_reference import REPO, TORCH_PYTHON_ENV, convert, torch_python
from jaxrun import model, optim, sharding, train
from jaxrun.config import MeshConfig, config_from_dict

RECIPES = ("simple", "gpt2_llmc")
STEPS = 3
LOSS_RTOL = 1e-5
GRAD_TOL = 1e-5  # max |Δ| relative to the param's largest gradient
PARAM_TOL = 1e-5  # max |Δ| relative to the param's largest entry
# Leaves whose gradient is zero in exact arithmetic, so both sides see only rounding noise.
# Without QK-norm, a key bias adds q·b to every score of a query: softmax ignores it.
ZERO_GRADIENT = {"simple": (), "gpt2_llmc": ("blocks/attn/b_k",)}
NOISE = 1e-6  # such a gradient stays below this fraction of the model's largest one
NOISE_MOVE = 1e-4  # and Adam moves such a param by less than this fraction of its size


def tiny(recipe: str):
    """The recipe at test size, float32 everywhere, 2 micro-batches per step, one device."""
    cfg = launch.load_config(recipe)
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(
            cfg.model,
            num_layers=2,
            model_dim=64,
            head_dim=16,
            vocab_size=256,
            max_seq_len=32,
            compute_dtype="float32",
        ),
        optim=dataclasses.replace(
            cfg.optim, muon_ns_dtype="float32", warmup_steps=min(cfg.optim.warmup_steps, 2)
        ),
        data=dataclasses.replace(cfg.data, seq_len=32, batch_seqs=8, val_tokens=256, val_batch_seqs=8),
        train=dataclasses.replace(cfg.train, steps=STEPS, micro_batch_seqs=4, progress=False),
        mesh=MeshConfig(num_devices=1),
    )


def flat_params(params) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(params))
    return {optim.path_str(path): np.asarray(leaf) for path, leaf in leaves}


def perturbed_params(cfg, seed: int = 0) -> dict[str, np.ndarray]:
    """The recipe's init plus noise, so no gradient is zero (the speedrun zeroes its output layers)."""
    rng = np.random.default_rng(seed)
    flat = flat_params(model.init(jax.random.key(seed), cfg.model))
    for path, p in flat.items():
        scale = 0.5 / np.sqrt(p.shape[-2]) if p.ndim >= 2 else 0.1
        flat[path] = (p + scale * rng.standard_normal(p.shape)).astype(np.float32)
    return flat


def token_rows(cfg, *lead: int, seed: int = 1) -> np.ndarray:
    shape = (*lead, cfg.data.batch_seqs, cfg.data.seq_len + 1)
    return np.random.default_rng(seed).integers(0, cfg.model.vocab_size, shape).astype(np.int32)


def run_torch(cfg, task: str, params: dict[str, np.ndarray], rows: np.ndarray | None = None) -> dict:
    """The twin's answer to one `worker.parity` request, in or out of this process."""
    request = {"config": np.array(cfg.to_json()), "task": np.array(task)}
    request |= {f"params/{k}": v for k, v in params.items()}
    if rows is not None:
        request["rows"] = rows
    if importlib.util.find_spec("torch") is not None:
        from benchmarks.torch_reference import worker

        return worker.parity(request)
    python = torch_python()
    if python is None:
        pytest.skip(f"no torch here: set ${TORCH_PYTHON_ENV} or create ./.venv-torch")
    return _run_torch_process(python, request)


def _run_torch_process(python: str, request: dict) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        req, out = os.path.join(tmp, "request.npz"), os.path.join(tmp, "answer.npz")
        np.savez(req, **request)
        # one thread: the models are tiny, and torch's spinning threads crawl on a busy 2-core machine
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        cmd = [python, "-m", "benchmarks.torch_reference.worker", "parity", req, out]
        done = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode:
            sys.stderr.write(done.stderr)
            raise RuntimeError(f"the torch worker failed ({done.returncode}): {done.stderr[-2000:]}")
        with np.load(out) as answer:
            return dict(answer)


def assert_close_per_param(got: dict, want: dict, tol: float, what: str) -> None:
    """Every leaf: max |got - want| <= tol · max |want| (or <= tol when want is all zero)."""
    assert sorted(got) == sorted(want)
    worst = {}
    for path, w in want.items():
        g, w = np.asarray(got[path], np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape, (path, g.shape, w.shape)
        worst[path] = np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1.0 if not w.any() else 0.0)
    bad = {p: f"{e:.2e}" for p, e in worst.items() if not e <= tol}
    assert not bad, f"{what} differ beyond {tol:.0e} of their scale: {bad}"


# --- torch-free: names, layouts and optimizer groups --------------------------------------


@pytest.mark.parametrize("recipe", RECIPES)
def test_weight_transfer_round_trips(recipe):
    cfg = tiny(recipe)
    flat = perturbed_params(cfg)
    state = convert.jax_to_torch(flat)
    L, D = cfg.model.num_layers, cfg.model.model_dim
    assert state["blocks.1.mlp.up.weight"].shape == (cfg.model.mlp_dim, D)  # torch is [out, in]
    np.testing.assert_array_equal(state["blocks.1.attn.q.weight"], flat["blocks/attn/w_q"][1].T)
    assert len([k for k in state if k.startswith("blocks.")]) == L * len(
        [k for k in flat if k.startswith("blocks/")]
    )
    back = convert.torch_to_jax(state)
    assert sorted(back) == sorted(flat)
    for path in flat:
        np.testing.assert_array_equal(back[path], flat[path], err_msg=path)
    nested = convert.unflatten(flat)
    assert jax.tree.structure(nested) == jax.tree.structure(model.init(jax.random.key(0), cfg.model))


@pytest.mark.parametrize("recipe", RECIPES)
def test_twin_groups_follow_param_table(recipe):
    cfg = tiny(recipe)
    for path, p in perturbed_params(cfg).items():
        name, _ = convert.torch_name(path)
        ndim = p.ndim - ("{i}" in name)
        assert convert.param_group(name.format(i=0), ndim) == optim.label_of(path), path


def test_config_survives_json():
    for recipe in RECIPES:
        cfg = tiny(recipe)
        assert config_from_dict(json.loads(cfg.to_json())) == cfg


# --- the two frameworks side by side --------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES)
def test_twin_init_draws_from_the_same_law(recipe):
    cfg = tiny(recipe)
    ours = flat_params(model.init(jax.random.key(0), cfg.model))
    answer = run_torch(cfg, "init", {})
    twin = {k.removeprefix("params/"): v for k, v in answer.items()}
    assert {k: v.shape for k, v in twin.items()} == {k: v.shape for k, v in ours.items()}
    for path, want in ours.items():
        got = twin[path]
        if np.all(want == want.flat[0]):  # zeros and ones
            np.testing.assert_array_equal(got, want, err_msg=path)
        else:
            np.testing.assert_allclose(got.std(), want.std(), rtol=0.1, err_msg=path)
            assert abs(got.mean()) < 0.1 * want.std(), path


def jax_loss_and_grads(cfg, params, rows):
    inputs, targets = bench.split_rows(rows)
    batch = {"inputs": inputs, "targets": targets}

    def objective(p):
        losses = model.token_losses(p, batch, cfg.model)
        loss = losses.sum() / (targets >= 0).sum()
        return (loss if cfg.optim.loss_reduction == "mean" else losses.sum()), loss

    with jax.default_matmul_precision("highest"):
        (_, loss), grads = jax.value_and_grad(objective, has_aux=True)(convert.unflatten(params))
    return float(loss), flat_params(grads)


def jax_train(cfg, params, batches):
    """jaxrun's own train step from `params`; the loss and params after each step."""
    mesh = sharding.make_mesh(cfg.mesh)
    accum = train.grad_accum_steps(cfg, mesh.size)
    state = train.init_state(cfg, jax.random.key(0), mesh)
    state = state._replace(params=jax.device_put(convert.unflatten(params), sharding.replicated(mesh)))
    step = train.make_train_step(cfg, mesh)
    losses, history = [], []
    with jax.default_matmul_precision("highest"):
        for rows in batches:
            inputs, targets = bench.split_rows(rows)
            local = {"inputs": inputs, "targets": targets}
            local = {k: v.reshape(accum, -1, v.shape[-1]) for k, v in local.items()}
            state, metrics = step(state, sharding.global_batch(local, sharding.batch_sharding(mesh)))
            losses.append(float(metrics["train_loss"]))
            history.append(flat_params(state.params))
    return losses, history


@pytest.mark.parametrize("recipe", RECIPES)
def test_same_loss_and_gradients(recipe):
    cfg = tiny(recipe)
    assert_twin_loss_and_grads(cfg, perturbed_params(cfg), token_rows(cfg), LOSS_RTOL, GRAD_TOL, NOISE)


def assert_twin_loss_and_grads(cfg, params, rows, loss_rtol, grad_tol, noise, what="gradients") -> None:
    """jaxrun and the twin give the same loss and gradients; a leaf whose gradient is zero in
    exact arithmetic (`ZERO_GRADIENT`) stays below `noise` of the largest gradient on both sides."""
    loss, grads = jax_loss_and_grads(cfg, params, rows)
    answer = run_torch(cfg, "grads", params, rows)
    np.testing.assert_allclose(float(answer["loss"]), loss, rtol=loss_rtol)
    torch_grads = {k.removeprefix("grads/"): v for k, v in answer.items() if k.startswith("grads/")}
    largest = max(np.abs(g).max() for g in grads.values())
    for path in ZERO_GRADIENT[cfg.name]:
        for side in (grads, torch_grads):
            assert np.abs(side.pop(path)).max() <= noise * largest, path
    assert_close_per_param(torch_grads, grads, grad_tol, what)


@pytest.mark.parametrize("recipe", RECIPES)
def test_same_params_after_three_steps(recipe):
    cfg = tiny(recipe)
    params, batches = perturbed_params(cfg), token_rows(cfg, STEPS)
    losses, history = jax_train(cfg, params, batches)
    answer = run_torch(cfg, "train", params, batches)
    for step in range(STEPS):
        np.testing.assert_allclose(float(answer[f"loss/{step}"]), losses[step], rtol=LOSS_RTOL)
        prefix = f"params/{step}/"
        got = {k.removeprefix(prefix): v for k, v in answer.items() if k.startswith(prefix)}
        want = dict(history[step])
        for path in ZERO_GRADIENT[recipe]:
            for side in (got, want):
                moved = np.abs(side.pop(path) - params[path]).max()
                assert moved <= NOISE_MOVE * np.abs(params[path]).max(), (path, moved)
        assert_close_per_param(got, want, PARAM_TOL, f"params after step {step + 1}")


BF16_LOSS_RTOL = 1e-2
BF16_GRAD_TOL = 1e-1  # bf16 rounds each activation to 2^-8 of its size; both sides round in their own order
SMALL = 0.02  # the scale of the inputs of the norms in the bf16 check (see there)


@pytest.mark.parametrize("recipe", RECIPES)
def test_bf16_loss_and_gradients(recipe):
    """In bf16, as the recipes train, with the norms' inputs small.

    The token embedding (and, with QK norm, the query and key weights) are scaled down so that
    mean(x²) at the embedding norm and the QK norm lies far below bf16's epsilon (2⁻⁷): a norm
    that added bf16's epsilon instead of float32's, as PyTorch's `F.rms_norm` uses for bf16
    inputs, shrinks its output several-fold there. Each token also repeats across the batch, so
    that the token embedding's gradient sums many bf16 terms: jaxrun gathers rows in float32 and
    casts after, so that sum runs in float32 as PyTorch's does.
    """
    base = tiny(recipe)
    cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, compute_dtype="bfloat16"))
    params = perturbed_params(cfg)
    small = (
        ("embed/tokens", "blocks/attn/w_q", "blocks/attn/w_k")
        if cfg.model.attn.qk_norm
        else ("embed/tokens",)
    )
    for path in small:
        params[path] = (SMALL * params[path]).astype(np.float32)
    rows = token_rows(cfg) % 16  # 16 distinct tokens: each repeats about 16 times a row
    assert_twin_loss_and_grads(cfg, params, rows, BF16_LOSS_RTOL, BF16_GRAD_TOL, 1e-2, "bf16 gradients")


# --- the benchmark, end to end on the CPU ----------------------------------------------------


def test_bench_writes_table_json_and_plot(tmp_path):
    """`launch.py bench` on tiny shards: both frameworks (torch when present) reach the same val loss."""
    from jaxrun import data

    rng = np.random.default_rng(0)
    for name, size in (("train_000001.bin", 6000), ("train_000002.bin", 6000), ("val_000000.bin", 3000)):
        data.write_shard(tmp_path / name, rng.integers(0, 256, size))
    cfg = tiny("simple")
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(
            cfg.data,
            train_files=str(tmp_path / "train_*.bin"),
            val_files=str(tmp_path / "val_*.bin"),
            val_tokens=2048,
        ),
    )
    with_torch = torch_python() is not None
    out = tmp_path / "bench"
    argv = ["--steps", "4", "--warmup-steps", "1", "--val-every", "2", "--out", str(out)]
    argv += ["--compare", "torch", "--no-torch-compile"] if with_torch else []
    assert bench.main(argv, lambda name: cfg) == 0

    report = json.loads((out / "bench.json").read_text())
    assert (out / "loss.png").stat().st_size > 0
    rows = {row["framework"]: row for row in report["table"]}
    assert sorted(rows) == (["jax", "torch"] if with_torch else ["jax"])
    for fw, result in report["results"].items():
        assert len(result["step_ms"]) == len(result["train_loss"]) == 4
        assert [step for step, _ in result["val"]] == [0, 2, 4]
        assert rows[fw]["tokens_per_s"] > 0 and 0 < rows[fw]["mfu"] < 1
    if with_torch:
        jax_val, torch_val = (report["results"][fw]["val"] for fw in ("jax", "torch"))
        np.testing.assert_allclose([v for _, v in torch_val], [v for _, v in jax_val], rtol=1e-5)
