"""Each train step's time, from when the device finished it.

The loop dispatches step n, then reads step n−1's metrics. Dispatching a GPU step can block the
host until most of its kernels are queued, so the read of step n−1 lands well into step n. Timed
from read to read, the steps stay right on average, but a validation shifts time between the
steps around it (a short step before it, a long one after). Here a helper thread waits on each
step's metrics and notes when they are ready, so a step's time runs from the previous step's end
(or the loop's last restart, after a validation) to its own.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Self

import jax


def _finished_at(tree: Any) -> float:
    jax.block_until_ready(tree)
    return time.perf_counter()


class StepClock:
    """`watch(metrics)` when a step is dispatched; `step_ms(watched)` when its metrics are read."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="step-clock")
        self._last = time.perf_counter()

    def restart(self) -> None:
        """The next step's time counts from now (the loop's start, the end of a validation)."""
        self._last = time.perf_counter()

    def watch(self, metrics: Any) -> Future:
        return self._pool.submit(_finished_at, metrics)

    def step_ms(self, watched: Future) -> float:
        """Milliseconds from the previous step's end (or the last restart) to this one's."""
        end = watched.result()
        ms, self._last = 1000 * (end - self._last), end
        return ms

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown()
