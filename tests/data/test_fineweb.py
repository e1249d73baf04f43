"""FineWeb download against a local stand-in for the hub."""

import hashlib
import http.server
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from jaxrun import data
from jaxrun.data import cli, fineweb


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
    for name in fineweb.fineweb_files(3):
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
    assert cli.main(["fineweb", "--train-shards", "2", "--dir", str(out), "--endpoint", url]) == 0
    names = fineweb.fineweb_files(2)
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(names)
    for name in names:
        assert (out / name).read_bytes() == (repo / name).read_bytes()
    # Finished files are kept, a damaged one is fetched again, a new one added.
    handler.requests.clear()
    damaged = out / "fineweb_train_000002.bin"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    fineweb.download_fineweb(out, 3, endpoint=url)
    assert [name for name, _ in handler.requests] == ["fineweb_train_000002.bin", "fineweb_train_000003.bin"]
    for name in fineweb.fineweb_files(3):
        assert (out / name).read_bytes() == (repo / name).read_bytes()


def test_fineweb_download_resumes(tmp_path, hub, monkeypatch):
    # The submodules by name: huggingface_hub 2.x loads them lazily, so attribute access fails
    # unless something else imported them first.
    import huggingface_hub.constants
    import huggingface_hub.file_download

    repo, url, handler = hub
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 1024)  # small files, small chunks
    monkeypatch.setattr(huggingface_hub.file_download.time, "sleep", lambda seconds: None)
    val, train = fineweb.fineweb_files(1)
    # A dropped connection is resumed from where it stopped, within the same call.
    handler.cuts = 1
    fineweb.download_fineweb(tmp_path / "fw", 0, endpoint=url)
    (_, first), (_, second) = handler.requests
    assert first == 0 and 0 < second <= (repo / val).stat().st_size // 2
    assert (tmp_path / "fw" / val).read_bytes() == (repo / val).read_bytes()
    # When the hub keeps failing, the error names the file; the next run keeps what is done.
    handler.requests.clear()
    handler.cuts = 100
    with pytest.raises(fineweb.DownloadError, match=f"{train} failed.*again to resume"):
        fineweb.download_fineweb(tmp_path / "fw", 1, endpoint=url)
    handler.cuts = 0
    handler.requests.clear()
    fineweb.download_fineweb(tmp_path / "fw", 1, endpoint=url)
    assert [name for name, _ in handler.requests] == [train]
    assert (tmp_path / "fw" / train).read_bytes() == (repo / train).read_bytes()


def test_fineweb_bad_download_is_named(tmp_path, hub):
    repo, url, _ = hub
    (repo / "fineweb_val_000000.bin").write_bytes(b"<html>rate limited</html>")
    with pytest.raises(data.ShardError, match="fineweb_val_000000.bin: truncated header"):
        fineweb.download_fineweb(tmp_path / "fw", 1, endpoint=url)
    assert cli.main(["fineweb", "--train-shards", "200", "--dir", str(tmp_path / "fw")]) == 1
    (repo / "fineweb_val_000000.bin").unlink()
    with pytest.raises(fineweb.DownloadError, match="fineweb10B-gpt2/fineweb_val_000000.bin failed"):
        fineweb.download_fineweb(tmp_path / "fw2", 1, endpoint=url)
