"""RMSNorm's backward with the residual stream's gradient: XLA autodiff against the Pallas kernel.

One sublayer's norm as the train step runs it, at `simple`'s micro-batch (64 × 1024 tokens,
width 768, bf16): the previous sublayer's output `y` and its bias `b` join the stream,
`x' = x + (y + b)`, then `(x', rms_norm(x')·gain)`; the backward goes from the stream's gradient
`r` and the norm's output gradient `g` to `r + dx`, `dgain` and `db`. Three forms:

- `xla`: autodiff of all of it (XLA fuses the bias's column sum into its norm backward);
- `pallas, bias by XLA`: the kernel for the norm, the bias added (and summed) by XLA outside it;
- `pallas, bias folded`: the bias added inside the norm's fork, summed by the kernel (the model's
  path with `model.kernels.norm="pallas"`), at several tilings.

Prints ms per call, effective HBM bandwidth over the bytes the fused backward must move (read x,
g, r; write r + dx), the program's temp memory, and the largest difference from the XLA result.

    python benchmarks/norm_bench.py [--n 65536] [--json FILE]
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
from jaxrun.model.layers import add_update, stream_norm
from pallas_kernels.rms_norm_bwd import rms_norm_bwd

D = 768
# (block_rows, chunk_rows, num_warps): a program owns block_rows rows and walks them chunk_rows
# at a time; the kernel's default is (64, 4, 4), the fastest of these on an H100 (docs/PERF.md)
TILINGS = [(16, 16, 4), (8, 8, 4), (32, 4, 4), (64, 4, 4), (64, 8, 4), (128, 4, 4), (128, 8, 4)] + [
    (128, 8, 8),
    (256, 8, 8),
    (256, 16, 8),
]


def step_form(fused_bwd, fold: bool):
    """fwd + bwd of one norm with the bias and output of the sublayer before it."""
    cfg = ModelConfig()

    def forward(x, y, b, gain):
        if fold:
            return stream_norm(x, {"gain": gain}, cfg, fused_bwd, update=(y, b))
        return stream_norm(add_update(x, (y, b)), {"gain": gain}, cfg, fused_bwd)

    def f(x, y, b, gain, r, g):
        _, vjp = jax.vjp(forward, x, y, b, gain)
        return vjp((r, g))

    return jax.jit(f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=65536, help="tokens per micro-batch (a multiple of 1024)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    if args.n <= 0 or args.n % 1024:
        p.error(f"--n must be a positive multiple of 1024, got {args.n}")
    k = jax.random.split(jax.random.key(0), 6)
    shape = (args.n // 1024, 1024, D)
    x, y = ((3 * jax.random.normal(kk, shape)).astype(jnp.bfloat16) for kk in k[:2])
    r, g = (jax.random.normal(kk, shape, jnp.bfloat16) for kk in k[2:4])
    b, gain = 0.1 * jax.random.normal(k[4], (D,)), 1 + 0.1 * jax.random.normal(k[5], (D,))
    inputs = (x, y, b, gain, r, g)
    interpret = jax.default_backend() != "gpu"  # a CPU smoke run: the kernel interpreted
    moved = 4 * args.n * D * 2  # bytes: x, g, r in and r + dx out, bf16

    def kernel(rows=64, chunk=4, warps=4):
        return functools.partial(
            rms_norm_bwd, block_rows=rows, chunk_rows=chunk, num_warps=warps, interpret=interpret
        )

    variants = [("xla", step_form(None, True)), ("pallas, bias by XLA", step_form(kernel(), False))] + [
        (
            f"pallas, bias folded, rows={rows} chunk={chunk} warps={warps}",
            step_form(kernel(rows, chunk, warps), True),
        )
        for rows, chunk, warps in TILINGS
    ]
    print(f"device: {jax.devices()[0].device_kind}, n={args.n}, D={D}, bf16")
    memory_pass.compare(variants, inputs, moved, args.json)


if __name__ == "__main__":
    main()
