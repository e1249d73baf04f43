"""What stops the train loop early: signals, and a non-finite loss.

SIGTERM and SIGINT save a checkpoint at the next step boundary and stop
(`StopSignals`), as a cluster pre-emption needs. A non-finite loss or gradient
norm stops the run too, but first `stop_nonfinite` replays the steps since the
last good checkpoint to name the leaves that went non-finite, so the message
says where to look.
"""

from __future__ import annotations

import os
import signal
import threading
import typing
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import numpy as np

from jaxrun import model
from jaxrun.checkpoint import Checkpointer, NonFiniteError, leaf_paths
from jaxrun.config import Config


class StopSignals:
    """While entered, SIGTERM and SIGINT set `signal` instead of stopping the process.

    The loop polls it at each step boundary, saves a checkpoint and stops. The first
    signal restores the previous handlers, so a second one acts as usual (SIGINT
    raises KeyboardInterrupt). Outside the main thread, where handlers cannot be
    set, nothing is installed.
    """

    def __init__(self):
        self.signal: signal.Signals | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> typing.Self:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        self.signal = signal.Signals(signum)
        self._restore()
        # os.write, not print: the signal may have interrupted a print to the same stream.
        name = self.signal.name
        os.write(
            2, f"{name}: stopping at the next step boundary, with a checkpoint ({name} again: now)\n".encode()
        )

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()


def all_finite(metrics: dict[str, Any]) -> bool:
    return all(np.isfinite(np.asarray(v)).all() for v in metrics.values())


def _nonfinite(tree: Any) -> list[str]:
    """Paths of the leaves holding a NaN or an infinity."""
    flags = jax.tree.map(
        lambda x: ~jnp.isfinite(x).all() if jnp.issubdtype(x.dtype, jnp.inexact) else False, tree
    )
    return [path for path, bad in leaf_paths(flags) if bad]


def _names(tree: Any, paths: list[str]) -> str:
    total = len(jax.tree.leaves(tree))
    if len(paths) in (0, total):
        return f"all {total}" if paths else "none"
    return ", ".join(paths) if len(paths) <= 8 else f"{len(paths)} of {total}: {', '.join(paths[:8])}, ..."


def stop_nonfinite(
    ckpt: Checkpointer, step: int, metrics: dict, fresh: Any, stream: Any, train_step, next_batch
) -> NoReturn:
    """Stop the run after step `step`'s non-finite metrics, naming the leaves that went non-finite.

    The steps from the last good checkpoint (or from `fresh`, the initial state, with
    `stream` at its start) up to `step - 1` are replayed with `train_step`; then the
    params and optimizer state entering `step`, and the gradients on its batch, are
    checked leaf by leaf. Checkpoints already written are left as they are.

    Raises:
      NonFiniteError: always, naming the step and the leaves.
    """
    ckpt.discard_pending()  # never save the state after a non-finite step
    values = ", ".join(f"{k}={float(v):.4g}" for k, v in metrics.items())
    restored = ckpt.restore_latest(fresh, stream)
    state, start = (restored.state, restored.step) if restored else (fresh, 0)
    ckpt.log(f"step {step}: non-finite {values}; replaying steps {start + 1}..{step - 1} to find where")
    for _ in range(start, step - 1):
        state, _ = train_step(state, next_batch())
    grads = _nonfinite_grads(ckpt.cfg, state.params, next(stream))
    last = (
        f"The last good checkpoint is {ckpt.directory / str(start)}" if restored else "There is no checkpoint"
    )
    message = (
        f"step {step} went non-finite ({values}). Non-finite leaves entering step {step}: params: "
        f"{_names(state.params, _nonfinite(state.params))}; optimizer state: "
        f"{_names(state.opt_state, _nonfinite(state.opt_state))}; gradients on step {step}'s batch: "
        f"{_names(state.params, grads)}. {last}."
    )
    ckpt.log(f"error: {message}")
    raise NonFiniteError(message)


def _nonfinite_grads(cfg: Config, params: model.Params, batch: dict[str, np.ndarray]) -> list[str]:
    """Param paths whose gradient on `batch` (this process's rows) is non-finite, on one device."""
    device = jax.local_devices()[0]
    params = jax.device_put(jax.device_get(params), device)  # via the host: off the mesh, onto one device
    grad = jax.jit(jax.grad(lambda p, b: model.token_losses(p, b, cfg.model).sum()))
    rows, bad = cfg.train.micro_batch_seqs, set()
    for i in range(0, len(batch["inputs"]), rows):
        micro = {k: jax.device_put(v[i : i + rows], device) for k, v in batch.items()}
        bad.update(_nonfinite(grad(params, micro)))
    return sorted(bad)
