"""The step clock: a step's time runs from the previous step's end to its own, not between reads.

(tests/test_loop.py checks the step times of a whole run in metrics.jsonl.)
"""

import time

import pytest

from jaxrun import step_clock


def _until(deadline: float) -> None:
    time.sleep(max(0.0, deadline - time.perf_counter()))


def test_late_reads_do_not_move_the_step_boundaries(monkeypatch):
    """Two queued steps end 0.1 s apart on the 'device'; the host reads both only at 0.25 s (still
    dispatching). Read to read, they would measure 250 and ~0 ms; here each measures ~100 ms. After
    a validation the clock restarts, and the next step again measures ~100 ms."""
    monkeypatch.setattr(step_clock.jax, "block_until_ready", _until)  # a 'tree' is when its step ends
    with step_clock.StepClock() as clock:
        clock.restart()
        t0 = time.perf_counter()
        first, second = clock.watch(t0 + 0.1), clock.watch(t0 + 0.2)
        _until(t0 + 0.25)
        assert clock.step_ms(first) == pytest.approx(100, abs=30)
        assert clock.step_ms(second) == pytest.approx(100, abs=30)
        _until(t0 + 0.45)  # a validation
        clock.restart()
        third = clock.watch(time.perf_counter() + 0.1)
        assert clock.step_ms(third) == pytest.approx(100, abs=30)
