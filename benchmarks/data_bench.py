"""Loader and tokenizer throughput on the host CPU.

    python benchmarks/data_bench.py [--data DIR] [--steps N]

Measures, over the shards in DIR (default `.data/offline_english`, unpacked
with `launch.py data unxz`; synthetic shards when it is absent):

- `DocumentStream` tokens/s for BOS-aligned batches of 393,216 tokens (the
  record #77 final stage: 24 x 16,384 with documents cut at 2,048), without
  prefetch (the cost of building a batch) and with it (what a consumer sees),
  and how long a consumer that is busy 20 ms per step still waits for a batch;
- `TokenStream` tokens/s for contiguous batches of 524,288 tokens (`simple`);
- `data prepare` tokens/s: a shard decoded to text, written as `.jsonl` and
  tokenized back into shards, in-process (val shard) and with one worker process
  per CPU (first train shard).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxrun import data
from jaxrun.data import prepare
from jaxrun.tokenizer import get_tokenizer


def synthetic_shards(out: Path, shards: int = 4, tokens: int = 10_000_000) -> list[Path]:
    """Shards of random documents with a FineWeb-like length spread (median ~400 tokens)."""
    rng = np.random.default_rng(0)
    files = []
    for i in range(shards):
        ids = rng.integers(0, 50000, tokens).astype(np.uint16)
        ids[np.cumsum(rng.geometric(1 / 500, tokens // 300)).clip(max=tokens - 1)] = data.BOS
        ids[0] = data.BOS
        files.append(out / f"synthetic_train_{i:06d}.bin")
        data.write_shard(files[-1], ids)
    return files


def rate(stream, steps: int) -> tuple[float, float]:
    """(tokens/s, ms/batch) over `steps` batches after two warm-up batches."""
    for _ in range(2):
        next(stream)
    tokens, start = 0, time.perf_counter()
    for _ in range(steps):
        tokens += next(stream)["inputs"].size
    elapsed = time.perf_counter() - start
    return tokens / elapsed, 1000 * elapsed / steps


def stall(stream, steps: int, step_ms: float) -> float:
    """Mean ms a consumer that works `step_ms` per batch (a stand-in for the GPU step) waits in next()."""
    next(stream)
    waited = 0.0
    for _ in range(steps):
        time.sleep(step_ms / 1000)
        start = time.perf_counter()
        next(stream)
        waited += time.perf_counter() - start
    return 1000 * waited / steps


def bench_loaders(train: list[Path], steps: int) -> dict[str, float]:
    results = {}
    for prefetch in (0, 4):
        stream = data.DocumentStream(train, batch_seqs=24, seq_len=16384, max_doc_len=2048, prefetch=prefetch)
        with stream:
            tps, ms = rate(stream, steps)
        results[f"documents_393216_prefetch{prefetch}"] = tps
        print(
            f"DocumentStream 24x16384 (393,216 tok), max_doc_len 2048, prefetch={prefetch}: "
            f"{tps / 1e6:.1f}M tok/s, {ms:.2f} ms/batch"
        )
    for prefetch in (0, 4):
        stream = data.DocumentStream(train, batch_seqs=24, seq_len=16384, max_doc_len=2048, prefetch=prefetch)
        with stream:
            wait = stall(stream, 50, step_ms=20)
        results[f"documents_wait_ms_prefetch{prefetch}"] = wait
        print(f"  consumer busy 20 ms/step waits {wait:.3f} ms/step in next() with prefetch={prefetch}")
    for prefetch in (0, 4):
        with data.TokenStream(train, batch_seqs=512, seq_len=1024, prefetch=prefetch) as stream:
            tps, ms = rate(stream, steps)
        results[f"contiguous_524288_prefetch{prefetch}"] = tps
        print(
            f"TokenStream 512x1024 (524,288 tok), prefetch={prefetch}: {tps / 1e6:.1f}M tok/s, {ms:.2f} ms/batch"
        )
    return results


def bench_prepare(shard: Path, tmp: Path, workers: int) -> float:
    """Tokens/s of `prepare` on a shard's documents, round-tripped through `.jsonl` text."""
    enc = get_tokenizer()
    tokens = np.asarray(data.read_shard(shard))
    starts = np.flatnonzero(tokens == data.BOS)
    src = tmp / f"{shard.stem}.jsonl"
    with src.open("w") as f:
        for a, b in zip(starts, [*starts[1:], len(tokens)]):
            f.write(json.dumps({"text": enc.decode(tokens[a + 1 : b].tolist())}) + "\n")
    start = time.perf_counter()
    m = prepare.prepare([src], tmp / f"out_{workers}", workers=workers, progress=False)
    elapsed = time.perf_counter() - start
    tps = m["tokens"] / elapsed
    assert m["tokens"] == len(tokens) - starts[0], "prepare did not reproduce the shard's token count"
    print(
        f"data prepare, {workers or 'no'} worker processes: {m['tokens']:,} tokens, {m['documents']:,} docs, "
        f"{src.stat().st_size / 1e6:.0f} MB in {elapsed:.2f}s = {tps / 1e6:.2f}M tok/s (incl. start-up)"
    )
    return tps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=".data/offline_english")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = Path(args.data)
        train = sorted(root.glob("train_*.bin")) or sorted(root.glob("*_train_*.bin"))
        val = sorted(root.glob("val_*.bin")) or sorted(root.glob("*_val_*.bin"))
        if not train:
            print(f"no shards in {root}; using synthetic ones")
            train = synthetic_shards(tmp)
            val = train[:1]
        print(
            f"{len(train)} train shards, {sum(len(data.read_shard(f)) for f in train):,} tokens; "
            f"{os.cpu_count()} CPUs"
        )
        bench_loaders(train, args.steps)
        bench_prepare(val[0], tmp, workers=0)
        bench_prepare(train[0], tmp, workers=os.cpu_count() or 1)


if __name__ == "__main__":
    main()
