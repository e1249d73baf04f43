"""Hopper GEMMs with the ReLU² MLP's epilogues in Mosaic GPU (`plgpu`): wgmma, TMA, warp roles.

The two `[N, F]` GEMMs of `relu2_mlp` whose epilogue carries the activation (N tokens, D the model
width, F the hidden width):

- `up_relu2`: `post = relu(x @ w1 + b1)²`, so the pre-activation never reaches HBM;
- `d_pre`: `2·sqrt(post)·(dy @ w2ᵀ)`, the pre-activation's gradient, so `dy @ w2ᵀ` never reaches
  HBM, with the optional per-tile column sums that give `db1`.

XLA runs each as a cuBLAS GEMM that writes its `[N, F]` product plus an elementwise pass that
reads it back (two HBM round trips of 0.4 GB a 64-sequence micro-batch of `simple`). The Triton
kernels in `relu2_mlp.py` fuse them too, but their GEMMs run well under cuBLAS's speed; these use
Hopper's wgmma and the TMA copy engine.

The kernels are `gemm_mgpu.py`'s persistent GEMM with these epilogues. The epilogue's inputs (the
bias slice, or the `post` tile) are loaded by TMA while the K loop runs; the output tile goes back
through SMEM by TMA, its store overlapping the next tile.

Shapes: N a multiple of `2·tile_m`, F of `tile_n`, D of `tile_k` (`simple`: N = 65,536, D = 768,
F = 3,072). On CPU the kernels run in the Mosaic GPU simulator (`plgpu.InterpretGPUParams`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.gemm_mgpu import (
    CONSUMERS,
    Tiles,
    accumulate,
    consumer_loop,
    launch,
    producer,
    ring_scratch,
    schedule,
    transforms,
)
from pallas_kernels.shapes import out_struct

_F32 = jnp.float32
_TRANSFORMS = transforms(jnp.bfloat16)
_COL = plgpu.Layout.WGMMA.reduce(0)  # one value per column of a WGMMA tile


def _check(n: int, d: int, f: int, tiles: Tiles, dtype) -> None:
    if dtype != jnp.bfloat16:  # the SMEM tiles are 128-byte rows of 64 bf16
        raise ValueError(f"relu2_mgpu: the GEMMs take bf16 activations, got {jnp.dtype(dtype).name}")
    for name in ("tile_m", "tile_n", "tile_k"):
        if getattr(tiles, name) % 64:
            raise ValueError(f"relu2_mgpu: {name} = {getattr(tiles, name)} must be a multiple of 64")
    if tiles.stages < 2:
        raise ValueError(f"relu2_mgpu: stages = {tiles.stages} must be at least 2")
    if n % (CONSUMERS * tiles.tile_m) or f % tiles.tile_n or d % tiles.tile_k:
        raise ValueError(
            f"relu2_mgpu: need N = {n} a multiple of {CONSUMERS * tiles.tile_m}, F = {f} of "
            f"{tiles.tile_n} and D = {d} of {tiles.tile_k}"
        )


@functools.partial(jax.jit, static_argnames=("tiles", "interpret"))
def up_relu2(x_ND, w1_DF, b1_F=None, *, tiles: Tiles = Tiles(), interpret=None):
    """`relu(x @ w1 + b1)²` `[N, F]` in x's dtype; the bias (any float dtype) is added in float32."""
    n, d = x_ND.shape
    f = w1_DF.shape[1]
    _check(n, d, f, tiles, x_ND.dtype)
    sched = schedule(n, d, f, tiles, interpret)
    tm, tn = tiles.tile_m, tiles.tile_n
    has_bias = b1_F is not None

    def kernel(x_ref, w_ref, *refs):
        b_ref, post_ref = (refs[0] if has_bias else None), refs[-1]

        def scoped(ring_smem, out_smem, b_smem, b_loaded):
            pid, wg = lax.axis_index("programs"), lax.axis_index("wg")

            def tile_body(i, mi, ni, first):
                cols = pl.ds(ni * tn, tn)
                if has_bias:
                    plgpu.copy_gmem_to_smem(b_ref.at[cols], b_smem.at[wg], b_loaded.at[wg])
                acc = accumulate(ring_smem, wg=wg, first=first, w_rows_are_n=False, sched=sched)
                if has_bias:
                    plgpu.barrier_wait(b_loaded.at[wg])
                    acc = acc + lax.broadcast_in_dim(plgpu.load(b_smem.at[wg], layout=_COL), acc.shape, [1])
                relu = jnp.maximum(acc, 0.0)
                out = out_smem.at[wg]
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's store has left SMEM
                out[...] = (relu * relu).astype(out.dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out, post_ref.at[pl.ds((mi * CONSUMERS + wg) * tm, tm), cols])

            pl.when(wg < CONSUMERS)(lambda: consumer_loop(pid, sched, tile_body))
            pl.when(wg == CONSUMERS)(
                lambda: producer(x_ref, w_ref, ring_smem, pid=pid, w_rows_are_n=False, sched=sched)
            )

        pl.run_scoped(
            scoped,
            ring_scratch(x_ND, w1_DF, tiles, False),
            plgpu.SMEM((CONSUMERS, tm, tn), x_ND.dtype, transforms=_TRANSFORMS),
            plgpu.SMEM((CONSUMERS, tn), _F32),
            plgpu.Barrier(num_barriers=CONSUMERS),
            collective_axes="wg",
        )

    extra = [b1_F.astype(_F32)] if has_bias else []
    out_shape = out_struct(x_ND, (n, f), x_ND.dtype)
    w1 = w1_DF.astype(x_ND.dtype)
    return launch(
        kernel, x_ND, w1, extra, out_shape=out_shape, sched=sched, interpret=interpret, name="relu2_up_mgpu"
    )


@functools.partial(jax.jit, static_argnames=("column_sum", "tiles", "interpret"))
def d_pre(dy_ND, w2_FD, post_NF, *, column_sum: bool, tiles: Tiles = Tiles(), interpret=None):
    """`(2·sqrt(post)·(dy @ w2ᵀ)` `[N, F]` in post's dtype, its per-tile column sums
    `[N / tile_m, F]` float32 or None)`."""
    n, d = dy_ND.shape
    f = w2_FD.shape[0]
    _check(n, d, f, tiles, dy_ND.dtype)
    if post_NF.shape != (n, f):
        raise ValueError(f"relu2_mgpu.d_pre: post must be [N, F] = {(n, f)}, got {post_NF.shape}")
    sched = schedule(n, d, f, tiles, interpret)
    tm, tn = tiles.tile_m, tiles.tile_n

    def kernel(dy_ref, w_ref, post_ref, dpre_ref, *sum_refs):
        def scoped(ring_smem, io_smem, sum_smem, post_loaded, summed):
            pid, wg = lax.axis_index("programs"), lax.axis_index("wg")

            def column_sums(i, grad, m_tile, cols):
                # The cross-warp reduction has one SMEM scratch per CTA: the consumers take turns,
                # consumer 0 first; `summed` holds one barrier per consumer, "my sums are done".
                @pl.when((wg == 1) | (i > 0))
                def _():
                    plgpu.barrier_wait(summed.at[1 - wg])

                sum_smem.at[wg][...] = grad.sum(axis=0)
                plgpu.barrier_arrive(summed.at[wg])
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(sum_smem.at[wg], sum_refs[0].at[m_tile, cols])

            def tile_body(i, mi, ni, first):
                m_tile = mi * CONSUMERS + wg
                rows, cols = pl.ds(m_tile * tm, tm), pl.ds(ni * tn, tn)
                io = io_smem.at[wg]  # the post tile in, the d_pre tile out
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's stores have left SMEM
                plgpu.copy_gmem_to_smem(post_ref.at[rows, cols], io, post_loaded.at[wg])
                acc = accumulate(ring_smem, wg=wg, first=first, w_rows_are_n=True, sched=sched)
                plgpu.barrier_wait(post_loaded.at[wg])
                grad = 2.0 * jnp.sqrt(plgpu.load(io, layout=plgpu.Layout.WGMMA).astype(_F32)) * acc
                io[...] = grad.astype(io.dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(io, dpre_ref.at[rows, cols])
                if column_sum:
                    column_sums(i, grad, m_tile, cols)

            @pl.when(wg < CONSUMERS)
            def _():
                consumer_loop(pid, sched, tile_body)
                if column_sum:  # consumer 0 takes the last turn's barrier too: every phase is observed

                    @pl.when((wg == 0) & (sched.count(pid) > 0))
                    def _():
                        plgpu.barrier_wait(summed.at[1])

            pl.when(wg == CONSUMERS)(
                lambda: producer(dy_ref, w_ref, ring_smem, pid=pid, w_rows_are_n=True, sched=sched)
            )

        pl.run_scoped(
            scoped,
            ring_scratch(dy_ND, w2_FD, tiles, True),
            plgpu.SMEM((CONSUMERS, tm, tn), post_NF.dtype, transforms=_TRANSFORMS),
            plgpu.SMEM((CONSUMERS, tn), _F32),
            plgpu.Barrier(num_barriers=CONSUMERS),
            plgpu.Barrier(num_barriers=CONSUMERS),
            collective_axes="wg",
        )

    out_shape = [out_struct(dy_ND, (n, f), post_NF.dtype)]
    if column_sum:
        out_shape.append(out_struct(dy_ND, (n // tm, f), _F32))
    w2 = w2_FD.astype(dy_ND.dtype)
    outs = launch(
        kernel,
        dy_ND,
        w2,
        [post_NF],
        out_shape=out_shape,
        sched=sched,
        interpret=interpret,
        name="relu2_dpre_mgpu",
    )
    return outs[0], (outs[1] if column_sum else None)
