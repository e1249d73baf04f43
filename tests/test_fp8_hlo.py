"""record77's training head hands XLA three dots of float8 operands (what its GPU compiler turns into
cuBLASLt FP8 GEMMs; `benchmarks/fp8_hlo.py` checks the compiled GPU program itself)."""

import pytest

from benchmarks import fp8_hlo


@pytest.mark.parametrize("loss", ["xla", "xla_fused"])
def test_head_dots_take_float8_operands(loss):
    fn, args = fp8_hlo.head_program(tokens=4096, loss=loss)
    dots = fp8_hlo.dots(fn.lower(*args).as_text(dialect="hlo"))
    operands = sorted((lhs.split("[")[0], rhs.split("[")[0]) for _, lhs, rhs in dots)
    assert operands == [("f8e4m3fn", "f8e4m3fn"), ("f8e4m3fn", "f8e5m2"), ("f8e5m2", "f8e4m3fn")], dots
    assert all(out.startswith("f32[") for out, _, _ in dots), dots
