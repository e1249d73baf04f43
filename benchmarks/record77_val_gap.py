"""record77's val loss with its fast kernels against the correct-first ones, over several init seeds.

  python benchmarks/record77_val_gap.py --data DIR [--steps 150] [--seeds 0,1,2,3] [--out DIR] [--set K=V ...]
  python benchmarks/record77_val_gap.py --merge A.json B.json ... [--out DIR]

Trains the first `--steps` steps of the real schedule from each seed's init, on the same data, twice:
with record77's defaults (the fast kernels) and with CORRECT_FIRST (the kernels checked against
PyTorch first: Triton attention, XLA MLP, norm and loss pass). Each set's steps compile once and serve every
seed. Prints each seed's val losses and their gap (fast − correct-first), then the mean gap with its
standard error across seeds and whether the runs show the gap within `--bound` (|mean| + 2·SE ≤
bound), show it outside (|mean| − 2·SE > bound), or cannot tell. Writes record77_val_gap.json and a
plot of both sets' val per seed. `--set` changes both sets, `--fast-set` the fast one (a kernel under
test on top of the defaults), `--first-set` replaces CORRECT_FIRST (on a CPU, whose mesh cannot run
the Triton attention: `--tiny --first-set model.kernels.mlp=xla` checks the script). DIR holds llm.c
shards `train_*.bin` and `val_*.bin`. `--merge` joins the JSON of runs over other seeds (one device
call may not hold them all) and prints and plots the summary of them all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.record77_gpu import _config, _session

CORRECT_FIRST = (
    "model.kernels.attention=pallas",
    "model.kernels.mlp=xla",
    "model.kernels.norm=xla",
    "model.kernels.loss=xla_fused",
)


def gap_summary(fast: list[float], first: list[float], bound: float) -> dict:
    """Mean of the per-seed gaps fast − first, its standard error, and what it shows about `bound`."""
    if len(fast) != len(first) or not fast:
        raise ValueError(f"need one val loss per seed in each set, got {len(fast)} and {len(first)}")
    gaps = [a - b for a, b in zip(fast, first)]
    n = len(gaps)
    mean = sum(gaps) / n
    se = math.sqrt(sum((g - mean) ** 2 for g in gaps) / (n - 1) / n) if n > 1 else math.inf
    if abs(mean) + 2 * se <= bound:
        verdict = "within"
    elif abs(mean) - 2 * se > bound:
        verdict = "outside"
    else:
        verdict = "cannot tell"
    return {"gaps": gaps, "mean_gap": mean, "standard_error": se, "bound": bound, "verdict": verdict}


def _train_and_eval(cfg, seeds: list[int], steps: int, name: str) -> list[float]:
    import jax

    from jaxrun import schedule, train

    step_fns, losses = {}, []
    for seed in seeds:
        cfg_s = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
        mesh, next_batch, val, state = _session(cfg_s)
        t0 = time.perf_counter()
        for step in range(steps):
            mode = schedule.train_mode(cfg_s, step)
            if mode not in step_fns:  # the seed only sets the init: one compile serves every seed
                step_fns[mode] = train.make_train_step(cfg_s, mesh, mode)
            state, _ = step_fns[mode](state, next_batch())
        jax.block_until_ready(state)
        eval_step = train.make_eval_step(cfg_s, mesh, schedule.eval_mode(cfg_s, steps))
        losses.append(train.evaluate(eval_step, state.params, val, cfg_s, mesh))
        print(
            f"{name} seed {seed}: val_loss {losses[-1]:.4f} after {steps} steps "
            f"({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        del state
    jax.clear_caches()
    return losses


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds, s = result["seeds"], result["summary"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(seeds, result["fast"], "o", label="fast (record77 defaults)")
    a.plot(seeds, result["correct_first"], "s", label="correct-first")
    a.set(xlabel="init seed", ylabel=f"val loss after {result['steps']} steps", xticks=seeds)
    a.legend()
    b.bar(seeds, s["gaps"], color="gray")
    b.axhspan(-s["bound"], s["bound"], color="green", alpha=0.15, label=f"±{s['bound']}")
    b.axhline(
        s["mean_gap"], color="black", lw=1, label=f"mean {s['mean_gap']:+.4f} ± {s['standard_error']:.4f}"
    )
    b.set(xlabel="init seed", ylabel="fast − correct-first", xticks=seeds, title=s["verdict"])
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _merged(p: argparse.ArgumentParser, runs: list[dict]) -> dict:
    """Runs of the same steps and bound over distinct seeds, as one."""
    for key in ("steps", "bound"):
        if len({r[key] for r in runs}) > 1:
            p.error(f"--merge: the runs differ in {key}: {[r[key] for r in runs]}")
    merged = {
        "steps": runs[0]["steps"],
        "bound": runs[0]["bound"],
        "seeds": [],
        "fast": [],
        "correct_first": [],
    }
    for r in runs:
        for key in ("seeds", "fast", "correct_first"):
            merged[key] += r[key]
    if len(set(merged["seeds"])) != len(merged["seeds"]):
        p.error(f"--merge: a seed is in two runs: {merged['seeds']}")
    return merged


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seeds", default="0,1,2,3", help="init seeds, comma-separated")
    p.add_argument("--bound", type=float, default=0.01, help="the largest |gap| allowed")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--tiny", action="store_true", help="a CPU-sized model, to check this script")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="both sets")
    p.add_argument("--fast-set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument(
        "--first-set", action="append", metavar="SECTION.FIELD=VALUE", help="instead of CORRECT_FIRST"
    )
    p.add_argument("--merge", nargs="+", metavar="JSON", help="join earlier runs instead of training")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # before minutes of work, not after
    if args.merge:
        result = _merged(p, [json.loads(Path(f).read_text()) for f in args.merge])
    else:
        if not args.data:
            p.error("--data is needed, unless --merge")
        try:
            seeds = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            p.error(f"--seeds wants integers separated by commas, got {args.seeds!r}")
        if len(set(seeds)) != len(seeds):
            p.error(f"--seeds repeats a seed: {args.seeds}")
        cfg_fast = _config(args.data, args.tiny, [*args.set, *args.fast_set])
        cfg_first = _config(args.data, args.tiny, [*args.set, *(args.first_set or CORRECT_FIRST)])
        fast = _train_and_eval(cfg_fast, seeds, args.steps, "fast")
        first = _train_and_eval(cfg_first, seeds, args.steps, "first")
        result = {
            "steps": args.steps,
            "seeds": seeds,
            "fast": fast,
            "correct_first": first,
            "bound": args.bound,
        }
    if len(result["seeds"]) < 2:
        print("one seed cannot give the spread between runs: run another, then --merge", flush=True)
    summary = result["summary"] = gap_summary(result["fast"], result["correct_first"], result["bound"])
    for seed, a, b, g in zip(result["seeds"], result["fast"], result["correct_first"], summary["gaps"]):
        print(f"seed {seed}: fast {a:.4f}  correct-first {b:.4f}  gap {g:+.4f}")
    print(
        f"mean gap {summary['mean_gap']:+.4f} ± {summary['standard_error']:.4f} (standard error, "
        f"{len(result['seeds'])} seeds): {summary['verdict']} ±{result['bound']}"
    )
    (out / "record77_val_gap.json").write_text(json.dumps(result, indent=1))
    _plot(result, out / "record77_val_gap.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
