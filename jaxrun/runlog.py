"""What a run leaves behind: console lines, a log file, metrics JSONL, a plot.

Each run gets `out_dir/<config name>-<timestamp>/` holding `log.txt` (the
config as JSON, the source files that ran and `nvidia-smi`, as modded-nanogpt
logs its own code), `metrics.jsonl` (one record per train step and per eval),
`result.json`, `loss.png` and TensorBoard event files (`tensorboard/`); with
`train.wandb` on and wandb installed, an offline wandb run too. Metrics are
written a line at a time, so a killed run keeps every step it logged, and a
resumed run first drops the records past the step it resumed from. Val lines
use the speedrun's format, `step:N/M val_loss:X train_time:Tms step_avg:Sms`,
so one parser reads XLA and PyTorch logs alike.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax

from jaxrun.config import Config
from jaxrun.model import kernels

_SOURCE_ROOTS = ("jaxrun", "pallas_kernels")
# TensorBoard tags: grouped by section, so train and val loss share a chart heading.
_TB_NAMES = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "lr_factor": "train/lr_factor",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "perf/tokens_per_s",
    "train_time_ms": "perf/train_time_ms",
}


def tokens_at(cfg: Config, step: int) -> int:
    """Tokens in step `step`'s batch, under the stage schedule (`data.stages`)."""
    tokens = cfg.data.tokens_per_step
    for start, batch_seqs, seq_len, _ in cfg.data.stages:
        tokens = batch_seqs * seq_len if step >= start else tokens
    return tokens


def kernel_choices(cfg: Config) -> dict[str, str]:
    """Each kernel's implementation for this run on this backend, `auto` resolved."""
    return kernels.resolved(cfg.model, documents=cfg.data.mode != "contiguous")


def kernel_line(choices: dict[str, str]) -> str:
    """The run header's `kernels:` line."""
    return "kernels: " + " · ".join(f"{name} {impl}" for name, impl in choices.items())


class _Progress:
    """A tqdm bar on a terminal; otherwise (nohup, SLURM) a plain line every ~5% of the run.

    The plain line carries the step, the loss, the tokens per second since the
    first step it saw, and an ETA at that pace (eval pauses included).
    """

    def __init__(self, cfg: Config, total: int, enabled: bool):
        self.cfg, self.total = cfg, total
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)
        self.every = max(1, total // 20)
        self.loss = float("nan")
        self._since: tuple[int, float] | None = None  # (step, time) of the first update
        self._tokens = 0

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{self.loss:.3f}", refresh=False)
            self.bar.refresh()
            return
        now = time.perf_counter()
        if self._since is None:
            self._since = (step, now)
            return
        self._tokens += tokens_at(self.cfg, step - 1)
        if step % self.every == 0 or step == self.total:
            done, seconds = step - self._since[0], now - self._since[1]
            eta = (self.total - step) * seconds / done
            print(
                f"step:{step}/{self.total} train_loss:{self.loss:.4f} "
                f"tok/s:{self._tokens / seconds:,.0f} eta:{_duration(eta)}",
                flush=True,
            )

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    """`42s`, `3m05s`, `2h07m`."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class _Sinks:
    """TensorBoard event files, and wandb when `train.wandb` is on and wandb imports; made on first use.

    A resumed run's TensorBoard writer purges the events from the resumed step on,
    as metrics.jsonl drops its records past it.
    """

    def __init__(self, cfg: Config, run_dir: Path, info):
        self.cfg, self.run_dir, self._info = cfg, run_dir, info
        self.purge_step: int | None = None
        self._tb = self._wandb = None
        self._opened = False

    def _open(self) -> None:
        self._opened = True
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.purge_step)
        if not self.cfg.train.wandb:
            return
        try:
            import wandb
        except ImportError:
            self._info("train.wandb is on, but wandb is not installed (pip install wandb): skipping it")
            return
        self._wandb = wandb.init(
            project="jaxrun",
            name=self.run_dir.name,
            id=self.run_dir.name,
            dir=str(self.run_dir),
            config=json.loads(self.cfg.to_json()),
            mode=os.environ.get("WANDB_MODE", "offline"),  # `wandb sync` uploads it later
            resume="allow",
        )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self._opened:
            self._open()
        for name, value in values.items():
            self._tb.add_scalar(name, value, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


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
            lines = earlier.read_text().splitlines()
            self.history = [json.loads(line) for line in lines if line.endswith("}")]  # not a torn last line
        self._progress = _Progress(cfg, cfg.train.steps, enabled=False)
        self._sinks = _Sinks(cfg, self.run_dir, self.info)
        self._last_val: tuple[int, float] | None = None  # (step, train_ms) of the previous val line
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._log = open(self.run_dir / "log.txt", "a")  # noqa: SIM115  open for the run; closed by close()
            self._open_metrics()

    def _open_metrics(self) -> None:
        # Line-buffered: each record reaches the OS as it is written, so kill -9 loses none.
        self._metrics = open(self.run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115

    def rewind(self, step: int) -> None:
        """Forget what was logged past `step` (train records) or at it (val, which runs again): a resume."""
        self.history = [
            r for r in self.history if r["step"] < step or (r["step"] == step and "val_loss" not in r)
        ]
        self._sinks.purge_step = step + 1
        if self.is_main:
            self._metrics.close()
            path = self.run_dir / "metrics.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in self.history))
            self._open_metrics()

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
        self.info(kernel_line(kernel_choices(self.cfg)))
        self._file(self.cfg.to_json())
        root = Path(__file__).resolve().parent.parent
        for folder in _SOURCE_ROOTS:
            for path in sorted((root / folder).rglob("*.py")):
                self._file(f"{'=' * 30} {path.relative_to(root)}\n{path.read_text()}")
        if shutil.which("nvidia-smi"):
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, check=False)
            self._file(smi.stdout)
        self._file("=" * 100)

    def progress(self, total: int) -> _Progress:
        self._progress = _Progress(self.cfg, total, enabled=self.is_main and self.cfg.train.progress)
        return self._progress

    def _record(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.is_main:
            self._metrics.write(json.dumps(record) + "\n")
            step, values = record["step"], {k: v for k, v in record.items() if k != "step"}
            self._sinks.scalars(step, {_TB_NAMES.get(k, k): v for k, v in values.items()})

    def train_metrics(self, step: int, metrics: dict[str, jax.Array]) -> None:
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self._progress.loss = record["train_loss"]
        self._record(record)

    def val(self, step: int, val_loss: float, train_ms: float, step_avg_ms: float) -> None:
        record = {"step": step, "val_loss": val_loss, "train_time_ms": train_ms}
        if self._last_val is not None and step > self._last_val[0] and train_ms > self._last_val[1]:
            start, ms = self._last_val
            tokens = sum(tokens_at(self.cfg, s) for s in range(start, step))
            record["tokens_per_s"] = tokens / ((train_ms - ms) / 1000)  # since the previous val line
        self._last_val = (step, train_ms)
        self._record(record)
        self.info(
            f"step:{step}/{self.cfg.train.steps} val_loss:{val_loss:.4f} "
            f"train_time:{train_ms:.0f}ms step_avg:{step_avg_ms:.2f}ms"
        )

    def finish(self, result: dict[str, Any]) -> None:
        self.info(
            f"done: val_loss {result['val_loss']:.4f} (unigram baseline {result['unigram_val_loss']:.4f}) · "
            f"{result['step_avg_ms']:.1f} ms/step · {result['tokens_per_s']:,.0f} tok/s"
            + (f" · peak {peak:.1f} GiB on device 0" if (peak := result.get("peak_device_gib")) else "")
        )
        self.info(
            f"time: train {result['train_time_ms'] / 1000:.1f}s · compile {result['compile_s']:.1f}s · "
            f"eval {result['eval_s']:.1f}s · sample {result['sample_s']:.1f}s · "
            f"total {result['wall_s']:.1f}s wall"
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
            self._sinks.close()


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
    if ax.get_legend_handles_labels()[0]:  # a run stopped before its first logged step has no curves
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
