"""The record-77 PyTorch twin on its own (benchmarks/torch_reference/record77*.py), in the torch interpreter.

Its self-test (converter round trip, paired-head interleave against a per-head loop, banded
attention against the dense mask, FP8 head backward, feature switches, 14 scheduled steps that
cross every stage and the split step), and the worker protocol that jaxrun's record-77 parity
tests call: init -> grads -> train, checked for shapes, finiteness and the tied-gradient convention.
Skips without a torch interpreter.
"""

import json
import os
import subprocess

import numpy as np
import pytest

from benchmarks import torch_reference
from benchmarks.torch_reference import record77_convert as convert

CONFIG = dict(vocab_size=256, model_dim=96, num_heads=6, head_dim=16, max_seq_len=64, block_size=8)
T, RANKS = 32, 2


def _run(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    python = torch_reference.torch_python()
    if python is None:
        pytest.skip(f"no torch here: set ${torch_reference.TORCH_PYTHON_ENV} or create ./.venv-torch")
    env = dict(os.environ, PYTHONPATH=str(torch_reference.REPO), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [python, "-m", *args], cwd=torch_reference.REPO, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _ask(request: dict, tmp_path) -> dict[str, np.ndarray]:
    base = {"config": json.dumps(CONFIG), "schedule": json.dumps({"scheduled": 6, "extension": 1})}
    np.savez(tmp_path / "in.npz", **base, **request)
    _run(
        [
            "benchmarks.torch_reference.worker",
            "record77",
            str(tmp_path / "in.npz"),
            str(tmp_path / "out.npz"),
        ],
        tmp_path,
    )
    with np.load(tmp_path / "out.npz") as out:
        return dict(out)


def _batch(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CONFIG["vocab_size"], (RANKS, T + 1))
    cu = np.array([[0, 11, T, T]] * RANKS)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "cu_seqlens": cu}


def test_selftest(tmp_path):
    done = _run(["benchmarks.torch_reference.record77_selftest"], tmp_path)
    assert done.stdout.count("ok ") == 7, done.stdout


def test_worker_protocol(tmp_path):
    init = _ask({"task": "init", "seed": 3}, tmp_path)
    params = {k.removeprefix("params/"): v for k, v in init.items()}
    assert params["blocks/attn/w_q"].shape == (10, 96, 96) and params["value_embed/tables"].shape == (
        5,
        256,
        96,
    )
    np.testing.assert_array_equal(params["embed/tokens"], params["lm_head/w"].T)  # tied at init
    rng = np.random.default_rng(0)
    params["bigram/table"] = rng.normal(0, 0.02, params["bigram/table"].shape).astype(np.float32)
    flat_params = {f"params/{k}": v for k, v in params.items()}

    grads = _ask({"task": "grads", "step": 1, **flat_params, **_batch(1)}, tmp_path)
    assert grads["losses"].shape == (RANKS, T) and np.isfinite(grads["loss"])
    assert np.isclose(grads["loss"], grads["losses"].sum(1).mean())
    assert grads["mtp_weights"].shape == (3,) and grads["ws_long"] == 3 * 8 and grads["attn_scale"] == 0.1
    g = {k.removeprefix("grads/"): v for k, v in grads.items() if k.startswith("grads/")}
    assert set(g) == set(params) and all(g[k].shape == params[k].shape for k in g)
    assert not g["embed/tokens"].any() and np.abs(g["lm_head/w"]).max() > 0  # tied: all on lm_head/w
    assert (
        np.abs(g["bigram/table"]).max() > 0 and np.abs(g["blocks/mlp/w_down"]).max() > 0
    )  # w_up: 0 while w_down is 0

    steps = 4
    train = _ask(
        {
            "task": "train",
            "steps": steps,
            "polar_dtype": "float32",
            **flat_params,
            **{f"{k}/{s}": v for s in range(steps) for k, v in _batch(10 + s).items()},
        },
        tmp_path,
    )
    final = {
        k.removeprefix(f"params/{steps - 1}/"): v
        for k, v in train.items()
        if k.startswith(f"params/{steps - 1}/")
    }
    assert set(final) == set(params) and all(np.isfinite(v).all() for v in final.values())
    assert all(np.isfinite(train[f"loss/{s}"]) for s in range(steps))
    moved = np.abs(final["blocks/attn/w_q"] - params["blocks/attn/w_q"]).max()
    assert moved > 0 and not np.array_equal(final["lm_head/w"], params["lm_head/w"])
    np.testing.assert_array_equal(
        final["embed/tokens"], final["lm_head/w"].T
    )  # still tied before the split (step 3)
    # the padding the twin adds (mlp slot 11, scalar padding) never reaches jaxrun's params
    assert set(convert.torch_to_jax(convert.jax_to_torch(final))) == set(params)
