"""record77 on one GPU: per-stage step times, and jaxrun beside its PyTorch twin on the same data.

  python benchmarks/record77_gpu.py stages --data DIR [--steps-per-stage 40] [--out DIR] [--set K=V ...]
  python benchmarks/record77_gpu.py side-by-side --data DIR [--steps 100] [--out DIR]
  python benchmarks/record77_gpu.py ablate --data DIR [--steps 250] [--out DIR]

`stages` compiles every step variant of the real schedule (timed, as the speedrun excludes it),
then runs `--steps-per-stage` steps in each of the four stages (windows, YaRN, batch shape, tied
or not as the real schedule has them there) on the real packed data, timing each step with a
sync, and prints ms/step per stage, split into even (NorMuon only) and odd (NorMuon + Adam)
steps, beside the record's 8×H100 figures. `side-by-side` runs jaxrun and the twin
(benchmarks/torch_reference/record77*.py) for the first `--steps` steps from the same weights on
the same batches, in bf16, and writes both loss curves (JSON and PNG). `ablate` trains the first
`--steps` steps of the real schedule for the recipe and for each switch in ABLATIONS turned off,
on the same data, and compares their val losses. DIR holds llm.c shards
`train_*.bin` and `val_*.bin` (e.g. offline_english, unpacked). `--set` changes the recipe for
`stages` and `ablate` (e.g. `--set model.mlp.fp8_up=true` to time a switch); the twin has none.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RECORD_MS = {0: (31.6, 28.7, 34.6), 1: (57.3, 54.9, 59.7), 2: (84.2, 81.8, 86.6), 3: (84.6, 82.0, 87.3)}


def _config(data: str, tiny: bool = False, overrides: list[str] | tuple = ()):
    import launch
    from jaxrun.config import MeshConfig, apply_overrides

    cfg = launch.load_config("record77")
    d = dataclasses.replace(
        cfg.data, train_files=f"{data}/train_*.bin", val_files=f"{data}/val_*.bin", val_tokens=3 * 262_144
    )
    cfg = dataclasses.replace(
        cfg, data=d, train=dataclasses.replace(cfg.train, progress=False), mesh=MeshConfig(num_devices=1)
    )
    return apply_overrides(_tiny(cfg) if tiny else cfg, list(overrides))


def _tiny(cfg):
    """A CPU-sized record77 (width 96, vocab padded to 50304 still, short rows) to smoke-test this script."""
    m = dataclasses.replace(
        cfg.model,
        model_dim=96,
        head_dim=16,
        attn=dataclasses.replace(
            cfg.model.attn, windows=dataclasses.replace(cfg.model.attn.windows, block=8)
        ),
    )
    stages = tuple((row[0], 8, 64 * (i + 2), 64) for i, row in enumerate(cfg.data.stages))
    d = dataclasses.replace(
        cfg.data, seq_len=64, max_doc_len=32, stages=stages, val_seq_len=256, val_tokens=2048
    )
    return dataclasses.replace(cfg, model=m, data=d)


def _shortened(cfg, per_stage: int, extension: int):
    """The schedule with `per_stage` steps per stage: same windows, shapes and modes, fewer steps."""
    stages = tuple((per_stage * (i + 1), *row[1:]) for i, row in enumerate(cfg.data.stages))
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, stages=stages),
        optim=dataclasses.replace(cfg.optim, extension_steps=extension),
        train=dataclasses.replace(cfg.train, steps=3 * per_stage + extension),
    )


def _session(cfg):
    import jax

    from jaxrun import sharding, train

    mesh = sharding.make_mesh(cfg.mesh)
    stream, val, _ = train._load_data(cfg, mesh)
    batch_sharding = sharding.batch_sharding(mesh)

    def next_batch():
        local = next(stream)
        accum = train.grad_accum_steps(cfg, mesh.size, len(local["inputs"]))
        return sharding.global_batch(train._stack_micro(local, accum), batch_sharding)

    state = train.init_state(cfg, jax.random.key(cfg.train.seed), mesh)
    return mesh, next_batch, val, state


def stages(args) -> dict:
    import jax

    from jaxrun import schedule, train

    cfg = _shortened(_config(args.data, args.tiny, args.set), args.steps_per_stage, args.steps_per_stage)
    mesh, next_batch, val, state = _session(cfg)
    t0 = time.perf_counter()
    variants = train._compile_stages(state, cfg, mesh)
    compile_s = time.perf_counter() - t0
    untie = train.make_untie(state)
    times: dict[int, list[tuple[int, float]]] = {}
    first_nonfinite = None  # the first step whose training loss is NaN or infinite
    for step in range(cfg.train.steps):
        batch = next_batch()
        jax.block_until_ready(batch)
        t0 = time.perf_counter()
        state, metrics = variants[train.variant_key(cfg, mesh.size, step)](state, batch)
        if step == schedule.split_step(cfg):
            state = untie(state)
        jax.block_until_ready(state)
        dt = 1000 * (time.perf_counter() - t0)
        times.setdefault(schedule.stage_index(cfg, step), []).append((step, dt))
        loss = float(metrics["train_loss"])
        if first_nonfinite is None and not np.isfinite(loss):
            first_nonfinite = step
        print(f"step {step} stage {schedule.stage_index(cfg, step)} {dt:.1f} ms loss {loss:.4f}", flush=True)
    t0 = time.perf_counter()
    eval_step = train.make_eval_step(cfg, mesh, schedule.eval_mode(cfg, cfg.train.steps))
    val_loss = train.evaluate(eval_step, state.params, val, cfg, mesh)
    eval_s = time.perf_counter() - t0
    rows = {}
    for stage, pairs in times.items():
        steady = pairs[2:]  # the first steps of a stage warm caches and allocator pools
        rows[stage] = {
            "mean": float(np.mean([t for _, t in steady])),
            "even": float(np.mean([t for s, t in steady if s % 2 == 0])),
            "odd": float(np.mean([t for s, t in steady if s % 2 == 1])),
            "record_8xh100": RECORD_MS[stage],
        }
        print(
            f"stage {stage}: {rows[stage]['mean']:.1f} ms/step (even {rows[stage]['even']:.1f}, odd "
            f"{rows[stage]['odd']:.1f}); record on 8×H100: {RECORD_MS[stage][0]} ({RECORD_MS[stage][1]} / "
            f"{RECORD_MS[stage][2]}), ×8 = {8 * RECORD_MS[stage][0]:.0f} per-GPU pace"
        )
    full = (
        483 * rows[0]["mean"] + 484 * rows[1]["mean"] + 483 * rows[2]["mean"] + 40 * rows[3]["mean"]
    ) / 1000
    print(
        f"compile {compile_s:.1f} s for {len(variants)} variants; eval of {len(val['inputs'])} val rows {eval_s:.1f} s"
    )
    print(
        f"projected full 1490-step train time at these rates: {full:.0f} s (target 600 s; record per-GPU pace 698 s)"
    )
    if first_nonfinite is not None:
        stage = schedule.stage_index(cfg, first_nonfinite)
        print(
            f"NOT A VALID RUN: the training loss is not finite from step {first_nonfinite} (stage {stage}) on"
        )
    return {
        "first_nonfinite_step": first_nonfinite,
        "compile_s": compile_s,
        "stages": rows,
        "projected_train_s": full,
        "val_loss": val_loss,
        "eval_s": eval_s,
    }


def side_by_side(args) -> dict:
    """The twin first, then jaxrun, from the same init on the same batches (run with
    XLA_PYTHON_CLIENT_PREALLOCATE=false, so the card is the twin's while it runs)."""
    import jax

    from jaxrun import model, schedule, sharding, train

    cfg = _config(args.data, tiny=args.tiny)
    key = jax.random.key(cfg.train.seed)
    cpu = jax.local_devices(backend="cpu")[0]
    tree0 = jax.device_get(jax.jit(lambda k: model.init(k, cfg.model))(jax.device_put(key, cpu)))
    params0 = {k: np.asarray(v) for k, v in _flat(tree0).items()}
    mesh = sharding.make_mesh(cfg.mesh)
    stream, _, _ = train._load_data(cfg, mesh)
    batches = [next(stream) for _ in range(args.steps)]
    torch_losses, torch_ms = _twin_run(cfg, params0, batches)

    state = train.init_state(cfg, key, mesh)
    # the twin's weights bit for bit (a GPU's draw can differ from the CPU's in the last place)
    params = jax.tree.map(lambda x, y: jax.device_put(y, x.sharding), state.params, tree0)
    state = state._replace(params=params)
    steps: dict = {}  # jitted per mode at first use: the first 100 steps need stage 0's only
    jax_losses, jax_ms = [], []
    for step, local in enumerate(batches):
        batch = sharding.global_batch(
            train._stack_micro(local, len(local["inputs"])), sharding.batch_sharding(mesh)
        )
        mode = schedule.train_mode(cfg, step)
        if mode not in steps:
            steps[mode] = train.make_train_step(cfg, mesh, mode)
        t0 = time.perf_counter()
        state, metrics = steps[mode](state, batch)
        jax_losses.append(float(metrics["train_loss"]))
        jax_ms.append(1000 * (time.perf_counter() - t0))
    diff = np.abs(np.array(jax_losses) - np.array(torch_losses))
    out = {
        "steps": args.steps,
        "jax_loss": jax_losses,
        "torch_loss": torch_losses,
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float((diff / np.array(torch_losses)).max()),
        # a systematic gap shows as one sign on nearly every step, noise as both
        "mean_diff": float(np.mean(np.array(jax_losses) - np.array(torch_losses))),
        "jax_higher_steps": int(np.sum(np.array(jax_losses) > np.array(torch_losses))),
        "jax_ms_median": float(np.median(jax_ms[5:])),
        "torch_ms_median": float(np.median(torch_ms[5:])),
    }
    print(json.dumps({k: v for k, v in out.items() if not k.endswith("_loss")}, indent=1))
    for s in (0, 1, 10, 25, 50, 75, args.steps - 1):
        if s < args.steps:
            print(f"step {s}: jax {jax_losses[s]:.4f} twin {torch_losses[s]:.4f}")
    _plot(out, Path(args.out) / "record77_side_by_side.png")
    return out


ABLATIONS = {
    "record77": [],
    "no value embeddings": ["model.embed.value=off"],
    "no multi-token loss": ["model.head.multi_token=()"],
    "full causal (no windows)": [
        "model.attn.windows.stages=((32,32),)",
        "model.attn.windows.final_eval=none",
    ],
}


def ablate(args) -> dict:
    """Val loss after the first `--steps` steps of the real schedule, for the recipe and each ablation."""
    import jax

    from jaxrun import schedule, train
    from jaxrun.config import apply_overrides
    from jaxrun.runlog import kernel_choices, kernel_line

    results = {}
    for name, overrides in ABLATIONS.items():
        if args.only and name not in args.only:
            continue
        cfg = apply_overrides(_config(args.data, args.tiny, args.set), overrides)
        mesh, next_batch, val, state = _session(cfg)
        steps, t0 = {}, time.perf_counter()
        for step in range(args.steps):
            mode = schedule.train_mode(cfg, step)
            if mode not in steps:
                steps[mode] = train.make_train_step(cfg, mesh, mode)
            state, _ = steps[mode](state, next_batch())
        jax.block_until_ready(state)
        seconds = time.perf_counter() - t0
        eval_step = train.make_eval_step(cfg, mesh, schedule.eval_mode(cfg, args.steps))
        val_loss = train.evaluate(eval_step, state.params, val, cfg, mesh)
        chosen = kernel_choices(cfg)
        results[name] = {
            "overrides": overrides,
            "kernels": chosen,
            "val_loss": val_loss,
            "seconds_with_compile": seconds,
        }
        print(
            f"{name}: val_loss {val_loss:.4f} after {args.steps} steps ({seconds:.0f} s with compile); "
            + kernel_line(chosen),
            flush=True,
        )
        del state, steps
        jax.clear_caches()
    base = results["record77"]["val_loss"] if "record77" in results else float("nan")
    for name, r in results.items():
        r["delta"] = r["val_loss"] - base
        print(f"{name:28s} {r['val_loss']:.4f} ({r['delta']:+.4f})")
    return results


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        out |= _flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def _twin_run(cfg, params0: dict, batches: list[dict]) -> tuple[list[float], list[float]]:
    """The twin in bf16 (on the GPU if there is one) from `params0` over `batches`: per-token train loss per step."""
    import torch

    from benchmarks.torch_reference import record77_worker as worker
    from benchmarks.torch_reference.record77 import GPT77, Record77Config
    from benchmarks.torch_reference.record77_optim import Batch, Schedule, Trainer

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = cfg.model
    sizes = Record77Config(
        vocab_size=m.vocab_size,
        model_dim=m.model_dim,
        num_heads=m.num_heads,
        head_dim=m.head_dim,
        block_size=m.attn.windows.block,
        dtype="bfloat16",
    )
    model = GPT77(sizes, device=torch.device(device))
    worker.load_params(model, params0)
    trainer = Trainer(model, Schedule(1450, 40), polar_dtype=torch.bfloat16)
    losses, ms = [], []
    for step, b in enumerate(batches):
        T = b["inputs"].shape[1]
        rows = []
        for r in range(b["inputs"].shape[0]):
            seg = b["segment_ids"][r]
            cu = np.concatenate([[0], np.flatnonzero(np.diff(seg)) + 1, [T]]).astype(np.int64)
            xs = (b["inputs"][r], b["targets"][r], cu)
            rows.append(Batch(*(torch.from_numpy(np.asarray(x, np.int64)).to(device) for x in xs)))
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        loss = trainer.train_step(step, rows)
        sync()
        ms.append(1000 * (time.perf_counter() - t0))
        losses.append(loss / T)
        print(f"twin step {step}: {losses[-1]:.4f} ({ms[-1]:.0f} ms)", flush=True)
    del trainer, model
    if device == "cuda":
        torch.cuda.empty_cache()  # the card goes back to jaxrun
    return losses, ms


def _plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    steps = np.arange(out["steps"])
    a.plot(steps, out["jax_loss"], label="jaxrun")
    a.plot(steps, out["torch_loss"], label="PyTorch twin", linestyle="--")
    a.set(
        xlabel="step",
        ylabel="train loss (multi-token, per token)",
        title="record77, same weights and batches",
    )
    a.legend()
    b.plot(steps, np.array(out["jax_loss"]) - np.array(out["torch_loss"]))
    b.axhline(0, color="gray", lw=0.5)
    b.set(xlabel="step", ylabel="jaxrun − twin", title="difference (bf16)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("stages", "side-by-side", "ablate"))
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--steps-per-stage", type=int, default=40)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--tiny", action="store_true", help="a CPU-sized model, to check this script")
    p.add_argument("--only", nargs="*", help="ablate: run only these entries of ABLATIONS")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = p.parse_args(argv)
    if args.set and args.what == "side-by-side":
        p.error("--set changes jaxrun's recipe, which the twin would not follow: not with side-by-side")
    Path(args.out).mkdir(parents=True, exist_ok=True)  # before minutes of work, not after
    result = {"stages": stages, "side-by-side": side_by_side, "ablate": ablate}[args.what](args)
    out = Path(args.out) / f"record77_{args.what.replace('-', '_')}.json"
    out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
