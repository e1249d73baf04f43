"""modded-nanogpt's own train_gpt_simple.py and jaxrun's `simple`, back to back on one GPU.

Both read the same offline_english shards in the same order, from one folder
of links: the 4 train shards repeated as often as the step count needs (the
script stops at the end of its file list; jaxrun then never wraps), and the
val shard. The script is changed by text substitution in three places only:
its data globs (relative to its working folder, as it globs from the cwd),
`train_steps` and `val_tokens`. Each side runs once per step count given, the
script first. Peak device memory: the script's is sampled with nvidia-smi
(what torch's caching allocator holds); jaxrun runs as users run it, with
XLA's preallocated pool, and reports the peak its arrays took (without
preallocation an H100 runs out of memory to fragmentation). Then the profile
command prints jaxrun's kernel-time breakdown.

Reported per run: ms/step and tokens/s over the steps after the first 10
(the script compiles inside its first steps; the same window for both),
the last 100 steps' pace over the first 100's, peak device memory, compile
time (jaxrun's AOT compile; for the script its first step beyond a steady
one), and the val losses at every step both sides validated.

Each run writes simple_vs_torch.json and, where both sides ran, simple_vs_torch.png (ms/step
over the run, and the val losses, of both sides).

Usage (on the GPU machine, from the repo root):
  python benchmarks/simple_vs_torch.py --script /path/to/train_gpt_simple.py --steps 75 300 \\
      [--torch-python python3] [--data-xz ../shared/data/offline_english] [--out DIR]
  # a switch on the jaxrun side (and its profile), e.g. the fused Pallas MLP:
  python benchmarks/simple_vs_torch.py --steps 300 --sides jaxrun --set model.kernels.mlp=pallas
  # one side per call where calls are time-limited, then the table and plot of both (no GPU needed):
  python benchmarks/simple_vs_torch.py --merge torch_dir/simple_vs_torch.json jax_dir/simple_vs_torch.json --out DIR
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOKENS_PER_STEP = 524_288
SKIP = 10  # leading steps left out of ms/step: torch.compile runs inside the script's first step
STEP_LINE = re.compile(r"step:(\d+)/(\d+) train_time:([\d.]+)s")
VAL_LINE = re.compile(r"step:(\d+)/(\d+) val_loss:([\d.]+)")


def unpack(xz_dir: Path, out: Path) -> Path:
    """The shards, decompressed once into `out/oe`."""
    target = out / "oe"
    if not glob.glob(str(target / "train_*.bin")):
        subprocess.run(
            [sys.executable, "launch.py", "data", "unxz", str(xz_dir), "--out", str(target)], check=True
        )
    return target


def linked_data(shards: Path, work: Path, steps: int) -> tuple[str, str]:
    """work/data/oe/: train_000001.bin... cycling the train shards, and the val shard; the relative globs."""
    folder = work / "data" / "oe"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    train = sorted(shards.glob("train_*.bin"))
    per_shard = min(os.path.getsize(p) // 2 - 256 for p in train) // TOKENS_PER_STEP - 1
    copies = math.ceil((steps + 1) / (per_shard * len(train))) + 1
    for i, src in enumerate(train * copies):
        (folder / f"train_{i + 1:06d}.bin").symlink_to(src.resolve())
    for src in sorted(shards.glob("val_*.bin")):
        (folder / src.name).symlink_to(src.resolve())
    return "data/oe/train_*.bin", "data/oe/val_*.bin"


class MemorySampler:
    """The GPU's memory.used, sampled by nvidia-smi every 200 ms while a run goes on."""

    def __init__(self, path: Path):
        self.path = path
        cmd = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", "200"]
        self.proc = subprocess.Popen(cmd, stdout=open(path, "w"), stderr=subprocess.DEVNULL)  # noqa: SIM115

    def stop(self) -> float:
        """Peak GiB over the samples."""
        self.proc.terminate()
        self.proc.wait()
        values = [float(v) for v in self.path.read_text().split() if v.replace(".", "").isdigit()]
        return max(values) / 1024 if values else float("nan")


def run_logged(cmd: list[str], cwd: Path, log: Path) -> str:
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, check=False)
    text = log.read_text()
    if proc.returncode:
        print(text[-3000:])
        raise SystemExit(f"{cmd[0]} failed with exit code {proc.returncode}; log: {log}")
    return text


def run_torch(script: Path, torch_python: str, work: Path, steps: int, val_tokens: int, globs) -> dict:
    """The script with its data globs, train_steps and val_tokens replaced; per-step times from its prints."""
    text = script.read_text()
    edits = {
        "data/fineweb10B/fineweb_train_*.bin": globs[0],
        "data/fineweb10B/fineweb_val_*.bin": globs[1],
        "train_steps = 3250": f"train_steps = {steps}",
        "val_tokens = 20 * 524288": f"val_tokens = {val_tokens}",
    }
    for old, new in edits.items():
        if text.count(old) != 1:
            raise SystemExit(
                f"{script} does not hold {old!r} exactly once: not the script this harness knows"
            )
        text = text.replace(old, new)
    edited = work / f"train_gpt_simple_{steps}.py"
    edited.write_text(text)
    sampler = MemorySampler(work / f"torch_{steps}_mem.txt")
    t0 = time.perf_counter()
    cmd = [torch_python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", edited.name]
    out = run_logged(cmd, work, work / f"torch_{steps}.log")
    wall = time.perf_counter() - t0
    peak = sampler.stop()
    cumulative = {int(m[1]): float(m[3]) for m in STEP_LINE.finditer(out)}
    times = [1000 * (cumulative[s] - cumulative.get(s - 1, 0.0)) for s in sorted(cumulative)]
    steady = sorted(times[SKIP:])[len(times[SKIP:]) // 2] if times[SKIP:] else float("nan")
    return {
        "step_ms": times,
        "val": {int(m[1]): float(m[3]) for m in VAL_LINE.finditer(out)},
        "peak_gib": peak,
        "compile_s": (times[0] - steady) / 1000 if times else float("nan"),
        "wall_s": wall,
    }


def run_jax(work: Path, steps: int, val_tokens: int, globs, switches: list[str]) -> dict:
    """`launch.py --config simple` on the same links, with `switches` (KEY=VALUE overrides) after
    the harness's own; per-step times from metrics.jsonl's step_ms."""
    sets = [
        f"data.train_files={work / globs[0]}",
        f"data.val_files={work / globs[1]}",
        f"data.val_tokens={val_tokens}",
        f"train.steps={steps}",
        "train.progress=false",
        f"train.out_dir={work / 'jaxrun'}",
        *switches,
    ]
    # jaxrun as users run it, with XLA's preallocated pool (without it, fragmentation runs an H100 out
    # of memory); the peak is what its arrays took (result.json), not the pool nvidia-smi shows
    t0 = time.perf_counter()
    cmd = [sys.executable, "launch.py", "--config", "simple", *[a for s in sets for a in ("--set", s)]]
    out = run_logged(cmd, REPO, work / f"jax_{steps}.log")
    wall = time.perf_counter() - t0
    run_dir = Path(re.search(r"run dir (\S+)", out).group(1))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    result = json.loads((run_dir / "result.json").read_text())
    times = [r["step_ms"] for r in sorted(records, key=lambda r: r["step"]) if "step_ms" in r]
    return {
        "step_ms": times,
        "val": {r["step"]: r["val_loss"] for r in records if "val_loss" in r},
        "peak_gib": result["peak_device_gib"],
        "compile_s": result["compile_s"],
        "wall_s": wall,
        "run_dir": str(run_dir),
        "switches": switches,
    }


def pace(times: list[float]) -> dict:
    steady = times[SKIP:]
    k = max(1, min(100, len(steady) // 3))
    ms = sum(steady) / len(steady)
    first, last = sum(steady[:k]) / k, sum(steady[-k:]) / k
    return {
        "ms_per_step": ms,
        "tokens_per_s": TOKENS_PER_STEP / (ms / 1000),
        "last_over_first": last / first,
        "k": k,
    }


def table(results: dict) -> str:
    lines = ["steps | side | ms/step | tok/s | last/first (k) | peak GiB | compile s | val losses", "---"]
    for steps, sides in results.items():
        common = sorted(set.intersection(*(set(r["val"]) for r in sides.values())) - {0})
        for side in sides:
            r, p = sides[side], pace(sides[side]["step_ms"])
            vals = " ".join(f"@{s}:{r['val'][s]:.4f}" for s in common)
            label = f"{side} ({', '.join(r['switches'])})" if r.get("switches") else side
            lines.append(
                f"{steps} | {label} | {p['ms_per_step']:.1f} | {p['tokens_per_s']:,.0f} | "
                f"{p['last_over_first']:.4f} ({p['k']}) | {r['peak_gib']:.1f} | {r['compile_s']:.1f} | {vals}"
            )
        if len(sides) == 2:
            ratio = (
                pace(sides["jaxrun"]["step_ms"])["ms_per_step"]
                / pace(sides["torch"]["step_ms"])["ms_per_step"]
            )
            lines.append(f"{steps} | jaxrun/torch step time | {ratio:.3f}× | | | | |")
    return "\n".join(lines)


def merge(paths: list[Path]) -> dict:
    """The runs of several simple_vs_torch.json files, by step count and side; a side twice is an error."""
    results: dict[int, dict] = {}
    origin: dict[tuple[int, str], Path] = {}
    for path in paths:
        try:
            runs = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"error: cannot read {path}: {e}") from None
        for steps, sides in runs.items():
            for side, r in sides.items():
                if (int(steps), side) in origin:
                    raise SystemExit(
                        f"error: {steps} steps of {side} are in both {origin[int(steps), side]} and {path}; "
                        "merge one run per side"
                    )
                origin[int(steps), side] = path
                val = {int(k): v for k, v in r["val"].items()}  # JSON keeps the val steps as strings
                results.setdefault(int(steps), {})[side] = r | {"val": val}
    return {steps: dict(sorted(results[steps].items(), reverse=True)) for steps in sorted(results)}


def plot(results: dict, path: Path) -> None:
    """ms/step against step (the compile steps left out) and the val losses, both sides, one column per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(7 * len(results), 7), squeeze=False)
    for (steps, sides), (pace_ax, val_ax) in zip(results.items(), axes.T, strict=True):
        for side, r in sides.items():
            ms = r["step_ms"]
            label = f"{side} ({pace(ms)['ms_per_step']:.1f} ms mean)"
            (line,) = pace_ax.plot(range(SKIP + 1, len(ms) + 1), ms[SKIP:], lw=0.8, label=label)
            points = sorted((s, v) for s, v in r["val"].items() if s > 0)
            val_ax.plot(*zip(*points, strict=True), "o-", color=line.get_color(), mfc="none", label=side)
        pace_ax.set(title=f"{steps} steps: ms/step", xlabel="step", ylabel="ms/step")
        val_ax.set(title="val loss", xlabel="step", ylabel="loss (nats/token)")
        for ax in (pace_ax, val_ax):
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: dict, out: Path) -> None:
    """The table of every run, its JSON, and the plot where a run has both sides."""
    (out / "simple_vs_torch.json").write_text(json.dumps(results, indent=2))
    print("\n" + table(results))
    both = {steps: sides for steps, sides in results.items() if len(sides) == 2}
    if both:
        plot(both, out / "simple_vs_torch.png")
        print(f"wrote {out / 'simple_vs_torch.png'}")
    print(f"wrote {out / 'simple_vs_torch.json'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--script", type=Path, help="a copy of records/track_3_optimization/train_gpt_simple.py")
    p.add_argument("--steps", type=int, nargs="+", default=[75])
    p.add_argument("--torch-python", default=os.environ.get("JAXRUN_TORCH_PYTHON", "python3"))
    p.add_argument("--data-xz", type=Path, default=REPO.parent / "shared" / "data" / "offline_english")
    p.add_argument(
        "--val-tokens", type=int, default=917_504, help="a multiple of 65,536 within the val shard"
    )
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", REPO / "runs" / "simple_vs_torch")))
    p.add_argument("--no-profile", action="store_true")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for the jaxrun side (and its profile), as launch.py takes it; repeatable",
    )
    p.add_argument(
        "--sides",
        nargs="+",
        choices=("torch", "jaxrun"),
        default=["torch", "jaxrun"],
        help="one side per call where a call's time is limited (300 steps take ~6 min a side)",
    )
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="combine the simple_vs_torch.json of earlier runs (one side each) into one table and plot; runs nothing",
    )
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.merge:
        report(merge(a.merge), a.out)
        return
    shards = unpack(a.data_xz, a.out)
    results = {}
    for steps in a.steps:
        work = a.out / f"steps{steps}"
        work.mkdir(exist_ok=True)
        globs = linked_data(shards, work, steps)
        results[steps] = {}
        if "torch" in a.sides:
            results[steps]["torch"] = run_torch(
                a.script.resolve(), a.torch_python, work, steps, a.val_tokens, globs
            )
        if "jaxrun" in a.sides:
            results[steps]["jaxrun"] = run_jax(work, steps, a.val_tokens, globs, a.set)
        (a.out / "simple_vs_torch.json").write_text(json.dumps(results, indent=2))
        print(table({steps: results[steps]}), flush=True)
    if not a.no_profile:
        cmd = [
            sys.executable,
            "launch.py",
            "profile",
            "--config",
            "simple",
            "--steps",
            "3",
            "--out",
            str(a.out / "profile"),
            *[arg for switch in a.set for arg in ("--set", switch)],
        ]
        print(run_logged(cmd, REPO, a.out / "profile.log")[-2500:])
    report(results, a.out)


if __name__ == "__main__":
    main()
