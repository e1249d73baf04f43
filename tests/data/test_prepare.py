"""Text to shards, FineWeb download against a local stand-in for the hub, and unxz."""

import hashlib
import http.server
import json
import lzma
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from jaxrun import data, prepare
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


def test_prepare_cli(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.txt").write_text("Hello world")
    assert (
        prepare.main(
            ["prepare", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--workers", "0"]
        )
        == 0
    )
    assert "1 documents, 3 tokens in 1 shards" in capsys.readouterr().out
    np.testing.assert_array_equal(
        data.read_shard(tmp_path / "o" / "data_train_000000.bin"), [50256, 15496, 995]
    )
    assert prepare.main(["prepare", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 1
    assert "does not exist" in capsys.readouterr().err


# ---- FineWeb download against a local hub ----


class _Hub(http.server.BaseHTTPRequestHandler):
    """Serves `<root>/<repo>/<file>` at the hub's `/datasets/<repo>/resolve/<rev>/<file>` URLs.

    `cuts` downloads in a row stop half way through what they were asked for, like
    dropped connections.
    """

    root: Path
    cuts = 0
    requests: list

    def _file(self):
        match = re.match(r"^/datasets/(.+?)/resolve/[^/]+/(.+)$", self.path.split("?")[0])
        path = match and self.root / match.group(1) / match.group(2)
        if not path or not path.is_file():
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.end_headers()
            return None
        return path.read_bytes()

    def _headers(self, body: bytes, length: int, status: int = 200, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("X-Repo-Commit", "0" * 40)
        self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
        self.send_header("Content-Length", str(length))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()

    def do_HEAD(self):
        if (body := self._file()) is not None:
            self._headers(body, len(body))

    def do_GET(self):
        if (body := self._file()) is None:
            return
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if "Range" in self.headers else 0
        type(self).requests.append((self.path.rsplit("/", 1)[1], start))
        extra = {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"} if start else {}
        self._headers(body, len(body) - start, 206 if start else 200, extra)
        if type(self).cuts:
            type(self).cuts -= 1
            self.wfile.write(body[start : (start + len(body)) // 2])
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(tmp_path):
    """A local stand-in for the Hugging Face hub holding a small fineweb10B-gpt2.

    Yields (repo folder, endpoint URL, handler class with the GET log and `cuts`).
    """
    repo = tmp_path / "hub" / "kjj0" / "fineweb10B-gpt2"
    repo.mkdir(parents=True)
    for name in prepare.fineweb_files(3):
        data.write_shard(repo / name, np.arange(5000 + len(name), dtype=np.uint16))
    handler = type("Hub", (_Hub,), {"root": tmp_path / "hub", "requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield repo, f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()
    thread.join()


def test_fineweb_download(tmp_path, hub):
    repo, url, handler = hub
    out = tmp_path / "fineweb"
    assert prepare.main(["fineweb", "--train-shards", "2", "--dir", str(out), "--endpoint", url]) == 0
    names = prepare.fineweb_files(2)
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(names)
    for name in names:
        assert (out / name).read_bytes() == (repo / name).read_bytes()
    # Finished files are kept, a damaged one is fetched again, a new one added.
    handler.requests.clear()
    damaged = out / "fineweb_train_000002.bin"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    prepare.download_fineweb(out, 3, endpoint=url)
    assert [name for name, _ in handler.requests] == ["fineweb_train_000002.bin", "fineweb_train_000003.bin"]
    for name in prepare.fineweb_files(3):
        assert (out / name).read_bytes() == (repo / name).read_bytes()


def test_fineweb_download_resumes(tmp_path, hub, monkeypatch):
    import huggingface_hub

    repo, url, handler = hub
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 1024)  # small files, small chunks
    monkeypatch.setattr(huggingface_hub.file_download.time, "sleep", lambda seconds: None)
    val, train = prepare.fineweb_files(1)
    # A dropped connection is resumed from where it stopped, within the same call.
    handler.cuts = 1
    prepare.download_fineweb(tmp_path / "fw", 0, endpoint=url)
    (_, first), (_, second) = handler.requests
    assert first == 0 and 0 < second <= (repo / val).stat().st_size // 2
    assert (tmp_path / "fw" / val).read_bytes() == (repo / val).read_bytes()
    # When the hub keeps failing, the error names the file; the next run keeps what is done.
    handler.requests.clear()
    handler.cuts = 100
    with pytest.raises(prepare.DownloadError, match=f"{train} failed.*again to resume"):
        prepare.download_fineweb(tmp_path / "fw", 1, endpoint=url)
    handler.cuts = 0
    handler.requests.clear()
    prepare.download_fineweb(tmp_path / "fw", 1, endpoint=url)
    assert [name for name, _ in handler.requests] == [train]
    assert (tmp_path / "fw" / train).read_bytes() == (repo / train).read_bytes()


def test_fineweb_bad_download_is_named(tmp_path, hub):
    repo, url, _ = hub
    (repo / "fineweb_val_000000.bin").write_bytes(b"<html>rate limited</html>")
    with pytest.raises(data.ShardError, match="fineweb_val_000000.bin: truncated header"):
        prepare.download_fineweb(tmp_path / "fw", 1, endpoint=url)
    assert prepare.main(["fineweb", "--train-shards", "200", "--dir", str(tmp_path / "fw")]) == 1
    (repo / "fineweb_val_000000.bin").unlink()
    with pytest.raises(prepare.DownloadError, match="fineweb10B-gpt2/fineweb_val_000000.bin failed"):
        prepare.download_fineweb(tmp_path / "fw2", 1, endpoint=url)


# ---- unxz ----


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
    assert prepare.main(["unxz", str(src), "--out", str(tmp_path / "out")]) == 0
    for name in ["train_000001.bin", "val_000000.bin"]:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / name).read_bytes()
    shards[0]["sha256_uncompressed_bin"] = "0" * 64
    (src / "MANIFEST.json").write_text(json.dumps({"shards": shards}))
    with pytest.raises(data.ShardError, match="train_000001.bin: sha256"):
        prepare.unxz(src, tmp_path / "out")
