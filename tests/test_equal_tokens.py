"""benchmarks/equal_tokens.py: val losses of recipes with different batch schedules, by tokens seen."""

import json

import numpy as np

import launch
from benchmarks import equal_tokens


def _run(tmp_path, name, cfg, vals):
    run = tmp_path / name
    run.mkdir()
    (run / "config.json").write_text(cfg.to_json())
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "val_loss": v}) + "\n" for s, v in vals)
    )
    return run


def test_record77_and_simple_meet_at_equal_tokens(tmp_path, capsys):
    """record77's 1490 steps and simple's first 755 are the same 395,837,440 tokens; simple's curve
    is read between its validations."""
    r77 = _run(tmp_path, "r77", launch.load_config("record77"), [(0, 10.0), (250, 4.0), (1490, 3.5)])
    simple = _run(
        tmp_path, "simple", launch.load_config("simple"), [(0, 11.0), (50, 6.0), (75, 5.0), (755, 3.0)]
    )
    _, tokens, _ = equal_tokens.load(r77)[1]
    assert tokens.tolist() == [0, 250 * 131_072, 395_837_440]
    assert equal_tokens.main([str(r77), str(simple), "--out", str(tmp_path / "out")]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [c.strip() for c in rows[2]] == ["250", "32.8", "4.0000", "5.5000"]  # simple step 62.5
    assert [c.strip() for c in rows[3]] == ["1490", "395.8", "3.5000", "3.0000"]
    assert (tmp_path / "out" / "val_at_equal_tokens.png").is_file()


def test_outside_a_runs_range_is_blank():
    got = equal_tokens.at_tokens(np.array([10, 20]), np.array([1.0, 2.0]), np.array([5, 15, 25]))
    assert np.isnan(got[0]) and got[1] == 1.5 and np.isnan(got[2])
