"""jaxrun's command line.

  python launch.py                                   # the embedded demo (CPU is fine)
  python launch.py --config configs/simple.py        # a recipe, by path or by name
  python launch.py --config simple --set optim.muon_lr=0.03 --set train.steps=200
  python launch.py --config simple --print-config    # show the resolved config and exit
  python launch.py --resume runs/simple-20250101-120000 --set train.steps=4000  # continue a run
  python launch.py --config simple --init-from runs/simple-20250101-120000  # fine-tune: new run, step 0
  python launch.py eval RUN [--set data.val_files=...]   # score a checkpoint (see `eval --help`)
  python launch.py sample RUN --prompt "..." --tokens 100  # generate text (see `sample --help`)
  python launch.py data prepare --input DIR --out DIR  # text -> shards (see `data --help`)
  python launch.py bench --config simple --compare torch --steps 60  # XLA vs PyTorch (see `bench --help`)
  python launch.py profile --config simple --steps 3  # kernel time per step by category

Loads a config module, applies dotted overrides, sets the XLA flags and the
compilation cache, joins a multi-host run if there is one (SLURM, Open MPI, or
JAXRUN_COORDINATOR / JAXRUN_NUM_PROCESSES / JAXRUN_PROCESS_ID), and calls
`jaxrun.train.run(cfg)`. Errors in what was asked for end in one `error:` line
and exit code 2. All logic lives in the library.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def load_config(spec: str):
    """A Config from `configs/<name>.py`, or from any .py file defining get_config()."""
    path = Path(spec)
    if not path.suffix and not path.exists():
        path = CONFIG_DIR / f"{spec}.py"
    if not path.exists():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))
        raise SystemExit(f"error: no config {spec!r}; choose one of {names} or give a path to a .py file")
    if path.suffix != ".py":
        raise SystemExit(f"error: {spec} is not a config module: give a .py file that defines get_config()")
    module_spec = importlib.util.spec_from_file_location(f"jaxrun_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise SystemExit(f"error: {path} defines no get_config()")
    return module.get_config()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="launch.py",
        description="Train a GPT with jaxrun. Subcommands: eval, sample, data, bench (each with --help).",
    )
    parser.add_argument("--config", help="config name in configs/ or a path (default: demo)")
    parser.add_argument(
        "--resume", metavar="RUN_DIR", help="continue RUN_DIR from its newest good checkpoint and config"
    )
    parser.add_argument(
        "--init-from", metavar="RUN", help="start a new run from RUN's params (fresh optimizer, step 0)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a config field"
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--compile-cache",
        default=os.environ.get("JAXRUN_COMPILE_CACHE", "~/.cache/jaxrun/xla"),
        help="persistent XLA compilation cache dir ('' to disable)",
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    """Run the command line; errors in the inputs raise SystemExit('error: ...')."""
    try:
        return _main(argv)
    except Exception as e:
        from jaxrun.checkpoint import CheckpointError, NonFiniteError
        from jaxrun.config import ConfigError
        from jaxrun.data import ShardError

        if isinstance(e, ConfigError | CheckpointError | ShardError | NonFiniteError):
            raise SystemExit(f"error: {e}") from None
        raise


def _main(argv: list[str]) -> int:
    if argv[:1] == ["bench"]:
        from benchmarks import bench

        return bench.main(argv[1:], load_config)
    if argv[:1] == ["profile"]:  # kernel time per step by category (benchmarks/profile_step.py)
        from benchmarks import profile_step

        return profile_step.main(argv[1:], load_config)
    if argv[:1] in (["data"], ["eval"], ["sample"]):
        from jaxrun import cli

        return cli.main(argv)
    args = parse_args(argv)
    from jaxrun.config import apply_overrides, saved_config

    if args.resume and (args.config or args.init_from):
        raise SystemExit("error: --resume takes the config and params saved in RUN_DIR; change it with --set")
    base = saved_config(args.resume) if args.resume else load_config(args.config or "demo")
    init = [f"train.init_from={args.init_from}"] if args.init_from else []
    cfg = apply_overrides(base, [*init, *args.set])
    if args.print_config:
        print(cfg.to_json(), flush=True)
        return 0

    from jaxrun import sharding

    sharding.set_xla_gpu_flags()
    sharding.initialize_distributed()
    import jax

    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", str(Path(args.compile_cache).expanduser()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    from jaxrun import train

    result = train.run(cfg, resume=args.resume)
    return 128 + result["signal"] if "signal" in result else 0  # stopped by signal N: exit as a shell does


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except SystemExit as e:
        if isinstance(e.code, str):  # an error in the inputs: one line, exit code 2
            print(e.code, file=sys.stderr)
            sys.exit(2)
        raise
    except BrokenPipeError:  # the reader went away (`--print-config | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
