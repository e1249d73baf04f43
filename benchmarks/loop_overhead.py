"""Does the train loop add anything to the compiled step, and do steps slow down over a run?

Three phases on the same batches (the config's train stream, from its start)
and the same initial state, one after the other on whatever device is there:

1. `bare`: the compiled step alone, batches already on the device, one step in
   flight while the previous one's loss is read (no data, logging or
   checkpoint work at all);
2. `loop`: `jaxrun.train.run(cfg)` itself, its per-step times from the
   `step_ms` of metrics.jsonl;
3. `bare` again, so a drift of the device itself (clocks warming down) shows
   as a difference between the two bare phases, not as loop overhead.

For each phase it prints ms/step (step 1 on; step 0 carries the start-up) and
the ratio of the last window's mean to the first's (100 steps each, or a third
of the run when shorter). If both bare phases and the loop creep alike, the
creep is the device or the numbers it multiplies (weights that move away from
their zero init), not the loop.

Usage:
  python benchmarks/loop_overhead.py --config simple --steps 300 \\
      --set 'data.train_files=/tmp/oe/train_*.bin' --set 'data.val_files=/tmp/oe/val_*.bin' \\
      --set data.val_tokens=917504 [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import launch  # noqa: E402
from jaxrun import sharding, train  # noqa: E402
from jaxrun.config import Config, apply_overrides  # noqa: E402


def host_batches(cfg: Config, mesh, steps: int) -> list[dict[str, np.ndarray]]:
    """The first `steps` batches of the train stream, as the loop stacks them into micro-batches."""
    stream, _, _ = train._load_data(cfg, mesh)
    out = []
    for _ in range(steps):
        local = next(stream)
        accum = train.grad_accum_steps(cfg, mesh.size, len(local["inputs"]) * jax.process_count())
        out.append(train._stack_micro(local, accum))
    stream.close()
    return out


def bare_step_ms(cfg: Config, mesh, batches: list[dict[str, np.ndarray]]) -> list[float]:
    """Per-step ms of the compiled step alone, batches on the device, one step in flight."""
    on_device = [sharding.global_batch(b, sharding.batch_sharding(mesh)) for b in batches]
    key = jax.random.key(cfg.train.seed)
    state = train.init_state(cfg, key, mesh)
    variants = train._compile_stages(state, cfg, mesh)
    fns = [variants[train.variant_key(cfg, mesh.size, i)] for i in range(len(on_device))]
    state, _ = fns[0](state, on_device[0])  # warm-up, then start again, as the loop does
    jax.block_until_ready(state)
    state = train.init_state(cfg, key, mesh)
    jax.block_until_ready(state)
    times, previous = [], None
    last = time.perf_counter()
    for fn, batch in zip(fns, on_device):
        state, metrics = fn(state, batch)
        if previous is not None:
            previous["train_loss"].block_until_ready()
            now = time.perf_counter()
            times.append(1000 * (now - last))
            last = now
        previous = metrics
    previous["train_loss"].block_until_ready()
    times.append(1000 * (time.perf_counter() - last))
    del state, on_device
    return times


def loop_step_ms(cfg: Config) -> tuple[list[float], dict]:
    """Per-step ms of `train.run(cfg)`, from its metrics.jsonl, and its result."""
    result = train.run(cfg)
    lines = (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    times = [r["step_ms"] for r in sorted(records, key=lambda r: r["step"]) if "step_ms" in r]
    return times, {k: v for k, v in result.items() if k != "state"}


def summary(times: list[float]) -> dict[str, float]:
    """ms/step from step 1 on, and the last window's mean over the first's."""
    steady = np.asarray(times[1:])
    k = max(1, min(100, len(steady) // 3))
    first, last = float(steady[:k].mean()), float(steady[-k:].mean())
    return {
        "steps": len(times),
        "ms_per_step": float(steady.mean()),
        "median_ms": float(np.median(steady)),
        "window": k,
        "first_ms": first,
        "last_ms": last,
        "last_over_first": last / first,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="simple")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default=os.environ.get("OUT") or tempfile.mkdtemp(prefix="loop_overhead-"))
    a = p.parse_args(argv)
    fixed = [
        f"train.steps={a.steps}",
        "train.val_every=0",  # one val at the end, outside the timed steps
        "train.val_every_late=0",
        "train.sample_tokens=0",
        "train.ckpt_every=0",
        "train.progress=false",
        f"train.out_dir={a.out}",
    ]
    cfg = apply_overrides(launch.load_config(a.config), [*a.set, *fixed])
    mesh = sharding.make_mesh(cfg.mesh)
    print(f"device: {jax.devices()[0].device_kind} × {mesh.size}; {a.config}, {a.steps} steps", flush=True)
    batches = host_batches(cfg, mesh, a.steps)
    phases = {"bare_before": bare_step_ms(cfg, mesh, batches)}
    phases["loop"], result = loop_step_ms(cfg)
    phases["bare_after"] = bare_step_ms(cfg, mesh, batches)
    rows = {name: summary(times) for name, times in phases.items()}
    bare = (rows["bare_before"]["ms_per_step"] + rows["bare_after"]["ms_per_step"]) / 2
    report = {
        "rows": rows,
        "loop_over_bare": rows["loop"]["ms_per_step"] / bare,
        "run": result,
        "per_step_ms": phases,
    }
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "loop_overhead.json").write_text(json.dumps(report, indent=2, default=str))
    print("\nphase | steps | ms/step | median | first-k ms | last-k ms | last/first (k)")
    for name, r in rows.items():
        print(
            f"{name} | {r['steps']} | {r['ms_per_step']:.2f} | {r['median_ms']:.2f} | {r['first_ms']:.2f} | "
            f"{r['last_ms']:.2f} | {r['last_over_first']:.4f} ({r['window']})"
        )
    print(f"loop / bare (mean of both bare phases): {report['loop_over_bare']:.4f}")
    print(f"wrote {Path(a.out) / 'loop_overhead.json'}")
    return report


if __name__ == "__main__":
    main()
