"""record77 through the real loop (`train.run`): a run stopped and resumed is the run never stopped.

The full recipe at CPU size (width 32, the record's 11-layer plan, windows in blocks of 8 tokens) over
4 steps per stage plus 2 extension steps, on BOS-aligned documents packed as the source packs them.
One straight run checkpoints every 5 steps; copies of it resumed from step 5 (then crossing a stage
boundary and the untie step in the resumed process; its step-10 checkpoint damaged, so that the
resume falls back and compiles what it did not expect) and from step 10 (restoring the untied
state) log the same train and val losses, bit for bit. On 8 devices the checkpoint at step 5 also holds
the Adam gradients waiting on each device (step 4 is one Adam skips), and the resume from it is
bit for bit too; that run pauses after step 7 (`train.stop_after`), in the second stage, so that it
compiles four step variants on 8 CPU devices rather than all ten.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from benchmarks import record77_gpu
from jaxrun import adam_hold, data, schedule, train
from jaxrun.config import MeshConfig, saved_config
from jaxrun.data import BOS

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(jax.default_backend() != "cpu", reason="bitwise resume is checked on CPU"),
]
PER_STAGE, EXTENSION, CKPT_EVERY = 4, 2, 5


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The straight run: its config, its run dir, and {step: loss} for train and val records."""
    yield from _straight_run(tmp_path_factory.mktemp("record77_resume"), devices=1)


@pytest.fixture(scope="module")
def straight_8(tmp_path_factory):
    """The same run on 8 devices, where Adam's gradients wait on each device between its updates."""
    yield from _straight_run(
        tmp_path_factory.mktemp("record77_resume_8"), devices=8, stop_after=CKPT_EVERY + 2
    )


def _straight_run(tmp: Path, devices: int, stop_after: int = 0):
    rng = np.random.default_rng(77)
    for name in ("train_000", "train_001", "val_000"):
        docs = [[BOS, *rng.integers(0, 1000, n)] for n in rng.integers(0, 150, 250)]
        data.write_shard(tmp / f"{name}.bin", np.concatenate(docs).astype(np.uint16))
    cfg = record77_gpu._shortened(record77_gpu._config(str(tmp), tiny=True), PER_STAGE, EXTENSION)
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, model_dim=32),
        mesh=MeshConfig(num_devices=devices),
        train=dataclasses.replace(
            cfg.train,
            out_dir=str(tmp / "runs"),
            ckpt_every=CKPT_EVERY,
            ckpt_keep=10,
            val_every=0,
            stop_after=stop_after,
        ),
    )
    jax.config.update("jax_compilation_cache_dir", str(tmp / "xla_cache"))  # the resumes reuse it
    try:
        result = train.run(cfg)
        yield cfg, Path(result["run_dir"]), _losses(Path(result["run_dir"]))
    finally:
        jax.config.update("jax_compilation_cache_dir", None)


def _losses(run_dir: Path) -> dict[tuple[str, int], float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(key, r["step"]): r[key] for r in records for key in ("train_loss", "val_loss") if key in r}


def test_the_schedule_crosses_stages_and_the_untie_between_checkpoints(straight):
    cfg, _, _ = straight
    starts, split = schedule.stage_starts(cfg), schedule.split_step(cfg)
    assert starts[1] < CKPT_EVERY < starts[2] <= split < 2 * CKPT_EVERY < cfg.train.steps


def test_resume_from_the_untied_state_logs_the_straight_runs_losses(straight, tmp_path):
    _assert_resume_matches(straight, 2 * CKPT_EVERY, tmp_path)


def test_resume_across_a_stage_and_the_untie_past_a_damaged_checkpoint(straight, tmp_path):
    """The newest checkpoint (step 10, past the untie) is damaged: the resume compiles for steps
    10 on, falls back to step 5 and compiles stage 1's and stage 2's variants as it reaches them,
    then logs the straight run's losses."""
    copy = _assert_resume_matches(straight, CKPT_EVERY, tmp_path, damaged=2 * CKPT_EVERY)
    run_log = (copy / "log.txt").read_text()
    assert f"checkpoint {2 * CKPT_EVERY} is damaged" in run_log
    assert f"compiling step {CKPT_EVERY}'s variant, which this run did not expect to reach" in run_log


def test_resume_on_8_devices_restores_the_waiting_adam_gradients(straight_8, tmp_path):
    """(That 8 devices train as one does is `tests/test_sharding.py`'s check, step by step.)"""
    cfg = straight_8[0]
    assert adam_hold.adam_step_of(cfg, 8, CKPT_EVERY - 1) is False  # the checkpoint's sums are not empty
    assert schedule.stage_starts(cfg)[1] < CKPT_EVERY < cfg.train.stop_after < schedule.stage_starts(cfg)[2]
    run_log = (straight_8[1] / "log.txt").read_text()
    assert "for 4 step variant(s)" in run_log  # stage 0's and stage 1's, both Adam variants of each
    _assert_resume_matches(straight_8, CKPT_EVERY, tmp_path)


def _assert_resume_matches(straight, from_step, tmp_path, damaged=None) -> Path:
    """Resume a copy of the straight run from `from_step` (later checkpoints removed, but for
    `damaged`, whose largest file is cut in half) and compare its logged losses; returns the copy."""
    _, run_dir, losses = straight
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    for step_dir in (copy / "checkpoints").iterdir():
        if step_dir.name.isdigit() and int(step_dir.name) == damaged:
            largest = max((f for f in step_dir.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
            largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
        elif step_dir.name.isdigit() and int(step_dir.name) > from_step:
            shutil.rmtree(step_dir)
    train.run(saved_config(copy), resume=str(copy))
    resumed = _losses(copy)
    assert resumed.keys() == losses.keys()
    assert {k: v for k, v in resumed.items() if v != losses[k]} == {}
    return copy
