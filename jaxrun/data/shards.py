"""llm.c/FineWeb token shards: the file format, and a grain source over them.

A shard is a 256 x int32 header (`magic=20240520`, `version=1`, `num_tokens`)
followed by `num_tokens` uint16 GPT-2 ids; every document starts with
`<|endoftext|>` (50256), used as BOS. `ShardSource` is a grain
`RandomAccessDataSource` over memory-mapped shards whose headers are all checked
when it is built, so a bad file fails before training starts. `unxz` unpacks
`*.bin.xz` shards such as `offline_english`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import lzma
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np
from tqdm import tqdm

MAGIC, VERSION, HEADER_INTS, BOS = 20240520, 1, 256, 50256
HEADER_BYTES = HEADER_INTS * 4


class ShardError(ValueError):
    """A shard file that is missing, malformed or truncated; the message names it."""


def read_header(path: str | os.PathLike) -> int:
    """Validate a shard's header against its file size; return its token count."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise ShardError(f"{path}: cannot read shard ({e.strerror or e})") from e
    if raw.startswith(b"\xfd7zXZ\x00"):
        raise ShardError(f"{path}: xz-compressed; unpack it with `python launch.py data unxz {path.parent}`")
    if len(raw) < HEADER_BYTES:
        raise ShardError(f"{path}: truncated header ({size} bytes, need {HEADER_BYTES})")
    header = np.frombuffer(raw, dtype="<i4")
    if header[0] != MAGIC:
        raise ShardError(f"{path}: bad magic {header[0]} (expected {MAGIC}); not an llm.c token shard")
    if header[1] != VERSION:
        raise ShardError(f"{path}: unsupported version {header[1]} (expected {VERSION})")
    num_tokens = int(header[2])
    expected = HEADER_BYTES + 2 * num_tokens
    if num_tokens < 0 or size != expected:
        raise ShardError(
            f"{path}: header says {num_tokens} tokens ({expected} bytes) but the file has {size} bytes"
            + (" (truncated)" if size < expected else "")
        )
    return num_tokens


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """Memory-map a validated shard's tokens as uint16."""
    num_tokens = read_header(path)
    if num_tokens == 0:
        return np.zeros(0, np.uint16)
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(num_tokens,))


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> None:
    """Write tokens as an llm.c shard (via a temporary file, so readers never see half of one)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() > 65535):
        raise ValueError(f"{path}: token ids must lie in [0, 65535] to fit uint16")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, tokens.size
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2", copy=False).tobytes())
    tmp.replace(path)


def find_shards(pattern: str) -> list[Path]:
    """The files matching a glob (`~` expanded), sorted; ShardError if there are none."""
    files = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern)))
    if not files:
        raise ShardError(f"no shard files match {pattern!r}")
    return files


class ShardSource(grain.sources.RandomAccessDataSource):
    """grain data source: item i is shard i's tokens, memory-mapped; headers checked up front."""

    def __init__(self, files: Sequence[str | os.PathLike], vocab_size: int | None = None):
        if not files:
            raise ShardError("no shard files given")
        self.files = tuple(Path(f) for f in files)
        self.num_tokens = tuple(read_header(f) for f in self.files)
        self.vocab_size = vocab_size
        self._bos: dict[int, np.ndarray] = {}
        self._checked: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> np.ndarray:
        """Shard `index`'s tokens; the first access checks them against `vocab_size`, if given."""
        tokens = read_shard(self.files[index])
        if self.vocab_size is not None and index not in self._checked:
            check_token_ids(tokens, self.vocab_size, self.files[index])
            self._checked.add(index)
        return tokens

    def bos_positions(self, index: int) -> np.ndarray:
        """Offsets of every BOS token in shard `index` (the last two shards' are kept)."""
        return cached(self._bos, index, lambda: np.flatnonzero(self[index] == BOS))

    def __repr__(self) -> str:
        return f"ShardSource({len(self.files)} files, {sum(self.num_tokens):,} tokens)"


def check_token_ids(tokens: np.ndarray, vocab_size: int, path: str | os.PathLike) -> None:
    """ShardError naming `path` and the first id if any token is outside the model's vocabulary.

    An out-of-range id would otherwise index past the embedding table, which XLA
    clamps silently.
    """
    if len(tokens) and int(tokens.max()) >= vocab_size:
        at = int(np.argmax(tokens >= vocab_size))
        raise ShardError(
            f"{path}: token id {int(tokens[at])} at position {at:,} is outside the vocabulary "
            f"(model.vocab_size={vocab_size}); were these shards made with another tokenizer?"
        )


def cached(cache: dict, key: Any, compute: Callable[[], Any], size: int = 2) -> Any:
    """Look `key` up in a small insertion-ordered cache, computing and evicting as needed."""
    if key not in cache:
        while len(cache) >= size:
            cache.pop(next(iter(cache)))
        cache[key] = compute()
    return cache[key]


# ---- .bin.xz ----


def unxz(src: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Decompress every `*.bin.xz` in `src` to `out_dir` (default `src`), checking headers and sha256."""
    src = Path(src).expanduser()
    out_dir = Path(out_dir).expanduser() if out_dir else src
    out_dir.mkdir(parents=True, exist_ok=True)
    expected = {}
    if (src / "MANIFEST.json").is_file():
        for shard in json.loads((src / "MANIFEST.json").read_text()).get("shards", []):
            expected[shard["file"].removesuffix(".xz")] = shard.get("sha256_uncompressed_bin")
    files = sorted(src.glob("*.bin.xz"))
    if not files:
        raise FileNotFoundError(f"no *.bin.xz files in {src}")
    paths = []
    for xz in tqdm(files, desc="unxz", unit="shard"):
        path = out_dir / xz.name.removesuffix(".xz")
        if not _valid(path, expected.get(path.name)):
            tmp = path.with_name(path.name + ".tmp")
            with lzma.open(xz) as f_in, tmp.open("wb") as f_out:
                while block := f_in.read(1 << 24):
                    f_out.write(block)
            tmp.replace(path)
            if not _valid(path, expected.get(path.name)):
                raise ShardError(f"{path}: sha256 does not match {src / 'MANIFEST.json'}")
        paths.append(path)
    return paths


def _valid(path: Path, sha256: str | None) -> bool:
    """Whether `path` is a well-formed shard (with the given sha256, if any)."""
    try:
        read_header(path)
    except ShardError:
        return False
    return sha256 is None or _sha256(path) == sha256


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()
