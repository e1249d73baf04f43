"""How record #77's FP8 head GEMMs ask to accumulate: fast in the forward, float32 in the backward.

On a GPU, XLA runs an FP8 dot at DEFAULT precision as a cuBLASLt GEMM with fast accumulation and at
HIGHEST without it; the record's forward uses `use_fast_accum=True`, its two backward GEMMs False.
The CPU computes FP8 dots exactly at either precision, so no CPU number can tell the two apart: these
tests read the precision of every FP8 dot in the lowered training gradient instead, for the fused
custom VJP (`head_mtp_loss.fp8_mtp_loss`, what `model.kernels.loss="xla_fused"` trains with) and for
the plain autodiff path (`head.fp8_matmul`).
"""

import re

import jax
import jax.numpy as jnp
import pytest

from benchmarks import fp8_hlo
from jaxrun.config import FP8HeadConfig
from jaxrun.model import head, head_mtp_loss

N, D, V, T = 32, 16, 48, 8
SCALES = FP8HeadConfig()
FP8 = ("f8E4M3FN", "f8E5M2")


def _fp8_dots(lowered_text: str) -> list[tuple[str, str]]:
    """(operand types, precision) of each dot_general in the StableHLO whose operands are FP8."""
    dots = []
    for line in lowered_text.splitlines():
        if "stablehlo.dot_general" not in line:
            continue
        operands = re.search(r":\s*\((tensor<[^)]*)\)\s*->", line).group(1)
        if not any(t in operands for t in FP8):
            continue
        precision = re.search(r"precision = \[(\w+), (\w+)\]", line)
        dots.append((operands, precision.group(1) if precision else "DEFAULT"))
    return dots


def _inputs():
    k = jax.random.split(jax.random.key(0), 3)
    h = (3.0 * jax.random.normal(k[0], (N, D))).astype(jnp.bfloat16)
    w = 0.25 * jax.random.normal(k[1], (D, V))
    return h, w, jax.random.randint(k[2], (N,), 0, V)


def _fused_loss(h, w, t):
    weights = jnp.asarray([1.0, 0.5])
    return head_mtp_loss.fp8_mtp_loss(h, w, t, weights, row_len=T, scales=SCALES).sum()


def _plain_loss(h, w, t):
    logits = head.fp8_matmul(h, w, SCALES)
    return (jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, t[:, None], -1)[:, 0]).sum()


@pytest.mark.parametrize("loss", [_fused_loss, _plain_loss], ids=["fused", "plain"])
def test_fp8_backward_gemms_accumulate_in_float32(loss):
    h, w, t = _inputs()
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(h, w, t).as_text()
    dots = _fp8_dots(text)
    forward = [p for ops, p in dots if "f8E5M2" not in ops]  # e4m3 x e4m3: the logits
    backward = [p for ops, p in dots if "f8E5M2" in ops]  # the e5m2 logit gradient times e4m3 x or w
    assert forward == ["DEFAULT"], dots
    assert sorted(backward) == ["HIGHEST", "HIGHEST"], dots


@pytest.mark.gpu
def test_fp8_weight_grad_on_gpu_matches_float32_sums():
    """At a rank's token count (16K), the compiled weight-gradient GEMM stays near the float32 sum of
    the same FP8 products (exact in float32). Hopper's FP8 tensor cores sum each K-chunk at reduced
    precision even with float32 accumulation, so the two are not equal: on an H100 (2026-12-06) the
    error was 1.85e-4 of the largest entry at HIGHEST, flat from K = 4K to 64K, against 1.81e-3 at
    DEFAULT (fast accumulation), which grows with K (1.30e-3 at 4K, 3.52e-3 at 64K)."""
    x8, g8, want = fp8_hlo.weight_grad_operands(16_384)
    got = jax.jit(lambda a, b: head.fp8_weight_grad(a, b, SCALES))(x8, g8)
    err = fp8_hlo.relative_error(got, want * (SCALES.x_scale * SCALES.grad_scale))
    assert err < 5e-4, f"FP8 weight gradient off by {err:.2e} of its scale: fast accumulation?"
