"""The head's forward log-sum-exp over the logits: XLA's reduction against the Pallas kernel.

At `simple`'s micro-batch (65,536 tokens × V = 50,304, bf16 raw logits, 'isru' cap, a bias): from
the saved raw logits `h·W` to each row's `lse = c + log Σ exp(cap(z) − c)`. XLA runs it as one
reduction fusion (the path `jaxrun.model.head_loss` runs, about 1.7 TB/s on an H100); the kernel
writes per-column-block partial sums that XLA adds, at several tilings. Prints ms per call, HBM
bandwidth over the bytes one pass must move (read the logits once), temp memory and the largest
difference from XLA. The kernel rounds `zraw + b` to bf16 as `head_loss` specifies; inside a fusion
XLA may keep that sum in float32 (its excess-precision rewrite does on the CPU: 5e-5 relative at
--n 256), which shows in that difference.

    python benchmarks/logit_lse_bench.py [--n 65536] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks import memory_pass
from jaxrun.model import head_loss
from pallas_kernels.logit_lse import logit_lse

V, CAP, C = 50304, "isru", 15.0
# (block_rows, block_m, num_warps, num_stages); the kernel's default, DEFAULT, was the fastest on an H100
# (docs/PERF.md). block_v stays 128: Triton tiles are powers of two and 50,304 = 393 · 128.
TILINGS = [(rows, m, warps, 1) for rows in (256, 1024) for m in (16, 32, 64) for warps in (4, 8)]
TILINGS += [(1024, m, warps, stages) for m in (16, 32, 64) for warps in (4, 8) for stages in (2, 3)]
DEFAULT = (1024, 32, 8, 1)


def xla_lse(zraw, b):
    """head_loss._forward's log-sum-exp: the bias added in bf16, the cap in float32, the fixed shift c."""
    s, _ = head_loss._cap(head_loss._add_bias(zraw, b).astype(jnp.float32), CAP, C)
    return C + jnp.log(jnp.sum(jnp.exp(s - C), axis=-1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=65536, help="tokens per micro-batch")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    k = jax.random.split(jax.random.key(0))
    zraw = jax.jit(lambda k: (4 * jax.random.normal(k, (args.n, V))).astype(jnp.bfloat16))(k[0])
    b = 0.5 * jax.random.normal(k[1], (V,))
    interpret = jax.default_backend() != "gpu"  # a CPU smoke run: the kernel interpreted
    # Interpreted, one tiling takes about a minute at --n 256; the smoke run needs only one.
    tilings = TILINGS if not interpret else [DEFAULT]
    moved = args.n * V * 2  # bytes: read the bf16 logits once
    variants = [("xla: lse reduction", xla_lse)] + memory_pass.row_tilings(
        logit_lse, tilings, cap=CAP, cap_value=C, interpret=interpret
    )
    print(f"device: {jax.devices()[0].device_kind}, n={args.n}, V={V}, bf16, cap {CAP}")
    memory_pass.compare([(name, jax.jit(fn)) for name, fn in variants], (zraw, b), moved, args.json)


if __name__ == "__main__":
    main()
