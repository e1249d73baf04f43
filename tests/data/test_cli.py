"""`launch.py data ...`: the prepare command end to end."""

import numpy as np

from jaxrun import data
from jaxrun.data import cli


def test_prepare_cli(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.txt").write_text("Hello world")
    assert (
        cli.main(["prepare", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--workers", "0"])
        == 0
    )
    assert "1 documents, 3 tokens in 1 shards" in capsys.readouterr().out
    np.testing.assert_array_equal(
        data.read_shard(tmp_path / "o" / "data_train_000000.bin"), [50256, 15496, 995]
    )
    assert cli.main(["prepare", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_prepare_writes_val_and_prints_the_flags(tmp_path, capsys, monkeypatch):
    import shlex

    from configs import demo
    from jaxrun.config import apply_overrides

    monkeypatch.setattr(cli, "DEFAULT_VAL_TOKENS", 10)  # the default split, scaled to a small input
    (tmp_path / "in").mkdir()
    for i in range(6):
        (tmp_path / "in" / f"{i}.txt").write_text(f"Document number {i} has a few words in it.")
    argv = ["prepare", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--workers", "0"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert data.find_shards(str(tmp_path / "o" / "data_val_*.bin"))
    flags = shlex.split(out.splitlines()[-1])
    assert flags[:4] == ["python", "launch.py", "--config", "CONFIG"]
    overrides = [value for flag, value in zip(flags[4::2], flags[5::2]) if flag == "--set"]
    cfg = apply_overrides(demo.get_config(), ["data.source=shards", *overrides])
    assert len(data.find_shards(cfg.data.train_files)) == 1 and len(data.find_shards(cfg.data.val_files)) == 1
