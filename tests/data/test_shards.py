"""The shard file format: round trips, named errors for bad files, finding files, unxz."""

import hashlib
import json
import lzma

import numpy as np
import pytest

from jaxrun import data
from jaxrun.data import BOS, cli


def test_write_read_round_trip(tmp_path):
    tokens = np.array([BOS, 1, 2, 65535, 0], np.uint16)
    data.write_shard(tmp_path / "a.bin", tokens)
    got = data.read_shard(tmp_path / "a.bin")
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, tokens)
    assert (tmp_path / "a.bin").stat().st_size == 1024 + 2 * 5


def test_write_refuses_large_ids(tmp_path):
    with pytest.raises(ValueError, match="65535"):
        data.write_shard(tmp_path / "a.bin", np.array([1, 65536]))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[:-2], "truncated"),
        (lambda b: b[:100], "truncated header"),
        (lambda b: b + b"\0\0", "file has"),
        (lambda b: b"\1\0\0\0" + b[4:], "bad magic"),
        (lambda b: b[:4] + b"\7\0\0\0" + b[8:], "unsupported version 7"),
    ],
)
def test_bad_shards_are_named(tmp_path, shards, damage, message):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(damage(shards[0].read_bytes()))
    with pytest.raises(data.ShardError, match=message) as err:
        data.read_shard(bad)
    assert str(bad) in str(err.value)
    # A bad file among good ones fails when the stream is built, before any batch.
    with pytest.raises(data.ShardError, match="bad.bin"):
        data.TokenStream([*shards, bad], batch_seqs=2, seq_len=8)
    with pytest.raises(data.ShardError, match="bad.bin"):
        data.DocumentStream([bad, *shards], batch_seqs=2, seq_len=8, max_doc_len=8)


def test_find_shards(tmp_path, shards):
    assert data.find_shards(str(tmp_path / "toy_train_*.bin")) == shards
    with pytest.raises(data.ShardError, match="nothing_\\*"):
        data.find_shards(str(tmp_path / "nothing_*.bin"))


def test_unxz(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shards = []
    for name in ["train_000001.bin", "val_000000.bin"]:
        data.write_shard(tmp_path / name, np.arange(300, dtype=np.uint16))
        raw = (tmp_path / name).read_bytes()
        (src / f"{name}.xz").write_bytes(lzma.compress(raw))
        shards.append({"file": f"{name}.xz", "sha256_uncompressed_bin": hashlib.sha256(raw).hexdigest()})
    (src / "MANIFEST.json").write_text(json.dumps({"shards": shards}))
    with pytest.raises(data.ShardError, match="xz-compressed; unpack it with .*data unxz"):
        data.read_shard(src / "val_000000.bin.xz")
    assert cli.main(["unxz", str(src), "--out", str(tmp_path / "out")]) == 0
    for name in ["train_000001.bin", "val_000000.bin"]:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / name).read_bytes()
    shards[0]["sha256_uncompressed_bin"] = "0" * 64
    (src / "MANIFEST.json").write_text(json.dumps({"shards": shards}))
    with pytest.raises(data.ShardError, match="train_000001.bin: sha256"):
        data.unxz(src, tmp_path / "out")


def test_ids_outside_the_vocabulary_are_named(tmp_path, shards):
    bad = tmp_path / "toy_train_000009.bin"
    data.write_shard(bad, np.array([BOS, 5, 60000, *range(30)], np.uint16))
    with pytest.raises(data.ShardError, match=r"toy_train_000009.bin: token id 60000 at position 2 .*50304"):
        data.ShardSource([bad], vocab_size=50304)[0]
    assert data.ShardSource([bad])[0][2] == 60000  # no vocabulary, no check
    stream = data.TokenStream([*shards, bad], batch_seqs=1, seq_len=8, vocab_size=50304, prefetch=3)
    with stream, pytest.raises(data.ShardError, match="token id 60000"):
        for _ in range(10_000):  # the walk reaches the bad shard last, in the prefetch thread
            next(stream)
