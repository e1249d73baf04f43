"""Where training is at a step: its stage, the forward's mode, the multi-token weights.

Stages start at step 0 and at each `data.stages` step; with `optim.extension_steps`,
the last `extension_steps` steps are one more stage (record #77's 40 steps past its
1450 scheduled ones). Per stage the windows (`model.attn.windows.stages`), the YaRN
history of long windows, whether the head is still tied, and the multi-token
weights (`model.head.multi_token`) are fixed or linear in the stage's progress.
The mode is static (each distinct mode compiles its own step); the weights are
computed from the step inside the compiled step, so they never recompile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrun.config import Config
from jaxrun.model import Mode


def stage_starts(cfg: Config) -> tuple[int, ...]:
    """First step of every stage, the extension's included."""
    starts = (0, *(stage[0] for stage in cfg.data.stages))
    if cfg.optim.extension_steps:
        starts = (*starts, cfg.train.steps - cfg.optim.extension_steps)
    return starts


def stage_index(cfg: Config, step: int) -> int:
    return sum(step >= start for start in stage_starts(cfg)) - 1


def split_step(cfg: Config) -> int | None:
    """The step after whose update the embedding and head untie, or None (never tied that way)."""
    if cfg.model.head.tie != "until_split":
        return None
    starts = stage_starts(cfg)
    stage = cfg.model.head.untie_stage
    return starts[stage] | 1 if stage < len(starts) else None  # odd, so Adam updates on it


def _windows(cfg: Config, stage: int) -> tuple[int, int] | None:
    w = cfg.model.attn.windows
    return None if w is None else w.stages[min(stage, len(w.stages) - 1)]


def _long_history(cfg: Config, stage: int) -> tuple[int, ...]:
    """The long windows the run has moved through by `stage`, for YaRN (repeats dropped)."""
    history: list[int] = []
    for s in range(stage + 1):
        windows = _windows(cfg, s)
        if windows is not None and (not history or history[-1] != windows[1]):
            history.append(windows[1])
    return tuple(history)


def train_mode(cfg: Config, step: int) -> Mode:
    """The mode of the train step at `step`."""
    stage = stage_index(cfg, step)
    split = split_step(cfg)
    return Mode(
        training=True,
        windows=_windows(cfg, stage),
        long_history=_long_history(cfg, stage),
        tied=split is not None and step <= split,
    )


def eval_mode(cfg: Config, step: int) -> Mode:
    """The mode of a validation before the step `step` (the final one at `train.steps`).

    Eval reads the token embedding, which the tied steps keep equal to the head's transpose.
    The final validation uses `windows.final_eval` and no further YaRN change.
    """
    stage = stage_index(cfg, min(step, cfg.train.steps - 1))
    windows = _windows(cfg, stage)
    if step >= cfg.train.steps and cfg.model.attn.windows is not None and cfg.model.attn.windows.final_eval:
        windows = cfg.model.attn.windows.final_eval
    return Mode(training=False, windows=windows, long_history=_long_history(cfg, stage))


def train_modes(cfg: Config) -> list[Mode]:
    """Every distinct train mode of the run, in order (what to compile ahead of time)."""
    split = split_step(cfg)
    steps = [*stage_starts(cfg), *([split, split + 1] if split is not None else [])]
    modes: list[Mode] = []
    for step in sorted(s for s in set(steps) if s < cfg.train.steps):
        if (mode := train_mode(cfg, step)) not in modes:
            modes.append(mode)
    return modes


def multi_token_weights(cfg: Config, step: jax.Array) -> jax.Array | None:
    """[n] weights of targets t, t+1, … at `step` (traced), or None without a multi-token loss.

    Within stage i they move linearly from the stage's start to its end weights over the stage,
    as (step - start)/(end - start); stages past the table's end use its last row.
    """
    table = cfg.model.head.multi_token
    if not table:
        return None
    n = max(len(w) for row in table for w in row)
    starts = stage_starts(cfg)
    ends = (*starts[1:], cfg.train.steps)
    step = jnp.asarray(step, jnp.float32)
    weights = jnp.zeros((n,), jnp.float32)
    for i, (start, end) in enumerate(zip(starts, ends)):
        w0, w1 = table[min(i, len(table) - 1)]
        w0 = jnp.pad(jnp.asarray(w0, jnp.float32), (0, n - len(w0)))
        w1 = jnp.pad(jnp.asarray(w1, jnp.float32), (0, n - len(w1)))
        frac = (step - start) / max(end - start, 1)
        weights = jnp.where((step >= start) & (step < end), w0 + (w1 - w0) * frac, weights)
    _, last1 = table[min(len(starts) - 1, len(table) - 1)]
    final = jnp.pad(jnp.asarray(last1, jnp.float32), (0, n - len(last1)))
    return jnp.where(step >= ends[-1], final, weights)
