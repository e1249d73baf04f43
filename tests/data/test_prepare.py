"""Text to shards: round trips through every input type, skipped documents, the manifest."""

import hashlib
import json

import numpy as np
import pytest

from jaxrun import data
from jaxrun.data import prepare
from jaxrun.tokenizer import get_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Line one\nLine two\n\n  indented\ttab\r\nwindows",
    "naïve café — 東京 🙂 <|endoftext|> is plain text here",
    "",
    "x" * 3000,
    "Numbers 1234567890 and punctuation!?;:",
]


def _documents(files):
    """Decode shards back into document texts, splitting at BOS."""
    enc = get_tokenizer()
    stream = np.concatenate([np.asarray(data.read_shard(f)) for f in files])
    starts = np.flatnonzero(stream == data.BOS)
    assert starts[0] == 0
    return [enc.decode(stream[a + 1 : b].tolist()) for a, b in zip(starts, [*starts[1:], len(stream)])]


def _write_inputs(root):
    """TEXTS spread over .txt, .jsonl and .parquet files, plus bad documents; returns the good texts in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "a").mkdir(parents=True)
    (root / "a" / "01.txt").write_text(TEXTS[0], encoding="utf-8")
    (root / "a" / "02.txt").write_bytes(b"caf\xe9 in latin-1")  # undecodable: skipped
    lines = [
        json.dumps({"text": TEXTS[1]}),
        "{not json",
        json.dumps({"title": "no text"}),
        json.dumps({"text": TEXTS[2]}),
    ]
    (root / "a" / "03.jsonl").write_bytes("\n".join(lines).encode() + b'\n{"text": "bad \xff byte"}\n')
    table = pa.table(
        {"text": pa.array([TEXTS[3].encode(), b"\xc3\x28 invalid", TEXTS[4].encode()], pa.binary())}
    )
    pq.write_table(table, root / "b.parquet")
    pq.write_table(pa.table({"text": [TEXTS[5]]}), root / "c.parquet")
    return TEXTS


@pytest.mark.parametrize("workers", [0, 2])
def test_prepare_round_trip(tmp_path, workers):
    expected = _write_inputs(tmp_path / "in")
    m = prepare.prepare(
        [tmp_path / "in" / "a", tmp_path / "in" / "b.parquet", tmp_path / "in" / "c.parquet"],
        tmp_path / "out",
        name="toy",
        shard_tokens=40,
        val_tokens=5,
        workers=workers,
        progress=False,
    )
    val = data.find_shards(str(tmp_path / "out" / "toy_val_*.bin"))
    train = data.find_shards(str(tmp_path / "out" / "toy_train_*.bin"))
    assert _documents(val + train) == expected
    assert _documents(val) == expected[:1]
    # Each undecodable document is named and skipped alone, the rest of its file kept.
    reasons = {s["document"].split("/in/")[1]: s["reason"] for s in m["skipped"]}
    assert set(reasons) == {"a/02.txt", "a/03.jsonl:2", "a/03.jsonl:3", "a/03.jsonl:5", "b.parquet#1"}
    assert "UnicodeDecodeError" in reasons["a/02.txt"] and "text" in reasons["a/03.jsonl:3"]
    # Manifest: counts and hashes match the files; shards hold whole documents, within size.
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk == m and m["documents"] == len(expected)
    for shard in m["shards"]:
        path = tmp_path / "out" / shard["file"]
        tokens = data.read_shard(path)
        assert (
            shard["tokens"] == len(tokens)
            and shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        )
        assert tokens[0] == data.BOS and shard["documents"] == int((tokens == data.BOS).sum())
        assert len(tokens) <= 40 or shard["documents"] == 1
    assert m["tokens"] == sum(s["tokens"] for s in m["shards"])


def test_prepare_refuses_to_mix_with_old_shards(tmp_path):
    (tmp_path / "in.txt").write_text("hello")
    prepare.prepare([tmp_path / "in.txt"], tmp_path / "out", workers=0, progress=False)
    with pytest.raises(FileExistsError, match="data_train_000000.bin"):
        prepare.prepare([tmp_path / "in.txt"], tmp_path / "out", workers=0, progress=False)
