"""The ReLU² MLP's two epilogue GEMMs: XLA (cuBLAS GEMM + a fusion) against the Mosaic GPU kernels.

At `simple`'s micro-batch (N = 65,536 tokens, D = 768, F = 3,072, bf16, biases):

- up: `relu(x @ w1 + b1)²`. XLA writes `x @ w1` and a fusion reads it back for the bias and ReLU²;
  `relu2_mgpu.up_relu2` applies them in the GEMM's epilogue.
- d_pre: `2·sqrt(post)·(dy @ w2ᵀ)` and the bias gradient's column sums. XLA writes `dy @ w2ᵀ`
  and a fusion reads it back with `post`; `relu2_mgpu.d_pre` reads `post` in its epilogue.
  `d_pre_no_sums` is the same without the column sums (a MLP without biases, record77's), so the
  two rows price the sums.
- gemm: `x @ w1` alone, cuBLAS: the floor both epilogue kernels aim at.

Each kernel runs at several tilings. Prints ms per call (median of 15 batches of 5), the bandwidth
over the bytes one pass must move, TFLOP/s of the GEMM, temp memory and the largest difference from
XLA relative to its largest entry (`memory_pass.compare`). On a
CPU the kernels run in the Mosaic GPU simulator at `--n 256 --d 64 --f 256` (a smoke run).

    python benchmarks/relu2_mgpu_bench.py [--n 65536] [--json FILE]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks import memory_pass
from pallas_kernels import relu2_mgpu

# (tile_m, tile_n, tile_k, stages): the default first
TILINGS = [(128, 128, 64, 3), (128, 128, 64, 2), (64, 128, 64, 4), (64, 256, 64, 3), (128, 64, 64, 4)]


def xla_up(x, w1, b1):
    pre = jnp.dot(x, w1, preferred_element_type=jnp.float32).astype(x.dtype) + b1.astype(x.dtype)[None, :]
    return jnp.square(jnp.maximum(pre, 0))


def xla_d_pre(dy, w2, post):
    d_post = jnp.dot(dy, w2.T, preferred_element_type=jnp.float32).astype(dy.dtype)
    grad = 2 * jnp.sqrt(post.astype(jnp.float32)) * d_post.astype(jnp.float32)
    return grad.astype(post.dtype), jnp.sum(grad, axis=0)


def xla_d_pre_no_sums(dy, w2, post):
    return xla_d_pre(dy, w2, post)[0]


def xla_gemm(x, w1):
    """The up-projection's GEMM alone (cuBLAS), bf16 out: the floor the epilogue kernels aim at."""
    return jnp.dot(x, w1, preferred_element_type=jnp.float32).astype(x.dtype)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=65536, help="tokens per micro-batch")
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--f", type=int, default=3072)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    sim = None if on_gpu else plgpu.InterpretGPUParams()
    k = jax.random.split(jax.random.key(0), 5)
    n, d, f = args.n, args.d, args.f
    x = jax.random.normal(k[0], (n, d), jnp.bfloat16)
    w1 = (jax.random.normal(k[1], (d, f)) / d**0.5).astype(jnp.bfloat16)
    b1 = 0.1 * jax.random.normal(k[2], (f,))
    dy = jax.random.normal(k[3], (n, d), jnp.bfloat16)
    w2 = (jax.random.normal(k[4], (f, d)) / f**0.5).astype(jnp.bfloat16)
    post = jax.jit(xla_up)(x, w1, b1)
    flops = 2 * n * d * f
    tilings = TILINGS if on_gpu else TILINGS[:1]

    def up_at(tiles):
        return functools.partial(relu2_mgpu.up_relu2, tiles=tiles, interpret=sim)

    def d_pre_at(tiles, column_sum=True):
        def run(dy, w2, post):
            grad, sums = relu2_mgpu.d_pre(dy, w2, post, column_sum=column_sum, tiles=tiles, interpret=sim)
            return (grad, sums.sum(axis=0)) if column_sum else grad

        return run

    # bytes one pass must move: the GEMM's operands, the epilogue's input, the output
    # (the GEMM alone has no kernel variant: it is the floor)
    cases = {
        "gemm": (xla_gemm, (x, w1), 2 * (n * d + d * f + n * f), None),
        "up": (xla_up, (x, w1, b1), 2 * (n * d + d * f + n * f), up_at),
        "d_pre": (xla_d_pre, (dy, w2, post), 2 * (n * d + d * f + 2 * n * f), d_pre_at),
        "d_pre_no_sums": (
            xla_d_pre_no_sums,
            (dy, w2, post),
            2 * (n * d + d * f + 2 * n * f),
            functools.partial(d_pre_at, column_sum=False),
        ),
    }
    print(f"device: {jax.devices()[0].device_kind}, N={n} D={d} F={f}, bf16", flush=True)
    rows = []
    for case, (ref_fn, inputs, moved, kernel_at) in cases.items():
        variants = [(f"{case} xla", ref_fn)] + [
            (
                f"{case} mosaic m={tm} n={tn} k={tk} st={st}",
                kernel_at(relu2_mgpu.Tiles(tile_m=tm, tile_n=tn, tile_k=tk, stages=st)),
            )
            for tm, tn, tk, st in (tilings if kernel_at else ())
        ]
        rows += [
            {"case": case} | row
            for row in memory_pass.compare(
                [(name, jax.jit(fn)) for name, fn in variants], inputs, moved, flops=flops
            )
        ]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
