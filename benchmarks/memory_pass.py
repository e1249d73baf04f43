"""Time variants of one memory-bound pass against the first: ms, bandwidth, temp memory, error.

Shared by the benches of single passes (`norm_bench.py`, `logit_grad_bench.py`, `logit_lse_bench.py`,
`qkv_grad_bench.py`): each variant is a jitted function of the same inputs, and the first is the XLA
reference the others are checked against (the largest difference over every output, relative to
that output's largest entry).
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp

from benchmarks.mlp_ce_bench import time_it


def row_tilings(kernel, tilings, **fixed) -> list[tuple[str, object]]:
    """`(name, kernel at one tiling)` for each `(block_rows, block_m, num_warps, num_stages)` of a
    row-sliced pass (the logit kernels); `fixed` holds the other keyword arguments."""
    return [
        (
            f"pallas rows={rows} m={m} warps={warps} stages={stages}",
            functools.partial(
                kernel, block_rows=rows, block_m=m, num_warps=warps, num_stages=stages, **fixed
            ),
        )
        for rows, m, warps, stages in tilings
    ]


@jax.jit
def max_rel_err(got, ref):
    """max |got - ref| / max |ref|, in one fusion: eager ops would write float32 copies of
    [N, V] outputs (13 GB at `simple`'s head) and run an 80 GB card out of memory."""
    ref = ref.astype(jnp.float32)
    return jnp.max(jnp.abs(got.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref))


def compare(
    variants, inputs, moved_bytes: int, json_path: str | None = None, *, flops: int | None = None
) -> list[dict]:
    """Prints one line per `(name, jitted fn)` and returns the rows (also written to `json_path`).

    A variant that fails to build or run (a tiling over the SMEM, say) prints its error and the
    table goes on. With `flops`, each row also gives TFLOP/s (passes that are GEMMs).
    """
    rows, want = [], None
    for name, fn in variants:
        try:
            compiled = fn.lower(*inputs).compile()
            out = compiled(*inputs)
        except Exception as e:  # noqa: BLE001 (keep the rest of the table)
            print(f"{name:40s} failed: {repr(e)[:300]}", flush=True)
            continue
        want = out if want is None else want
        err = max(
            float(max_rel_err(got, ref)) for got, ref in zip(jax.tree.leaves(out), jax.tree.leaves(want))
        )
        ms, ms_min, _ = time_it(compiled, inputs)
        row = {
            "variant": name,
            "ms": ms,
            "ms_min": ms_min,
            "tb_s": moved_bytes / ms / 1e9,
            "temp_gib": compiled.memory_analysis().temp_size_in_bytes / 2**30,
            "max_rel_err_vs_first": err,
        }
        rate = ""
        if flops:
            row["tflops"] = flops / ms / 1e9
            rate = f"  {row['tflops']:6.1f} TFLOP/s"
        rows.append(row)
        print(
            f"{name:40s} {ms:7.3f} ms (min {ms_min:.3f})  {row['tb_s']:5.2f} TB/s{rate}  temp "
            f"{row['temp_gib']:.3f} GiB  err {err:.1e}",
            flush=True,
        )
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    return rows
