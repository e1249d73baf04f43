"""jaxrun's command line.

  python launch.py                                   # the embedded demo (CPU is fine)
  python launch.py --config configs/simple.py        # a recipe, by path or by name
  python launch.py --config simple --set optim.muon_lr=0.03 --set train.steps=200
  python launch.py --config simple --print-config    # show the resolved config and exit
  python launch.py --resume runs/simple-20250101-120000 --set train.steps=4000  # continue a run
  python launch.py data prepare --input DIR --out DIR  # text -> shards (see `data --help`)
  python launch.py data fineweb --train-shards 8 --dir data/fineweb10B
  python launch.py bench --config simple --compare torch --steps 60  # XLA vs PyTorch (see `bench --help`)

Loads a config module, applies dotted overrides, sets the XLA flags and the
compilation cache, joins a multi-host run if there is one (SLURM, Open MPI, or
JAXRUN_COORDINATOR / JAXRUN_NUM_PROCESSES / JAXRUN_PROCESS_ID), and calls
`jaxrun.train.run(cfg)`. The same command runs on one GPU, one node or many.
All logic lives in the library.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def load_config(spec: str):
    """A Config from `configs/<name>.py`, or from any file defining get_config()."""
    path = Path(spec)
    if not path.suffix and not path.exists():
        path = CONFIG_DIR / f"{spec}.py"
    if not path.exists():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))
        raise SystemExit(f"error: no config {spec!r}; choose one of {names} or give a path to a .py file")
    module_spec = importlib.util.spec_from_file_location(f"jaxrun_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise SystemExit(f"error: {path} defines no get_config()")
    return module.get_config()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="launch.py",
        description="Train a GPT with jaxrun. Subcommands: `data` (get or make shards).",
    )
    parser.add_argument("--config", help="config name in configs/ or a path (default: demo)")
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue RUN_DIR from its newest good checkpoint, with its saved config (change it with --set)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a config field, e.g. --set optim.muon_lr=0.03 (repeatable)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--compile-cache",
        default=os.environ.get("JAXRUN_COMPILE_CACHE", "~/.cache/jaxrun/xla"),
        help="persistent XLA compilation cache dir ('' to disable)",
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    if argv[:1] == ["data"]:
        from jaxrun.data import cli

        return cli.main(argv[1:])
    if argv[:1] == ["bench"]:
        from benchmarks import bench

        return bench.main(argv[1:], load_config)
    args = parse_args(argv)
    from jaxrun.config import ConfigError, apply_overrides

    if args.resume and args.config:
        raise SystemExit("error: --resume takes the config saved in RUN_DIR; change it with --set")
    try:
        base = _saved_config(args.resume) if args.resume else load_config(args.config or "demo")
        cfg = apply_overrides(base, args.set)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if args.print_config:
        print(cfg.to_json())
        return 0

    from jaxrun import sharding

    sharding.set_xla_gpu_flags()
    sharding.initialize_distributed()
    import jax

    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", str(Path(args.compile_cache).expanduser()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    from jaxrun import train
    from jaxrun.checkpoint import CheckpointError, NonFiniteError
    from jaxrun.data import ShardError

    try:
        result = train.run(cfg, resume=args.resume)
    except (ConfigError, ShardError, CheckpointError, NonFiniteError) as e:
        raise SystemExit(f"error: {e}") from None
    return 128 + result["signal"] if "signal" in result else 0  # stopped by signal N: exit as a shell does


def _saved_config(run_dir: str):
    from jaxrun.config import saved_config

    return saved_config(run_dir)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
