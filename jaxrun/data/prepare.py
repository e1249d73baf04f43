"""Your own text to token shards.

`prepare(inputs, out_dir)` tokenizes `.txt` (one document per file), `.jsonl`
(one document per line, in its `text` field) and `.parquet` (a `text` column)
with the GPT-2 BPE in several processes, and writes shards of whole documents,
each preceded by BOS, plus `manifest.json` (token counts and sha256 per shard).
A document that is not valid UTF-8 or JSON is reported and skipped on its own;
the rest of its file is kept.
"""

from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from jaxrun.data.shards import write_shard
from jaxrun.tokenizer import encode_documents

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
_CHUNK_BYTES = 1 << 20  # text handed to a worker at a time
_PARALLEL_BYTES = 32 << 20  # inputs larger than this get worker processes by default

# A document as read: (label, kind, payload), where kind is "text" (payload is a str), "bytes"
# (UTF-8 to decode), "json" (a JSON line with a "text" field) or "error" (payload says what is wrong).
Record = tuple[str, str, Any]


# ---- reading text ----


def find_text_files(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files and directories (recursively) into the text files to tokenize, in order."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
        elif path.is_file():
            if path.suffix not in TEXT_SUFFIXES:
                raise ValueError(f"{path}: unsupported input type (want {', '.join(TEXT_SUFFIXES)})")
            files.append(path)
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    if not files:
        raise FileNotFoundError(f"no {', '.join(TEXT_SUFFIXES)} files in {list(map(str, inputs))}")
    return files


def read_records(path: Path) -> Iterator[Record]:
    """The documents of one input file, undecoded, so a decoding error costs one document only."""
    if path.suffix == ".txt":
        yield str(path), "bytes", path.read_bytes()
    elif path.suffix == ".jsonl":
        with path.open("rb") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield f"{path}:{n}", "json", line
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path)
        if "text" not in table.schema_arrow.names:
            yield str(path), "error", "no 'text' column"
            return
        row = 0
        for batch in table.iter_batches(columns=["text"]):
            column = batch.column(0)
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                column = column.cast(pa.large_binary())  # decode per value, so one bad value skips one row
            elif not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
                yield str(path), "error", f"'text' column has type {column.type}, not string"
                return
            for value in column.to_pylist():
                if value is None:
                    yield f"{path}#{row}", "error", "null text"
                else:
                    yield f"{path}#{row}", "bytes", value
                row += 1


def _decode(kind: str, payload: Any) -> str:
    """A record's text; raises ValueError with the reason it has none."""
    if kind == "text":
        return payload
    if kind == "bytes":
        return payload.decode("utf-8")
    if kind == "json":
        obj = json.loads(payload)
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ValueError("no 'text' string field")
        obj["text"].encode("utf-8")  # lone surrogates from \ud800-style escapes are not text
        return obj["text"]
    raise ValueError(payload)


def _decoded(records: Iterable[Record], skipped: list[dict[str, str]]) -> Iterator[tuple[str, str]]:
    """(label, text) per decodable record; the others are reported and added to `skipped`."""
    for label, kind, payload in records:
        try:
            yield label, _decode(kind, payload)
        except ValueError as e:  # JSON, Unicode decode and encode errors are all ValueErrors
            skipped.append({"document": label, "reason": f"{type(e).__name__}: {e}"})
            if len(skipped) <= 20:
                tqdm.write(f"skipped {label}: {skipped[-1]['reason']}", file=sys.stderr)


def _chunks(texts: Iterable[tuple[str, str]]) -> Iterator[list[str]]:
    """Group texts into about _CHUNK_BYTES each, the unit of work of a tokenizer process."""
    chunk, size = [], 0
    for _, text in texts:
        chunk.append(text)
        size += len(text)
        if size >= _CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


# ---- writing shards ----


class ShardWriter:
    """Packs whole documents into shards of at most `shard_tokens`; val shards come first."""

    def __init__(self, out_dir: Path, name: str, shard_tokens: int, val_tokens: int):
        self.out_dir, self.name, self.shard_tokens, self.val_left = out_dir, name, shard_tokens, val_tokens
        self.split = "val" if val_tokens > 0 else "train"
        self.docs: list[np.ndarray] = []
        self.size = 0
        self.counts = {"val": 0, "train": 0}
        self.documents = self.tokens = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, tokens: np.ndarray) -> None:
        if self.split == "val" and self.val_left <= 0:
            self.flush()
            self.split = "train"
        if self.size and self.size + len(tokens) > self.shard_tokens:
            self.flush()
        self.docs.append(tokens)
        self.size += len(tokens)
        self.documents += 1
        self.tokens += len(tokens)
        if self.split == "val":
            self.val_left -= len(tokens)

    def flush(self) -> None:
        if not self.docs:
            return
        path = self.out_dir / f"{self.name}_{self.split}_{self.counts[self.split]:06d}.bin"
        self.counts[self.split] += 1
        write_shard(path, np.concatenate(self.docs))
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        self.shards.append(
            {
                "file": path.name,
                "split": self.split,
                "tokens": self.size,
                "documents": len(self.docs),
                "sha256": digest,
            }
        )
        self.docs, self.size = [], 0


def write_shards(
    records: Iterable[Record],
    out_dir: str | os.PathLike,
    *,
    name: str = "data",
    shard_tokens: int = 100_000_000,
    val_tokens: int = 0,
    workers: int | None = None,
    total_bytes: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize documents into shards in `out_dir` and write `manifest.json`; return the manifest.

    Args:
      records: `(label, kind, payload)` documents, e.g. from `read_records`, or
        `(label, "text", str)` for text already in memory.
      name: shard files are `{name}_{val|train}_{i:06d}.bin`.
      shard_tokens: most tokens per shard; a longer document gets a shard of its own.
      val_tokens: the first documents, until this many tokens, go to val shards.
      workers: tokenizer processes; 0 tokenizes in this process. Default: all CPUs
        for inputs over 32 MB, else 0.
      total_bytes: input size, for the progress bar.
    """
    if not 0 < shard_tokens < 2**31:
        raise ValueError(f"shard_tokens={shard_tokens} must be in [1, 2**31) to fit the int32 header")
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = sorted(out_dir.glob(f"{name}_*.bin"))
    if stale:
        raise FileExistsError(
            f"{out_dir} already holds {name} shards ({stale[0].name}, ...); use another --out"
        )
    writer = ShardWriter(out_dir, name, shard_tokens, val_tokens)
    skipped: list[dict[str, str]] = []
    if workers is None:  # start-up costs a few seconds; small inputs are quicker in-process
        workers = (os.cpu_count() or 1) if (total_bytes or 0) > _PARALLEL_BYTES else 0
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress)
    with _Pool(workers) as pool:
        chunks = _chunks(_decoded(_sized(records, bar), skipped))
        for docs in _ordered_map(pool, encode_documents, chunks, window=2 * workers):
            for tokens in docs:
                writer.add(tokens)
            bar.set_postfix(docs=writer.documents, tokens=writer.tokens)
    if writer.split == "val" and writer.counts["val"] == 0:  # every document fit in the val share
        writer.split = "train"
        print(
            f"only {writer.tokens:,} tokens: too few for val_tokens={val_tokens:,} and a train split; "
            "all went to train, no val shard written",
            file=sys.stderr,
        )
    writer.flush()
    bar.close()
    manifest = {
        "tokenizer": "gpt2 (tiktoken r50k_base), BOS 50256 before every document",
        "shard_tokens": shard_tokens,
        "documents": writer.documents,
        "tokens": writer.tokens,
        "shards": writer.shards,
        "skipped": skipped,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if skipped:
        print(
            f"skipped {len(skipped)} undecodable documents; see {out_dir / 'manifest.json'}", file=sys.stderr
        )
    return manifest


def _ordered_map(pool, fn: Callable, items: Iterable, window: int) -> Iterator:
    """`map(fn, items)` on a pool, in order, with at most `window` items in flight (Pool.imap reads
    its whole input ahead, which for a large corpus means all of it in memory)."""
    if pool is None:
        yield from map(fn, items)
        return
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _sized(records: Iterable[Record], bar: tqdm) -> Iterator[Record]:
    """Pass records through, advancing the progress bar by their size."""
    for record in records:
        bar.update(len(record[2]) if isinstance(record[2], (bytes, str)) else 0)
        yield record


class _Pool:
    """A process pool for tokenizing, or None for 0 workers.

    Forks (instant start) while this process runs no other threads and has not
    imported JAX; otherwise spawns, which is safe but re-imports the main module.
    """

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = None

    def __enter__(self):
        if self.workers > 0:
            forkable = threading.active_count() == 1 and "jax" not in sys.modules and os.name == "posix"
            context = multiprocessing.get_context("fork" if forkable else "spawn")
            self.pool = context.Pool(self.workers)
        return self.pool

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate() if exc[0] else self.pool.close()
            self.pool.join()


def run_flags(out_dir: str | os.PathLike, manifest: dict[str, Any], name: str = "data") -> str:
    """The `--set` flags that train on the shards `write_shards` made in `out_dir`."""
    out_dir = Path(out_dir).expanduser().resolve()
    splits = {shard["split"] for shard in manifest["shards"]}
    return " ".join(
        f"--set 'data.{split}_files={out_dir / f'{name}_{split}_*.bin'}'"
        for split in ("train", "val")
        if split in splits
    )


def prepare(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, **kwargs) -> dict[str, Any]:
    """Tokenize text files and directories into shards; see `write_shards` for the options."""
    files = find_text_files(inputs)
    records = (record for path in files for record in read_records(path))
    return write_shards(records, out_dir, total_bytes=sum(f.stat().st_size for f in files), **kwargs)
