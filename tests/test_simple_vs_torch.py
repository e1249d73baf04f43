"""`benchmarks/simple_vs_torch.py --merge`: the two sides of runs made in separate calls, in one table and plot."""

import json

import pytest

from benchmarks import simple_vs_torch as svt


def _side(ms: float, steps: int = 40, val: float = 4.0) -> dict:
    return {
        "step_ms": [3 * ms] + [ms] * (steps - 1),  # a slow first (compile) step, left out of the pace
        "val": {"0": 10.8, str(steps // 2): val + 0.5, str(steps): val},  # as JSON stores them
        "peak_gib": 35.0,
        "compile_s": 20.0,
        "wall_s": 60.0,
    }


def _write(path, runs: dict):
    path.write_text(json.dumps(runs))
    return path


def test_merge_makes_one_table_and_plot_of_both_sides(tmp_path, capsys):
    torch_json = _write(tmp_path / "torch.json", {"40": {"torch": _side(1000.0)}})
    jax_json = _write(tmp_path / "jax.json", {"40": {"jaxrun": _side(850.0, val=3.99)}})
    out = tmp_path / "merged"
    out.mkdir()
    results = svt.merge([jax_json, torch_json])
    assert list(results) == [40] and list(results[40]) == ["torch", "jaxrun"]
    assert results[40]["jaxrun"]["val"] == {0: 10.8, 20: 4.49, 40: 3.99}
    svt.report(results, out)
    printed = capsys.readouterr().out
    assert "40 | jaxrun/torch step time | 0.850×" in printed
    assert "@20:4.5000 @40:4.0000" in printed and "@20:4.4900 @40:3.9900" in printed
    assert (out / "simple_vs_torch.png").stat().st_size > 0
    assert json.loads((out / "simple_vs_torch.json").read_text())["40"]["torch"]["step_ms"][1] == 1000.0


def test_merge_refuses_a_side_given_twice_and_names_both_files(tmp_path):
    first = _write(tmp_path / "a.json", {"40": {"torch": _side(1000.0)}})
    second = _write(tmp_path / "b.json", {"40": {"torch": _side(990.0)}})
    with pytest.raises(SystemExit, match=r"40 steps of torch are in both .*a\.json and .*b\.json"):
        svt.merge([first, second])


def test_merge_names_an_unreadable_file(tmp_path):
    bad = tmp_path / "half.json"
    bad.write_text('{"40": {"torch": ')
    with pytest.raises(SystemExit, match=r"cannot read .*half\.json"):
        svt.merge([bad])


def test_jaxrun_side_takes_switches_and_the_table_names_them(tmp_path, monkeypatch):
    """--set reaches launch.py after the harness's own overrides, and the table says which ran."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    records = [{"step": s, "step_ms": 900.0} for s in range(1, 41)] + [{"step": 40, "val_loss": 3.9}]
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (run_dir / "result.json").write_text(json.dumps({"peak_device_gib": 35.0, "compile_s": 18.0}))
    commands = []

    def fake_run(cmd, cwd, log):
        commands.append(cmd)
        return f"run dir {run_dir}\n"

    monkeypatch.setattr(svt, "run_logged", fake_run)
    side = svt.run_jax(tmp_path, 40, 65536, ("t_*.bin", "v_*.bin"), ["model.kernels.mlp=pallas"])
    (cmd,) = commands
    assert cmd[-2:] == ["--set", "model.kernels.mlp=pallas"]
    assert side["switches"] == ["model.kernels.mlp=pallas"] and side["val"] == {40: 3.9}
    table = svt.table({40: {"torch": _side(1000.0), "jaxrun": side}})
    assert "40 | jaxrun (model.kernels.mlp=pallas) | 900.0 |" in table
    assert "0.900×" in table
