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


def test_fp8_gemm_results_read_each_custom_calls_output_type():
    compiled = (
        "  %gemm.1 = (bf16[4096,50304]{1,0}, s8[33554432]{0}) custom-call(%a, %b, %s, %t), "
        'custom_call_target="__cublas$lt$matmul$f8", backend_config={}\n'
        "  %gemm.2 = (f32[768,50304]{1,0}, s8[33554432]{0}) custom-call(%c, %d, %s, %t), "
        'custom_call_target="__cublas$lt$matmul$f8"\n'
        '  %gemm.3 = (bf16[4096,768]{1,0}, s8[4194304]{0}) custom-call(%e, %f), custom_call_target="__cublas$gemm"\n'
    )
    assert fp8_hlo.fp8_gemm_results(compiled) == ["bf16", "f32"]


def test_forward_forms_give_the_logits_within_a_bf16_rounding():
    """Each way of writing the forward GEMM (`fp8_hlo.py --forms`) returns bf16 and, scaled as its
    reader would, the float32 product within one bf16 rounding. Not the bf16-dequantized form: the CPU
    sums a dot of bf16 operands in bf16 (a GPU's GEMM sums in float32). Nor the Mosaic kernel, a
    Hopper GEMM over whole tiles: tests/pallas_kernels/test_fp8_logits_mgpu.py checks it."""
    import jax
    import jax.numpy as jnp

    from jaxrun.config import FP8HeadConfig
    from jaxrun.model import head

    s = FP8HeadConfig()
    k = jax.random.split(jax.random.key(7), 2)
    x8, w8 = head.fp8_operands(
        2.0 * jax.random.normal(k[0], (64, 96)), 0.02 * jax.random.normal(k[1], (96, 80)), s
    )
    exact = (x8.astype(jnp.float32) @ w8.astype(jnp.float32)) * (s.x_scale * s.w_scale)
    for name in set(fp8_hlo.FORWARD_FORMS) - {"mosaic"}:
        out = fp8_hlo.forward_form(name, s.x_scale, s.w_scale)(x8, w8)
        assert out.dtype == jnp.bfloat16, name
        logits = out.astype(jnp.float32) * (s.x_scale * s.w_scale if name == "bf16_result" else 1.0)
        if name != "bf16_dequantized":
            rel = jnp.abs(logits - exact) / jnp.maximum(jnp.abs(exact), 1e-2 * jnp.abs(exact).max())
            assert float(rel.max()) <= 2.0**-8, (name, float(rel.max()))
