"""What checkpointing costs: size on disk, save and restore time, and step-time overhead.

    python -m benchmarks.checkpoint_bench                   # `simple` at full size (GPU)
    python -m benchmarks.checkpoint_bench --small           # CPU-sized smoke run
    python -m benchmarks.checkpoint_bench --every 10 --dir /local/ssd/ckpt --set train.micro_batch_seqs=32

The train step runs on one synthetic batch, reused (no data path), as the loop
runs it: dispatch step n, then read step n-1's loss. Reported:

- the train state's size (params, optimizer state) and the checkpoint's on disk;
- one save end to end (snapshot, device-to-host copy, write, rename), and a
  restore with checksum verification;
- ms/step without checkpoints, then with an asynchronous save every `--every`
  steps, then without again (the two baselines bound the noise); the difference
  per save, and the time the loop was blocked per save (`Checkpointer.stall_ms`:
  the snapshot's dispatch plus handing the previous snapshot to orbax, which
  waits for its device-to-host copy).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.simple import get_config
from jaxrun import checkpoint, model, sharding, train
from jaxrun.config import apply_overrides

SMALL = [
    "model.num_layers=2",
    "model.model_dim=128",
    "model.head_dim=64",
    "model.vocab_size=4096",
    "model.max_seq_len=128",
    "model.compute_dtype=float32",
    "data.seq_len=128",
    "data.batch_seqs=16",
    "train.micro_batch_seqs=2",
]


def synthetic_batch(cfg, mesh) -> dict[str, jax.Array]:
    accum = train.grad_accum_steps(cfg, mesh.size)
    rows = cfg.data.batch_seqs // accum // jax.process_count()
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (accum, rows, cfg.data.seq_len + 1))
    local = {"inputs": tokens[..., :-1].astype(np.int32), "targets": tokens[..., 1:].astype(np.int32)}
    return sharding.global_batch(local, sharding.batch_sharding(mesh))


def run_steps(compiled, state, batch, steps: int, ckpt=None, position=None, first: int = 1):
    """`steps` steps as the loop runs them; returns (state, ms per step)."""
    pending = None
    t0 = time.perf_counter()
    for i in range(steps):
        state, metrics = compiled(state, batch)
        if pending is not None:
            float(pending["train_loss"])
        pending = metrics
        if ckpt is not None:
            position.set_state({"step": first + i})
            ckpt.step_done(first + i, state, position, 0.0)
    float(pending["train_loss"])
    jax.block_until_ready(state)
    return state, 1000 * (time.perf_counter() - t0) / steps


def gigabytes(tree) -> float:
    return sum(x.nbytes for x in jax.tree.leaves(tree)) / 1e9


def disk_gigabytes(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e9


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a CPU-sized model instead of `simple`")
    parser.add_argument("--every", type=int, default=10, help="steps between checkpoints")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per phase (a multiple of --every)")
    parser.add_argument("--repeats", type=int, default=2, help="phases with checkpoints, between baselines")
    parser.add_argument("--dir", help="where checkpoints go (default: a fresh temporary directory)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = parser.parse_args(argv)

    overrides = [*(SMALL if args.small else []), f"train.ckpt_every={args.every}", "train.steps=1000000000"]
    cfg = apply_overrides(get_config(), [*overrides, *args.set])
    mesh = sharding.make_mesh(cfg.mesh)
    key = jax.random.key(cfg.train.seed)
    state = train.init_state(cfg, key, mesh)
    batch = synthetic_batch(cfg, mesh)
    t0 = time.perf_counter()
    compiled = train.make_train_step(cfg, mesh).lower(state, batch).compile()
    print(
        f"{cfg.name}{' (small)' if args.small else ''}: {model.count_params(state.params) / 1e6:.1f}M params, "
        f"state {gigabytes(state):.2f} GB (params {gigabytes(state.params):.2f} GB), "
        f"{mesh.size} x {jax.devices()[0].device_kind}, compile {time.perf_counter() - t0:.0f}s"
    )

    root = Path(args.dir or tempfile.mkdtemp(prefix="checkpoint_bench_")).expanduser()
    ckpt = checkpoint.Checkpointer(cfg, root / "run", log=lambda line: None)
    position = checkpoint.Position({"step": 0})  # stands in for the data stream
    state, _ = run_steps(compiled, state, batch, 3)  # warm up the step
    ckpt.warm_up(state)

    # One save, end to end, then a restore.
    t0 = time.perf_counter()
    ckpt.step_done(1, state, position, 0.0, force=True)
    ckpt.flush()
    handed_off = time.perf_counter() - t0
    ckpt.wait()
    save_s = time.perf_counter() - t0
    size = disk_gigabytes(ckpt.directory / "1")
    t0 = time.perf_counter()
    ckpt.restore_latest(train.init_state(cfg, key, mesh), position)
    restore_s = time.perf_counter() - t0
    print(f"checkpoint on disk: {size:.2f} GB in {root}")
    print(
        f"one save: {1000 * handed_off:.0f} ms until handed to orbax, {save_s:.2f} s until on disk "
        f"({size / save_s:.2f} GB/s); restore with checksums: {restore_s:.2f} s"
    )

    # Step time without and with asynchronous saves, alternating, with a baseline last.
    steps = max(args.every, args.steps // args.every * args.every)
    saves = steps // args.every
    base, with_ckpt, blocked = [], [], []
    for r in range(args.repeats):
        state, ms = run_steps(compiled, state, batch, steps)
        base.append(ms)
        stall_before = ckpt.stall_ms
        first = (r + 1) * 10 * steps  # step numbers no earlier save used
        state, ms = run_steps(compiled, state, batch, steps, ckpt, position, first=first)
        ckpt.flush()
        ckpt.wait()  # no write left running into the next baseline
        with_ckpt.append(ms)
        blocked.append((ckpt.stall_ms - stall_before) / saves)
    base.append(run_steps(compiled, state, batch, steps)[1])
    ckpt.close()
    base_ms, ckpt_ms = statistics.median(base), statistics.median(with_ckpt)
    per_save = (ckpt_ms - base_ms) * steps / saves
    print(
        f"ms/step (median of {len(base)} and {len(with_ckpt)} runs of {steps} steps): {base_ms:.2f} without "
        f"checkpoints {[round(x, 2) for x in base]}, {ckpt_ms:.2f} saving every {args.every} steps "
        f"{[round(x, 2) for x in with_ckpt]}"
    )
    print(
        f"overhead: {100 * (ckpt_ms / base_ms - 1):+.2f}% at every {args.every} steps, {per_save:.1f} ms per "
        f"save; loop blocked {statistics.median(blocked):.1f} ms per save"
    )
    result = {
        "config": cfg.name,
        "small": args.small,
        "devices": mesh.size,
        "device_kind": jax.devices()[0].device_kind,
        "state_gb": gigabytes(state),
        "disk_gb": size,
        "save_handoff_ms": 1000 * handed_off,
        "save_s": save_s,
        "restore_s": restore_s,
        "every": args.every,
        "steps": steps,
        "ms_per_step_base": base,
        "ms_per_step_ckpt": with_ckpt,
        "overhead_ms_per_save": per_save,
        "blocked_ms_per_save": blocked,
    }
    print(json.dumps(result))
    if not args.dir:
        shutil.rmtree(root)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
