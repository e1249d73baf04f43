"""The head's backward pass over the logits: XLA's two passes against the Pallas kernel.

At `simple`'s micro-batch (65,536 tokens × V = 50,304, bf16 raw logits, 'isru' cap, a bias):
from the saved raw logits, the log-sum-exp and each row's loss gradient to bf16 `dL/dz` and the
bias's column sum. XLA writes `dz` in one fusion and reads it back for the sum (the path
`model.kernels.logit_grad="xla"` runs, `jaxrun.model.head_loss`); the kernel does both in one
pass, at several tilings. Prints ms per call, HBM bandwidth over the bytes one pass must move
(read the logits, write dz), temp memory and the largest difference from XLA.

    python benchmarks/logit_grad_bench.py [--n 65536] [--json FILE]
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
from pallas_kernels.logit_grad import logit_grad

V, CAP, C = 50304, "isru", 15.0
# (block_rows, block_m, num_warps, num_stages); the kernel's default, (1024, 16, 8, 3), was the fastest
# on an H100 (docs/PERF.md). Triton tiles are powers of two and 50,304 = 393 · 128, so block_v stays
# 128 at this vocabulary.
TILINGS = [(1024, m, warps, stages) for m in (16, 32, 64) for warps in (4, 8) for stages in (1, 2, 3)]
TILINGS += [(256, 32, 4, 1), (256, 32, 8, 2)]


def xla_pass(zraw, b, targets, lse, g):
    """head_loss's XLA backward pass over the logits, up to the GEMMs (the same ops and barrier)."""
    z = head_loss._add_bias(zraw, b)
    s, ds_dz = head_loss._cap(z.astype(jnp.float32), CAP, C)
    p = jnp.exp(s - lse[:, None])
    is_target = jax.lax.broadcasted_iota(jnp.int32, z.shape, 1) == targets[:, None]
    dz = jax.lax.optimization_barrier(
        ((jnp.where(is_target, p - 1.0, p) * ds_dz) * g[:, None]).astype(zraw.dtype)
    )
    return dz, jnp.sum(dz.astype(jnp.float32), axis=0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=65536, help="tokens per micro-batch")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    k = jax.random.split(jax.random.key(0), 4)
    zraw = (4 * jax.random.normal(k[0], (args.n, V))).astype(jnp.bfloat16)
    b = 0.5 * jax.random.normal(k[1], (V,))
    targets = jax.random.randint(k[2], (args.n,), 0, V)
    lse = jax.jit(
        lambda z: jax.nn.logsumexp(
            head_loss._cap(head_loss._add_bias(z, b).astype(jnp.float32), CAP, C)[0], axis=1
        )
    )(zraw)
    g = jax.random.uniform(k[3], (args.n,))
    inputs = (zraw, b, targets, lse, g)
    interpret = jax.default_backend() != "gpu"  # a CPU smoke run: the kernel interpreted
    moved = 2 * args.n * V * 2  # bytes: read the bf16 logits, write bf16 dz
    variants = [("xla: dz fusion + column sum", xla_pass)] + memory_pass.row_tilings(
        logit_grad, TILINGS, cap=CAP, cap_value=C, interpret=interpret
    )
    print(f"device: {jax.devices()[0].device_kind}, n={args.n}, V={V}, bf16, cap {CAP}")
    memory_pass.compare([(name, jax.jit(fn)) for name, fn in variants], inputs, moved, args.json)


if __name__ == "__main__":
    main()
