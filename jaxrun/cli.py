"""`launch.py eval`, `sample` and `data`: score a saved run on any shards, sample from it, get shards.

  python launch.py eval runs/demo-20260101-120000
  python launch.py eval runs/simple-… --set data.val_files='/data/other/val_*.bin'
  python launch.py sample runs/demo-… --prompt "The state of the union" --tokens 100 --top-k 50

Both read the newest checkpoint that reads back whole (or the step dir given).
`score` is the library side of `eval`, for notebooks. `data` is `jaxrun.data.cli`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from jaxrun.config import Config, apply_overrides


def score(run: str, overrides: Sequence[str] = ()) -> tuple[Config, float]:
    """The mean val loss of a run's checkpoint, with its config changed by `--set`-style overrides.

    The val tokens are `data.val_files` (the demo corpus's val split for a `sotu`
    run, unless the overrides name val files), `data.val_tokens` of them.
    """
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxrun import checkpoint, sharding, train
    from jaxrun.data import demo_corpus, find_shards

    saved, params = checkpoint.load_checkpoint(run)
    cfg = apply_overrides(saved, list(overrides))
    if _own_val_files(cfg, overrides):
        val_files = find_shards(cfg.data.val_files)
    else:
        val_files = demo_corpus.prepare(cfg.data.cache_dir)[1]
    mesh = sharding.make_mesh(cfg.mesh)
    val = train.load_val(cfg, mesh, val_files)
    params = jax.device_put(params, NamedSharding(mesh, P()))
    return cfg, train.evaluate(train.make_eval_step(cfg, mesh), params, val, cfg, mesh)


def _own_val_files(cfg: Config, overrides: Sequence[str]) -> bool:
    """Whether the val tokens come from `data.val_files` (not the demo corpus's split)."""
    return cfg.data.source != "sotu" or any(o.strip().startswith("data.val_files") for o in overrides)


def eval_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="launch.py eval", description="Score a run's checkpoint.")
    parser.add_argument("run", metavar="RUN", help="a run dir, or one checkpoint step's dir")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = parser.parse_args(argv)
    cfg, loss = score(args.run, args.set)
    where = cfg.data.val_files if _own_val_files(cfg, args.set) else "the demo corpus's val split"
    print(f"val_loss:{loss:.4f} on {cfg.data.val_tokens:,} tokens of {where}")
    return 0


def sample_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="launch.py sample", description="Generate text from a run.")
    parser.add_argument("run", metavar="RUN", help="a run dir, or one checkpoint step's dir")
    parser.add_argument("--prompt", default="\n", help="text to continue")
    parser.add_argument("--tokens", type=int, default=100, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from jaxrun import checkpoint, sample

    cfg, params = checkpoint.load_checkpoint(args.run)
    text = sample.generate(
        params,
        cfg,
        args.prompt,
        num_tokens=args.tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
    )
    print(text)
    return 0


def main(argv: list[str]) -> int:
    """`argv[0]` is the subcommand: eval, sample or data."""
    if argv[0] == "data":
        from jaxrun.data import cli as data_cli

        return data_cli.main(argv[1:])
    return {"eval": eval_main, "sample": sample_main}[argv[0]](argv[1:])
