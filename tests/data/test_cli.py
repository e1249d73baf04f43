"""`launch.py data ...`: the prepare command end to end."""

import numpy as np

from jaxrun import data
from jaxrun.data import cli


def test_prepare_cli(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.txt").write_text("Hello world")
    assert (
        cli.main(
            ["prepare", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--workers", "0"]
        )
        == 0
    )
    assert "1 documents, 3 tokens in 1 shards" in capsys.readouterr().out
    np.testing.assert_array_equal(
        data.read_shard(tmp_path / "o" / "data_train_000000.bin"), [50256, 15496, 995]
    )
    assert cli.main(["prepare", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 1
    assert "does not exist" in capsys.readouterr().err
