"""Side by side: jaxrun (XLA) against its PyTorch twin on the same recipe.

`python launch.py bench --config simple --compare torch --steps 60` cuts the
recipe's data into the batches of the run once (`train_rows.npy`,
`val_rows.npy` in the output folder), then trains each framework in its own
process, one after the other, so neither holds device memory while the other
runs. jaxrun starts from `model.init`; the twin loads those same weights.
Both take the same batches in the same order: `warmup` steps first (compile
and warm-up, excluded), then a re-initialization and the timed `steps`, each
synced, then the val loss. The folder gets `bench.json` (the table and every
step's time and loss) and `loss.png` (both loss curves against steps).

MFU counts the model FLOPs of `jaxrun.model.flops_per_token` against
`--peak-tflops` (686: the bf16 matmul ceiling measured on our H100).

At module level this file imports only the standard library, numpy,
`jaxrun.config` and `benchmarks.torch_reference`: the PyTorch worker (`benchmarks/torch_reference/worker.py`)
imports its helpers from an interpreter that may have no JAX.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.torch_reference import REPO, TORCH_PYTHON_ENV, torch_python
from jaxrun.config import Config, ConfigError, apply_overrides, config_from_dict

FRAMEWORKS = ("jax", "torch")


def split_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`[..., T+1]` token rows -> int32 inputs and targets `[..., T]`."""
    rows = np.asarray(rows, dtype=np.int32)
    return rows[..., :-1], rows[..., 1:]


def peak_host_memory() -> int:
    """This process's peak resident memory in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed_loop(
    step: Callable[[int], float], evaluate: Callable[[], float], steps: int, val_every: int
) -> dict:
    """Run steps 0..steps-1, timing each (`step(i)` returns the synced train loss).

    Evaluates every `val_every` steps (0: only after the last) outside the clock.
    """
    step_ms, losses, val = [], [], []
    for i in range(steps):
        if val_every and i % val_every == 0:
            val.append((i, evaluate()))
        t0 = time.perf_counter()
        losses.append(step(i))
        step_ms.append(1000 * (time.perf_counter() - t0))
    val.append((steps, evaluate()))
    return {"step_ms": step_ms, "train_loss": losses, "val": val}


class Workdir:
    """The files the driver and the two workers share."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config = self.path / "config.json"
        self.settings = self.path / "settings.json"
        self.train_rows = self.path / "train_rows.npy"
        self.val_rows = self.path / "val_rows.npy"
        self.init_params = self.path / "init_params.npz"

    def result(self, framework: str) -> Path:
        return self.path / f"result_{framework}.json"

    def load(self) -> tuple[Config, dict[str, Any]]:
        return config_from_dict(json.loads(self.config.read_text())), json.loads(self.settings.read_text())

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        return np.load(self.train_rows, mmap_mode="r"), np.load(self.val_rows, mmap_mode="r")


def prepare(cfg: Config, work: Workdir, num_batches: int) -> None:
    """Write the run's first `num_batches` train batches and the val tokens as uint16 rows of T+1."""
    from jaxrun import data as data_lib

    d = cfg.data
    if d.source == "sotu":
        from jaxrun.data import demo_corpus

        train_files, val_files = demo_corpus.prepare(d.cache_dir)
    else:
        train_files, val_files = data_lib.find_shards(d.train_files), data_lib.find_shards(d.val_files)
    out = np.lib.format.open_memmap(
        work.train_rows, mode="w+", dtype=np.uint16, shape=(num_batches, d.batch_seqs, d.seq_len + 1)
    )
    with data_lib.TokenStream(train_files, batch_seqs=d.batch_seqs, seq_len=d.seq_len, prefetch=0) as stream:
        for i in range(num_batches):
            batch = next(stream)
            # Contiguous windows: a row's targets are its inputs shifted by one token.
            assert np.array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
            out[i] = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
    out.flush()
    inputs, targets = data_lib.val_batches(val_files, num_tokens=d.val_tokens, seq_len=d.seq_len)
    np.save(work.val_rows, np.concatenate([inputs, targets[:, -1:]], axis=1).astype(np.uint16))


def run_jax(work: Workdir) -> dict[str, Any]:
    """The JAX worker: jaxrun's own train step, as `launch.py` trains."""
    import jax

    from jaxrun import optim, sharding, train

    cfg, settings = work.load()
    train_rows, val_rows = work.rows()
    mesh = sharding.make_mesh(cfg.mesh)
    accum = train.grad_accum_steps(cfg, mesh.size)
    key = jax.random.key(cfg.train.seed)
    state = train.init_state(cfg, key, mesh)
    flat = jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))
    np.savez(work.init_params, **{optim.path_str(p): np.asarray(x) for p, x in flat})

    def batch(i):
        inputs, targets = split_rows(train_rows[i])
        local = {"inputs": inputs, "targets": targets}
        local = {k: v.reshape(accum, -1, v.shape[-1]) for k, v in local.items()}
        return sharding.global_batch(local, sharding.batch_sharding(mesh))

    t0 = time.perf_counter()
    compiled = train.make_train_step(cfg, mesh).lower(state, batch(0)).compile()
    compile_s = time.perf_counter() - t0

    def step(i):
        nonlocal state
        state, metrics = compiled(state, batch(i))
        return float(metrics["train_loss"])

    warmup_ms = warm_up(step, settings["warmup_steps"])
    state = train.init_state(cfg, key, mesh)  # timing starts from the same weights, as the speedrun does
    eval_step = train.make_eval_step(cfg, mesh)
    inputs, targets = split_rows(val_rows)
    val = {"inputs": inputs, "targets": targets}
    chunk = cfg.data.val_batch_seqs * mesh.size

    def evaluate() -> float:
        return train.evaluate(eval_step, state.params, val, cfg, mesh)

    run = timed_loop(step, evaluate, settings["steps"], settings["val_every"])
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    device = jax.local_devices()[0]
    return {
        "framework": "jax",
        "version": f"jax {jax.__version__}",
        "device": f"{mesh.size}× {device.device_kind}",
        "attention": f"attention={cfg.model.kernels.attention}",
        "compiler": "XLA (jit, compiled ahead of time)",
        "precision": f"{cfg.model.compute_dtype} activations, float32 weights cast at use",
        "compile_s": compile_s,
        "warmup_ms": warmup_ms,
        "val_rows": len(inputs) // chunk * chunk,
        "peak_memory_bytes": peak if peak is not None else peak_host_memory(),
        "memory_kind": "device" if peak is not None else "host RSS",
        **run,
    }


def warm_up(step: Callable[[int], float], n: int) -> list[float]:
    """Run steps 0..n-1 untimed by the table; their wall times in ms (the first holds any compile)."""
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        step(i)
        times.append(1000 * (time.perf_counter() - t0))
    return times


def _run_worker(framework: str, work: Workdir, torch_python: str) -> None:
    """Run one framework in a fresh process; its result lands in `work.result(framework)`."""
    if framework == "jax":
        cmd = [sys.executable, "-m", "benchmarks.bench", "--worker", str(work.path)]
    else:
        cmd = [torch_python, "-m", "benchmarks.torch_reference.worker", "bench", str(work.path)]
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    print(f"[bench] {framework}: {' '.join(cmd)}", flush=True)
    done = subprocess.run(cmd, check=False, cwd=REPO, env=dict(os.environ, PYTHONPATH=path))
    if done.returncode:
        raise SystemExit(f"error: the {framework} worker failed with exit code {done.returncode}")


def _flops_per_token(cfg: Config) -> float:
    from jaxrun import model

    return model.flops_per_token(cfg.model, cfg.data.seq_len)


def summarize(cfg: Config, results: dict[str, dict], peak_tflops: float) -> list[dict[str, Any]]:
    """One table row per framework: median step time, throughput, MFU, memory, final val loss."""
    flops_per_token = _flops_per_token(cfg)
    rows = []
    for fw, r in results.items():
        median_ms = statistics.median(r["step_ms"])
        tokens_per_s = cfg.data.tokens_per_step / (median_ms / 1000)
        rows.append(
            {
                "framework": fw,
                "step_ms_median": median_ms,
                "compile_s": r["compile_s"],
                "tokens_per_s": tokens_per_s,
                "mfu": flops_per_token * tokens_per_s / (peak_tflops * 1e12),
                "peak_memory_gib": r["peak_memory_bytes"] / 2**30,
                "memory_kind": r["memory_kind"],
                "final_val_loss": r["val"][-1][1],
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]], results: dict[str, dict]) -> str:
    head = f"{'framework':<10}{'ms/step':>10}{'compile s':>11}{'tokens/s':>12}{'MFU':>8}{'peak mem':>18}{'val loss':>10}"
    lines = [head, "-" * len(head)]
    for row in rows:
        mem = f"{row['peak_memory_gib']:.2f} GiB {row['memory_kind'].split()[0]}"
        lines.append(
            f"{row['framework']:<10}{row['step_ms_median']:>10.1f}{row['compile_s']:>11.1f}"
            f"{row['tokens_per_s']:>12,.0f}{100 * row['mfu']:>7.1f}%{mem:>18}{row['final_val_loss']:>10.4f}"
        )
    if len(rows) == 2:
        ratio = rows[0]["step_ms_median"] / rows[1]["step_ms_median"]
        lines.append(f"{rows[0]['framework']}/{rows[1]['framework']} step time: {ratio:.3f}×")
    for fw, r in results.items():
        lines.append(f"{fw}: {r['version']} on {r['device']}; {r['compiler']}")
        lines.append(f"{'':<{len(fw) + 2}}attention: {r['attention']}; {r['precision']}")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path, title: str) -> None:
    """Both train-loss curves against steps, val losses as markers."""
    from jaxrun.runlog import loss_axes, save_loss_plot

    fig, ax = loss_axes(figsize=(8, 5))
    for (fw, r), style, marker in zip(results.items(), ("-", "--"), ("o", "s"), strict=False):
        # the train loss of step i is measured before its update, on the same params as val at i
        (line,) = ax.plot(r["train_loss"], style, lw=1, label=f"{fw} train")
        steps, losses = zip(*r["val"], strict=True)
        ax.plot(steps, losses, marker, color=line.get_color(), mfc="none", ms=8, label=f"{fw} val")
    save_loss_plot(fig, ax, path, title)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="launch.py bench", description="Time jaxrun, and optionally its PyTorch twin, on one recipe."
    )
    parser.add_argument("--config", default="simple", help="config name in configs/ or a path")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--compare", choices=["torch"], help="also run the PyTorch twin")
    parser.add_argument("--only", choices=FRAMEWORKS, help="run one framework (with --reuse, add to a table)")
    parser.add_argument("--steps", type=int, help="timed steps, also the schedule's length (train.steps)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps before re-initializing")
    parser.add_argument("--val-every", type=int, default=0, help="val loss every N steps (0: at the end)")
    parser.add_argument("--peak-tflops", type=float, default=686.0, help="the MFU denominator (bf16 ceiling)")
    parser.add_argument("--out", help="output folder (default: runs/bench-<config>-<time>)")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep the data and results already in --out for the same config and steps (and keep the data after)",
    )
    parser.add_argument(
        "--torch-python", help=f"interpreter with torch (default: ${TORCH_PYTHON_ENV}, this one)"
    )
    parser.add_argument(
        "--torch-attention",
        default="flash",
        choices=["flash", "cudnn", "efficient", "math", "auto"],
        help="the SDPA backend on CUDA (auto: torch's choice)",
    )
    parser.add_argument("--no-torch-compile", action="store_true", help="run the twin eagerly")
    return parser.parse_args(argv)


def main(argv: list[str], load_config: Callable[[str], Config]) -> int:
    args = parse_args(argv)
    try:
        cfg = apply_overrides(load_config(args.config), args.set)
        if args.steps is not None:
            cfg = apply_overrides(cfg, [f"train.steps={args.steps}"])
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if getattr(cfg.data, "mode", "contiguous") != "contiguous" or getattr(cfg.data, "stages", ()):
        raise SystemExit("error: bench runs contiguous batches of one shape (data.mode, data.stages)")
    frameworks = [args.only] if args.only else ["jax", "torch"] if args.compare else ["jax"]
    python = args.torch_python or torch_python()
    if "torch" in frameworks and python is None:
        raise SystemExit(
            f"error: the PyTorch twin needs an interpreter with torch: set ${TORCH_PYTHON_ENV}, pass "
            "--torch-python, or create ./.venv-torch (see benchmarks/torch_reference/README.md)"
        )
    # what makes two runs comparable; the torch options only change how the twin runs
    run = {"steps": cfg.train.steps, "warmup_steps": args.warmup_steps, "val_every": args.val_every}
    settings = run | {"torch_compile": not args.no_torch_compile, "torch_attention": args.torch_attention}
    out = Path(args.out or Path(cfg.train.out_dir) / f"bench-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    work = Workdir(out)
    if not (args.reuse and _same_run(work, cfg, run)):
        for fw in FRAMEWORKS:
            work.result(fw).unlink(missing_ok=True)
        work.config.write_text(cfg.to_json())
        from jaxrun.data import ShardError

        try:
            prepare(cfg, work, max(cfg.train.steps, args.warmup_steps))
        except (ConfigError, ShardError, ValueError) as e:
            raise SystemExit(f"error: {e}") from None
    work.settings.write_text(json.dumps(settings, indent=2))
    if "torch" in frameworks and not work.init_params.exists():
        frameworks = ["jax", "torch"]  # the twin starts from the weights the jax worker writes
    for fw in frameworks:
        if not (args.reuse and work.result(fw).exists()):
            _run_worker(fw, work, python)
    results = {fw: json.loads(work.result(fw).read_text()) for fw in FRAMEWORKS if work.result(fw).exists()}
    rows = summarize(cfg, results, args.peak_tflops)
    print(format_table(rows, results))
    report = {
        "config": json.loads(cfg.to_json()),
        "settings": settings,
        "peak_tflops": args.peak_tflops,
        "flops_per_token": _flops_per_token(cfg),
        "tokens_per_step": cfg.data.tokens_per_step,
        "table": rows,
        "results": results,
    }
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    title = f"{cfg.name}: {cfg.train.steps} steps, {cfg.data.tokens_per_step:,} tok/step"
    plot(results, out / "loss.png", title)
    if not args.reuse:  # the batches and weights are large; --reuse keeps them for a later call
        for path in (work.train_rows, work.val_rows, work.init_params):
            path.unlink(missing_ok=True)
    print(f"[bench] wrote {out / 'bench.json'} and {out / 'loss.png'}")
    return 0


def _same_run(work: Workdir, cfg: Config, run: dict[str, Any]) -> bool:
    """Whether `work` already holds the data of this exact config and run."""
    files = (work.config, work.settings, work.train_rows, work.val_rows)
    if not all(f.exists() for f in files):
        return False
    old_cfg, old_settings = work.load()
    return old_cfg == cfg and all(old_settings.get(k) == v for k, v in run.items())


def _worker_main(argv: list[str]) -> int:
    from jaxrun import sharding

    sharding.set_xla_gpu_flags()  # as launch.py trains
    work = Workdir(argv[0])
    work.result("jax").write_text(json.dumps(run_jax(work), indent=2))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["--worker"]:
        raise SystemExit("usage: python -m benchmarks.bench --worker DIR (the driver is `launch.py bench`)")
    sys.exit(_worker_main(sys.argv[2:]))
