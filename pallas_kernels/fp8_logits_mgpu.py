"""Record #77's FP8 head logits on Hopper: e4m3 × e4m3 in wgmma, rescaled in float32, stored as bf16.

The record's forward head GEMM is `torch._scaled_mm(x8, w8, scale_a, scale_b, out_dtype=bf16)`:
`logits = bf16(scale · Σ_k x8[n, k]·w8[v, k])`, the scale applied to the float32 sums before the
one rounding. XLA's cuBLASLt FP8 GEMM writes bf16 only where the dequantizing scales are bf16 or the
sums are rounded before the scale (docs/PERF.md, "the forward GEMM written four ways"), so jaxrun's
XLA path writes float32 logits: 9.9 GB at record #77's 49,152 × 50,304, which the loss pass then
reads. This kernel applies the exact float32 scale in its epilogue and writes the bf16 logits (half
the bytes), as the record does. Like the record's fast-accumulating `_scaled_mm`, wgmma sums K in the
tensor core below float32 precision: on an H100, 11.6% of the logits land one bf16 step from the
exactly rounded float32 sums (docs/PERF.md).

It is `gemm_mgpu.py`'s persistent GEMM over `x8 [N, K]` and `w8 [V, K]` (both K-major, as FP8
wgmma needs): each consumer's `[tile_m, tile_n]` float32 tile is scaled, rounded to bf16 and stored
through SMEM by TMA. Shapes: N a multiple of `2·tile_m`, V of `tile_n`, K of `tile_k` (record #77:
N = 16,384 to 49,152 a micro-batch, K = 768, V = 50,304 = 393 · 128). On CPU it runs in the Mosaic
GPU simulator (`plgpu.InterpretGPUParams`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import gemm_mgpu as gemm
from pallas_kernels.shapes import out_struct

_FP8 = (jnp.float8_e4m3fn, jnp.float8_e5m2)
# 128-byte K slices of FP8. At 49,152 × 768 × 50,304 on an H100 (2026-12-07): 4.33 ms, against
# 4.54 ms at 128 × 128 × 128 with 3 stages and 4.67 at 64 × 128 × 128 with 4 (docs/PERF.md).
TILES = gemm.Tiles(tile_m=64, tile_n=192, tile_k=128, stages=4)
SMEM_BYTES = 227 * 1024  # a Hopper CTA's shared memory


def smem_bytes(tiles: gemm.Tiles) -> int:
    """Shared memory of one CTA: the ring's FP8 slots (both consumers' x rows, one w slice) and
    both consumers' bf16 output tiles."""
    tm, tn, tk = tiles.tile_m, tiles.tile_n, tiles.tile_k
    return tiles.stages * (gemm.CONSUMERS * tm + tn) * tk + gemm.CONSUMERS * tm * tn * 2


def _check(x8_NK, w8_VK, tiles: gemm.Tiles) -> None:
    (n, k), (v, k2) = x8_NK.shape, w8_VK.shape
    if x8_NK.dtype not in _FP8 or w8_VK.dtype not in _FP8:
        raise ValueError(
            f"fp8_logits_mgpu: x and w must be float8 (e4m3 or e5m2), got {x8_NK.dtype} and {w8_VK.dtype}"
        )
    if k != k2:
        raise ValueError(
            f"fp8_logits_mgpu: x [N, K] and w [V, K] share K, got {x8_NK.shape} and {w8_VK.shape}"
        )
    if tiles.tile_k % 128 or tiles.tile_m % 64 or tiles.tile_n % 64 or tiles.stages < 2:
        raise ValueError(
            f"fp8_logits_mgpu: tile_k must be a multiple of 128 (a 128-byte FP8 row), tile_m and tile_n "
            f"of 64, stages at least 2; got {tiles}"
        )
    if smem_bytes(tiles) > SMEM_BYTES:
        raise ValueError(
            f"fp8_logits_mgpu: {tiles} needs {smem_bytes(tiles) // 1024} KB of shared memory, over "
            f"Hopper's {SMEM_BYTES // 1024} KB: fewer stages or smaller tiles"
        )
    if n % (gemm.CONSUMERS * tiles.tile_m) or v % tiles.tile_n or k % tiles.tile_k:
        raise ValueError(
            f"fp8_logits_mgpu: need N = {n} a multiple of {gemm.CONSUMERS * tiles.tile_m}, V = {v} of "
            f"{tiles.tile_n} and K = {k} of {tiles.tile_k}"
        )


@functools.partial(jax.jit, static_argnames=("scale", "tiles", "interpret"))
def fp8_logits(x8_NK, w8_VK, *, scale: float, tiles: gemm.Tiles = TILES, interpret=None) -> jax.Array:
    """`bf16(scale · x8 @ w8ᵀ)` [N, V]: wgmma's sums, times the float32 `scale`, rounded once."""
    _check(x8_NK, w8_VK, tiles)
    n, k = x8_NK.shape
    v = w8_VK.shape[0]
    sched = gemm.schedule(n, k, v, tiles, interpret)
    tm, tn = tiles.tile_m, tiles.tile_n
    scale32 = np.float32(scale)  # a literal in the kernel, rounded to float32 as the record's scale

    def kernel(x_ref, w_ref, out_ref):
        def scoped(ring_smem, out_smem):
            pid, wg = lax.axis_index("programs"), lax.axis_index("wg")

            def tile_body(i, mi, ni, first):
                acc = gemm.accumulate(ring_smem, wg=wg, first=first, w_rows_are_n=True, sched=sched)
                out = out_smem.at[wg]
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's store has left SMEM
                out[...] = (acc * scale32).astype(out.dtype)
                plgpu.commit_smem()
                rows = pl.ds((mi * gemm.CONSUMERS + wg) * tm, tm)
                plgpu.copy_smem_to_gmem(out, out_ref.at[rows, pl.ds(ni * tn, tn)])

            pl.when(wg < gemm.CONSUMERS)(lambda: gemm.consumer_loop(pid, sched, tile_body))
            pl.when(wg == gemm.CONSUMERS)(
                lambda: gemm.producer(x_ref, w_ref, ring_smem, pid=pid, w_rows_are_n=True, sched=sched)
            )

        pl.run_scoped(
            scoped,
            gemm.ring_scratch(x8_NK, w8_VK, tiles, True),
            plgpu.SMEM((gemm.CONSUMERS, tm, tn), jnp.bfloat16, transforms=gemm.transforms(jnp.bfloat16)),
            collective_axes="wg",
        )

    out_shape = out_struct(x8_NK, (n, v), jnp.bfloat16)
    return gemm.launch(
        kernel,
        x8_NK,
        w8_VK,
        [],
        out_shape=out_shape,
        sched=sched,
        interpret=interpret,
        name="fp8_logits_mgpu",
    )
