"""`python launch.py data ...`: get or make token shards.

- `fineweb --train-shards N --dir DIR` downloads `kjj0/fineweb10B-gpt2` (the
  val shard and N train shards of 100M tokens), resuming dropped transfers and
  keeping finished shards.
- `prepare --input FILES_OR_DIRS --out DIR` tokenizes `.txt`, `.jsonl` and
  `.parquet` documents into shards (see `jaxrun.data.prepare`).
- `unxz SRC [--out DIR]` decompresses `*.bin.xz` shards (such as
  `offline_english`) and checks them against a `MANIFEST.json` beside them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxrun.data.fineweb import FINEWEB_MAX_TRAIN, FINEWEB_REPO, DownloadError, download_fineweb
from jaxrun.data.prepare import prepare, run_flags
from jaxrun.data.shards import ShardError, unxz

DEFAULT_VAL_TOKENS = 1 << 20  # about offline_english's val shard; small inputs keep all for training


def main(argv: list[str]) -> int:
    """`launch.py data {fineweb,prepare,unxz} ...`; returns an exit status."""
    parser = argparse.ArgumentParser(prog="launch.py data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fw = sub.add_parser("fineweb", help=f"download {FINEWEB_REPO} shards")
    fw.add_argument("--train-shards", type=int, default=FINEWEB_MAX_TRAIN, help="train shards of 100M tokens")
    fw.add_argument("--dir", default="data/fineweb10B", help="where the shards go")
    fw.add_argument("--repo", default=FINEWEB_REPO, help="dataset repo on the hub")
    fw.add_argument(
        "--endpoint", default=None, help="hub mirror URL (default: HF_ENDPOINT or huggingface.co)"
    )
    pr = sub.add_parser("prepare", help="tokenize .txt/.jsonl/.parquet into shards")
    pr.add_argument("--input", nargs="+", required=True, help="files or directories")
    pr.add_argument("--out", required=True, help="output directory")
    pr.add_argument("--name", default="data", help="shard file prefix")
    pr.add_argument("--shard-tokens", type=int, default=100_000_000, help="most tokens per shard")
    pr.add_argument(
        "--val-tokens",
        type=int,
        default=DEFAULT_VAL_TOKENS,
        help="tokens of leading documents put in val shards (0: none)",
    )
    pr.add_argument(
        "--workers", type=int, default=None, help="tokenizer processes (default: all CPUs for big inputs)"
    )
    ux = sub.add_parser("unxz", help="decompress *.bin.xz shards")
    ux.add_argument("src", help="directory holding *.bin.xz")
    ux.add_argument("--out", default=None, help="output directory (default: SRC)")
    args = parser.parse_args(argv)
    try:
        if args.command == "fineweb":
            paths = download_fineweb(args.dir, args.train_shards, repo_id=args.repo, endpoint=args.endpoint)
            print(f"{len(paths)} shards ready in {Path(args.dir).expanduser()}")
        elif args.command == "prepare":
            m = prepare(
                args.input,
                args.out,
                name=args.name,
                shard_tokens=args.shard_tokens,
                val_tokens=args.val_tokens,
                workers=args.workers,
            )
            print(
                f"{m['documents']:,} documents, {m['tokens']:,} tokens in {len(m['shards'])} shards at {args.out}"
            )
            print(
                f"train on them with:\n  python launch.py --config CONFIG {run_flags(args.out, m, args.name)}"
            )
        else:
            paths = unxz(args.src, args.out)
            print(f"{len(paths)} shards ready in {paths[0].parent}")
    except (ShardError, DownloadError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
