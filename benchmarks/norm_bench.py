"""RMSNorm's backward with the residual stream's gradient: XLA autodiff against the Pallas kernel.

One sublayer's norm as the train step runs it, at `simple`'s micro-batch (64 × 1024 tokens,
width 768, bf16): the forward `(x, rms_norm(x)·gain)`, then the backward from the stream's
gradient `r` and the norm's output gradient `g` to `r + dx` and `dgain`, plus the column sum of
`r` that is the bias gradient of the linear above (XLA fuses it into its backward fusion; beside
the kernel it is a reduction of its own). Prints ms per call, effective HBM bandwidth over the
bytes the fused backward must move (read x, g, r; write r + dx), the program's temp memory, and
the largest difference from the XLA result.

    python benchmarks/norm_bench.py [--n 65536] [--json FILE]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.mlp_ce_bench import time_it
from jaxrun.config import ModelConfig
from jaxrun.model.layers import stream_norm
from pallas_kernels.rms_norm_bwd import rms_norm_bwd

D = 768
TILINGS = [(rows, warps) for rows in (8, 16, 32, 64) for warps in (2, 4, 8)]


def step_form(fused_bwd):
    """fwd + bwd of one norm and its stream, and the bias gradient of the linear above."""
    cfg = ModelConfig()

    def f(x, gain, r, g):
        _, vjp = jax.vjp(lambda x, gain: stream_norm(x, {"gain": gain}, cfg, fused_bwd), x, gain)
        dx, dgain = vjp((r, g))
        return dx, dgain, jnp.sum(r, axis=(0, 1))

    return jax.jit(f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=65536, help="tokens per micro-batch (a multiple of 1024)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    k = jax.random.split(jax.random.key(0), 4)
    shape = (args.n // 1024, 1024, D)
    x = (3 * jax.random.normal(k[0], shape)).astype(jnp.bfloat16)
    r, g = (jax.random.normal(kk, shape, jnp.bfloat16) for kk in k[1:3])
    gain = 1 + 0.1 * jax.random.normal(k[3], (D,))
    inputs = (x, gain, r, g)
    interpret = jax.default_backend() != "gpu"  # a CPU smoke run: the kernel interpreted
    moved = 4 * args.n * D * 2  # bytes: x, g, r in and r + dx out, bf16
    variants = [("xla", None)] + [
        (
            f"pallas rows={rows} warps={warps}",
            functools.partial(rms_norm_bwd, block_rows=rows, num_warps=warps, interpret=interpret),
        )
        for rows, warps in TILINGS
    ]
    print(f"device: {jax.devices()[0].device_kind}, n={args.n}, D={D}, bf16")
    rows, want = [], None
    for name, fused_bwd in variants:
        compiled = step_form(fused_bwd).lower(*inputs).compile()
        out = compiled(*inputs)
        want = out if want is None else want
        err = max(
            float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))) / jnp.max(jnp.abs(b)))
            for a, b in zip(out, want)
        )
        ms, ms_min, _ = time_it(compiled, inputs)
        row = {
            "variant": name,
            "ms": ms,
            "ms_min": ms_min,
            "tb_s": moved / ms / 1e9,
            "temp_gib": compiled.memory_analysis().temp_size_in_bytes / 2**30,
            "max_rel_err_vs_xla": err,
        }
        rows.append(row)
        print(
            f"{name:28s} {ms:7.3f} ms (min {ms_min:.3f})  {row['tb_s']:5.2f} TB/s  temp "
            f"{row['temp_gib']:.3f} GiB  err {err:.1e}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
