"""Two or more runs' val losses at equal training tokens: a table and a plot.

  python benchmarks/equal_tokens.py RUN_DIR RUN_DIR [...] [--out DIR]

Recipes with different batch schedules (record77's three stages, simple's fixed 524,288 tokens) are
compared by tokens seen, not by step. Each run's tokens at each validation come from its saved config
(`<run dir>/config.json`) and its `metrics.jsonl`. The table has a row per validation of the first run:
its val loss, and each other run's val loss linearly interpolated at the same token count (blank
outside the other run's validated range). The plot (`val_at_equal_tokens.png` in --out) shows every
run's val curve against tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxrun.config import Config, config_from_dict
from jaxrun.train import tokens_trained


def val_curve(cfg: Config, records: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, tokens seen, val losses) of a run's validations, in step order (the last record per step)."""
    by_step = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    steps = np.array(sorted(by_step))
    tokens = np.array([tokens_trained(cfg, int(s)) for s in steps], np.int64)
    return steps, tokens, np.array([by_step[s] for s in steps])


def at_tokens(tokens: np.ndarray, losses: np.ndarray, where: np.ndarray) -> np.ndarray:
    """Val loss interpolated linearly in tokens at `where`; NaN outside [tokens[0], tokens[-1]]."""
    out = np.interp(where, tokens, losses)
    return np.where((where >= tokens[0]) & (where <= tokens[-1]), out, np.nan)


def load(run_dir: Path) -> tuple[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    if not (run_dir / "config.json").is_file() or not (run_dir / "metrics.jsonl").is_file():
        raise SystemExit(f"{run_dir}: not a run dir (needs config.json and metrics.jsonl)")
    cfg = config_from_dict(json.loads((run_dir / "config.json").read_text()))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return cfg.name, val_curve(cfg, records)


def table(runs: list[tuple[str, tuple]]) -> str:
    (name0, (steps0, tokens0, losses0)), others = runs[0], runs[1:]
    head = f"| {name0} step | tokens (M) | {name0} | " + " | ".join(n for n, _ in others) + " |"
    lines = [head, "|" + "---:|" * (3 + len(others))]
    for s, t, v in zip(steps0, tokens0, losses0, strict=True):
        cells = [at_tokens(c[1], c[2], np.array([t]))[0] for _, c in others]
        lines.append(
            f"| {s} | {t / 1e6:.1f} | {v:.4f} | "
            + " | ".join("" if np.isnan(c) else f"{c:.4f}" for c in cells)
            + " |"
        )
    return "\n".join(lines)


def plot(runs: list[tuple[str, tuple]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (_, tokens, losses) in runs:
        ax.plot(tokens / 1e6, losses, marker="o", ms=3, label=name)
    ax.set(xlabel="training tokens (M)", ylabel="val loss (nats/token)", title="val loss at equal tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("."))
    a = p.parse_args(argv)
    if len(a.runs) < 2:
        p.error("give at least two run dirs")
    runs = [load(r) for r in a.runs]
    print(table(runs))
    a.out.mkdir(parents=True, exist_ok=True)
    plot(runs, a.out / "val_at_equal_tokens.png")
    print(f"wrote {a.out / 'val_at_equal_tokens.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
