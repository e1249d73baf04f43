"""What a run leaves behind: console lines, a log file, metrics JSONL, a plot.

Each run gets `out_dir/<config name>-<timestamp>/` holding `log.txt` (the
config as JSON, the source files that ran and `nvidia-smi`, as modded-nanogpt
logs its own code), `metrics.jsonl` (one record per train step and per eval),
`result.json` and `loss.png`. Val lines use the speedrun's format,
`step:N/M val_loss:X train_time:Tms step_avg:Sms`, so one parser reads XLA
and PyTorch logs alike.
"""

from __future__ import annotations

import datetime
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax

from jaxrun.config import Config

_SOURCE_ROOTS = ("jaxrun", "pallas_kernels")


class _Progress:
    """A tqdm bar on a terminal; otherwise a plain line every ~5% of the run."""

    def __init__(self, total: int, enabled: bool):
        self.total = total
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)
        self.every = max(1, total // 20)
        self.loss = float("nan")

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{self.loss:.3f}", refresh=False)
            self.bar.refresh()
        elif step % self.every == 0:
            print(f"step:{step}/{self.total} train_loss:{self.loss:.4f}", flush=True)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class RunLog:
    def __init__(self, cfg: Config, run_dir: str | Path | None = None):
        """Logs into a new `out_dir/<name>-<timestamp>/`, or appends to `run_dir` (a resumed run)."""
        self.cfg = cfg
        self.is_main = jax.process_index() == 0
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.run_dir = Path(run_dir or Path(cfg.train.out_dir) / f"{cfg.name}-{stamp}").expanduser()
        self.history: list[dict[str, Any]] = []
        earlier = self.run_dir / "metrics.jsonl"
        if run_dir is not None and earlier.exists():  # a resumed run's plot shows the whole run
            self.history = [json.loads(line) for line in earlier.read_text().splitlines()]
        self._progress = _Progress(cfg.train.steps, enabled=False)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._log = open(self.run_dir / "log.txt", "a")  # noqa: SIM115  open for the run; closed by close()
            self._metrics = open(self.run_dir / "metrics.jsonl", "a")  # noqa: SIM115

    def _file(self, text: str) -> None:
        if self.is_main:
            self._log.write(text + "\n")
            self._log.flush()

    def info(self, line: str) -> None:
        if self.is_main:
            self._progress.write(line)
        self._file(line)

    def header(self, mesh) -> None:
        """Config, devices and environment first; source and nvidia-smi to the file only."""
        if not self.is_main:
            return
        (self.run_dir / "config.json").write_text(self.cfg.to_json())
        devices = jax.devices()
        self.info(f"jaxrun · config {self.cfg.name} · run dir {self.run_dir}")
        self.info(
            f"jax {jax.__version__} · {len(devices)} × {devices[0].device_kind} · mesh {dict(mesh.shape)}"
        )
        self._file(self.cfg.to_json())
        root = Path(__file__).resolve().parent.parent
        for folder in _SOURCE_ROOTS:
            for path in sorted((root / folder).glob("*.py")):
                self._file(f"{'=' * 30} {path.relative_to(root)}\n{path.read_text()}")
        if shutil.which("nvidia-smi"):
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, check=False)
            self._file(smi.stdout)
        self._file("=" * 100)

    def progress(self, total: int) -> _Progress:
        self._progress = _Progress(total, enabled=self.is_main and self.cfg.train.progress)
        return self._progress

    def _record(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.is_main:
            self._metrics.write(json.dumps(record) + "\n")

    def train_metrics(self, step: int, metrics: dict[str, jax.Array]) -> None:
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self._progress.loss = record["train_loss"]
        self._record(record)

    def val(self, step: int, val_loss: float, train_ms: float, step_avg_ms: float) -> None:
        self._record({"step": step, "val_loss": val_loss, "train_time_ms": train_ms})
        self.info(
            f"step:{step}/{self.cfg.train.steps} val_loss:{val_loss:.4f} "
            f"train_time:{train_ms:.0f}ms step_avg:{step_avg_ms:.2f}ms"
        )

    def finish(self, result: dict[str, Any]) -> None:
        self.info(
            f"done: val_loss {result['val_loss']:.4f} (unigram baseline {result['unigram_val_loss']:.4f}) · "
            f"{result['step_avg_ms']:.1f} ms/step · "
            f"{result['tokens_per_s']:,.0f} tok/s · compile {result['compile_s']:.1f}s"
        )
        if not self.is_main:
            return
        (self.run_dir / "result.json").write_text(json.dumps(result, indent=2))
        plot_losses(self.history, self.run_dir / "loss.png", title=self.cfg.name)
        self.info(f"wrote {self.run_dir / 'metrics.jsonl'} and {self.run_dir / 'loss.png'}")

    def close(self) -> None:
        if self.is_main:
            self._log.close()
            self._metrics.close()


def loss_axes(figsize: tuple[float, float] = (7, 4)):
    """A fresh (figure, axes) for a loss-vs-step plot, on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)


def save_loss_plot(fig, ax, path: Path, title: str) -> None:
    """Label, title and write a loss-vs-step plot, then free it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_losses(history: list[dict[str, Any]], path: Path, title: str) -> None:
    """Train and val loss against step, one PNG."""
    train = [(r["step"], r["train_loss"]) for r in history if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r and math.isfinite(r["val_loss"])]
    fig, ax = loss_axes()
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.7, label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="val")
    save_loss_plot(fig, ax, path, title)
