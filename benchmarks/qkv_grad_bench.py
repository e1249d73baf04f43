"""The q/k/v projections' backward: autodiff in XLA against the one-pass Pallas kernel.

At `simple`'s micro-batch (64 × 1024 tokens, 6 heads of 128, biases, QK-norm, 'halves' RoPE):
from the attention's gradients dq', dk', dv to dL/dh and the weights' and biases' gradients.
Autodiff runs the norms' backward as a reduction fusion and a fusion per dq and dk, three bias
reductions, three GEMMs for dh and a fusion that adds them (the path `model.kernels.qkv="xla"`
runs); the kernel writes [dq | dk | dv] and the bias sums in one pass, then one GEMM per gradient
(`jaxrun/model/qkv.py`), at several tilings. Prints ms per call (GEMMs included), the bandwidth
the kernel's pass alone would need at that time (read dq', dk', dv, q, k; write dqkv), temp
memory and the largest difference from XLA.

    python benchmarks/qkv_grad_bench.py [--batch 64] [--json FILE]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks import memory_pass
from jaxrun.config import ModelConfig
from jaxrun.model import attention, qkv
from jaxrun.model.layers import linear, rms_norm
from pallas_kernels.qkv_grad import qkv_grad

T, HEADS, K = 1024, 6, 128
# (block_rows, chunk_rows, num_warps, num_stages); the kernel's default is (128, 16, 8, 1), which
# tied (64, 8, 4, 1) on an H100 within run-to-run noise (docs/PERF.md)
TILINGS = [(16, 8, 4, 1), (32, 8, 4, 1), (64, 8, 4, 1), (64, 16, 4, 1), (128, 8, 4, 1), (128, 16, 8, 1)]
TILINGS += [(64, 8, 4, 2), (64, 8, 8, 2), (128, 8, 4, 2), (128, 8, 4, 3)]


def plain(p, h, cos, sin):
    """The attention's projections as `model.kernels.qkv="xla"` runs them."""
    B = h.shape[0]
    q, k, v = (linear(h, p, f"w_{n}", f"b_{n}").reshape(B, T, HEADS, K) for n in qkv.NAMES)
    q, k = rms_norm(q), rms_norm(k)
    return qkv.rotate_halves(q, cos, sin), qkv.rotate_halves(k, cos, sin), v


def backward(forward):
    def f(p, h, cos, sin, cotangents):
        _, vjp = jax.vjp(lambda p, h: forward(p, h, cos, sin), p, h)
        return vjp(cotangents)

    return jax.jit(f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64, help="sequences of 1024 tokens per micro-batch")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    if args.batch <= 0:
        p.error(f"--batch must be positive, got {args.batch}")
    d, f = HEADS * K, HEADS * K
    keys = iter(jax.random.split(jax.random.key(0), 12))
    params = {f"w_{n}": jax.random.normal(next(keys), (d, f)) / d**0.5 for n in qkv.NAMES}
    params |= {f"b_{n}": 0.1 * jax.random.normal(next(keys), (f,)) for n in qkv.NAMES}
    h = jax.random.normal(next(keys), (args.batch, T, d)).astype(jnp.bfloat16)
    cos, sin = attention.rotary_tables(ModelConfig(), T)
    cotangents = tuple(
        jax.random.normal(next(keys), (args.batch, T, HEADS, K)).astype(jnp.bfloat16) for _ in range(3)
    )
    interpret = jax.default_backend() != "gpu"  # a CPU smoke run: the kernel interpreted

    def fused(rows, chunk, warps, stages):
        grad = functools.partial(
            qkv_grad,
            block_rows=rows,
            chunk_rows=chunk,
            num_warps=warps,
            num_stages=stages,
            interpret=interpret,
        )
        return lambda p, h, cos, sin: qkv.project(p, h, cos, sin, HEADS, grad)

    variants = [("xla: autodiff", backward(plain))] + [
        (
            f"pallas rows={rows} chunk={chunk} warps={warps} stages={stages}",
            backward(fused(rows, chunk, warps, stages)),
        )
        for rows, chunk, warps, stages in TILINGS
    ]
    moved = 8 * args.batch * T * f * 2  # bytes of the kernel's pass: 5 [N, F] reads, a [N, 3F] write
    print(f"device: {jax.devices()[0].device_kind}, tokens={args.batch * T}, {HEADS}x{K} heads, bf16")
    memory_pass.compare(variants, (params, h, cos, sin, cotangents), moved, args.json)


if __name__ == "__main__":
    main()
