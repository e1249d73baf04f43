"""The statistics of benchmarks/record77_val_gap.py: the gap between two kernel sets over seeds."""

import json
import math

import pytest

from benchmarks import record77_val_gap
from benchmarks.record77_val_gap import gap_summary


def test_a_small_steady_gap_is_within():
    s = gap_summary([4.161, 4.152, 4.170], [4.160, 4.150, 4.171], bound=0.01)
    assert s["gaps"] == pytest.approx([0.001, 0.002, -0.001])
    assert s["mean_gap"] == pytest.approx(0.002 / 3)
    deviations = [g - 0.002 / 3 for g in (0.001, 0.002, -0.001)]
    assert s["standard_error"] == pytest.approx(math.sqrt(sum(d * d for d in deviations) / 2 / 3))
    assert s["verdict"] == "within"


def test_a_large_steady_gap_is_outside():
    assert gap_summary([4.20, 4.21, 4.19], [4.15, 4.16, 4.15], bound=0.01)["verdict"] == "outside"


def test_the_two_seeds_measured_cannot_tell():
    """Seeds 0 and 1 on one H100 (2026-12-07): gaps −0.0125 and +0.0428."""
    s = gap_summary([4.1596, 4.1646], [4.1721, 4.1218], bound=0.01)
    assert s["mean_gap"] == pytest.approx(0.01515, abs=1e-5)
    assert s["standard_error"] == pytest.approx(0.02765, abs=1e-5)
    assert s["verdict"] == "cannot tell"


def test_one_val_loss_per_seed_in_each_set():
    with pytest.raises(ValueError, match="one val loss per seed"):
        gap_summary([4.1, 4.2], [4.1], bound=0.01)


def _run(tmp_path, name, seeds, fast, first, steps=150):
    path = tmp_path / name
    path.write_text(
        json.dumps({"steps": steps, "bound": 0.01, "seeds": seeds, "fast": fast, "correct_first": first})
    )
    return str(path)


def test_merge_joins_runs_over_other_seeds(tmp_path, capsys):
    a = _run(tmp_path, "a.json", [0, 1], [4.161, 4.152], [4.160, 4.150])
    b = _run(tmp_path, "b.json", [2], [4.170], [4.171])
    assert record77_val_gap.main(["--merge", a, b, "--out", str(tmp_path / "out")]) == 0
    merged = json.loads((tmp_path / "out" / "record77_val_gap.json").read_text())
    assert merged["seeds"] == [0, 1, 2] and merged["summary"]["verdict"] == "within"
    assert (tmp_path / "out" / "record77_val_gap.png").stat().st_size > 0
    assert "3 seeds): within ±0.01" in capsys.readouterr().out


@pytest.mark.parametrize(
    "second, message",
    [(([1], [4.1], [4.1]), "a seed is in two runs"), (([2], [4.1], [4.1], 300), "differ in steps")],
)
def test_merge_refuses_runs_that_do_not_join(tmp_path, capsys, second, message):
    a = _run(tmp_path, "a.json", [0, 1], [4.161, 4.152], [4.160, 4.150])
    b = _run(tmp_path, "b.json", *second)
    with pytest.raises(SystemExit):
        record77_val_gap.main(["--merge", a, b, "--out", str(tmp_path)])
    assert message in capsys.readouterr().err
