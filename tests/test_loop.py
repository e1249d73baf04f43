"""The train loop's cadence and its per-step records: validation rule, step times."""

import json
from pathlib import Path

import pytest

from jaxrun import train
from jaxrun.config import ConfigError, apply_overrides, saved_config
from tests.test_train import _shards


def _val_steps(cfg):
    return [s for s in range(cfg.train.steps + 1) if train.val_due(cfg, s)]


def test_val_every_late_follows_train_gpt_simple(tiny_cfg):
    """train_gpt_simple.py: every 125 steps, every 25 once step / steps >= 0.9, and at the end."""
    cfg = apply_overrides(tiny_cfg, ["train.steps=3250", "train.val_every=125", "train.val_every_late=25"])
    script = [s for s in range(3251) if s == 3250 or s % (125 if s / 3250 < 0.9 else 25) == 0]
    assert _val_steps(cfg) == script
    assert _val_steps(cfg)[-8:] == [3075, 3100, 3125, 3150, 3175, 3200, 3225, 3250]


@pytest.mark.parametrize(
    "late, expected", [(0, [0, 40, 80, 100]), (5, [0, 40, 80, 90, 95, 100])], ids=["off", "every5"]
)
def test_val_every_late_switch(tiny_cfg, late, expected):
    cfg = apply_overrides(tiny_cfg, ["train.steps=100", "train.val_every=40", f"train.val_every_late={late}"])
    assert _val_steps(cfg) == expected


def test_val_every_zero_is_only_the_end(tiny_cfg):
    cfg = apply_overrides(tiny_cfg, ["train.steps=10", "train.val_every=0", "train.val_every_late=0"])
    assert _val_steps(cfg) == [10]


def test_run_logs_late_vals_and_step_times(tiny_cfg, tmp_path):
    """A whole run validates on the late cadence and records each step's time in metrics.jsonl."""
    train_files, val_files = _shards(tmp_path)
    cfg = apply_overrides(
        tiny_cfg,
        [
            f"data.train_files={train_files}",
            f"data.val_files={val_files}",
            f"train.out_dir={tmp_path / 'runs'}",
            "train.steps=10",
            "train.val_every=4",
            "train.val_every_late=1",
            "train.micro_batch_seqs=1",
            "model.num_layers=1",
        ],
    )
    out = train.run(cfg)
    records = [json.loads(line) for line in (Path(out["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 4, 8, 9, 10]
    step_ms = [r["step_ms"] for r in records if "train_loss" in r]
    assert len(step_ms) == 10 and all(ms > 0 for ms in step_ms)


def test_loop_overhead_summary_windows():
    """benchmarks/loop_overhead.py: step 0 is left out, windows are a third of short runs, 100 steps at most."""
    from benchmarks import loop_overhead

    short = loop_overhead.summary([500.0] + [10.0] * 6 + [12.0] * 3)  # 9 steady steps: windows of 3
    assert short["window"] == 3 and short["ms_per_step"] == pytest.approx(32 / 3)
    assert short["last_over_first"] == pytest.approx(1.2)
    long = loop_overhead.summary([0.0] + [1.0] * 300 + [2.0] * 100)
    assert long["window"] == 100 and long["last_over_first"] == pytest.approx(2.0)


@pytest.mark.parametrize("fp8", ["false", "true"], ids=["bf16", "fp8_delayed_scales"])
def test_stop_after_pauses_with_a_checkpoint_and_resume_finishes_the_run(tiny_cfg, tmp_path, fp8):
    """`train.stop_after=3` of a 6-step run validates and checkpoints at step 3 and returns; a resume
    goes past the pause to the end, logging the straight run's train losses bit for bit (with the
    MLP's delayed FP8 scales, they are in the checkpoint too)."""
    train_files, val_files = _shards(tmp_path)
    base = [
        f"model.mlp.fp8_down={fp8}",
        "model.init=gpt2",
        f"data.train_files={train_files}",
        f"data.val_files={val_files}",
        "train.steps=6",
        "train.val_every=0",
        "train.micro_batch_seqs=1",
        "model.num_layers=1",
    ]

    def losses(run_dir):
        records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        return {(k, r["step"]): r[k] for r in records for k in ("train_loss", "val_loss") if k in r}

    straight = train.run(apply_overrides(tiny_cfg, [*base, f"train.out_dir={tmp_path / 'a'}"]))
    paused = train.run(
        apply_overrides(tiny_cfg, [*base, f"train.out_dir={tmp_path / 'b'}", "train.stop_after=3"])
    )
    assert (paused["stopped_by"], paused["step"]) == ("stop_after", 3)
    run_dir = Path(paused["run_dir"])
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()] == ["3"]
    assert sorted(losses(run_dir)) == [("train_loss", s) for s in (1, 2, 3)] + [("val_loss", 3)]
    train.run(saved_config(run_dir), resume=str(run_dir))
    resumed = losses(run_dir)
    assert {k: v for k, v in resumed.items() if k[0] == "train_loss"} == {
        k: v for k, v in losses(straight["run_dir"]).items() if k[0] == "train_loss"
    }
    assert ("val_loss", 6) in resumed


def test_stop_after_must_fall_inside_the_run(tiny_cfg):
    with pytest.raises(ConfigError, match="train.stop_after=6"):
        apply_overrides(tiny_cfg, ["train.steps=6", "train.stop_after=6"])
