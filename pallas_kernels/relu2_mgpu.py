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

Each CTA computes `2·tile_m` rows × `tile_n` columns with three warpgroups: a producer streams the
K slices of x (or dy) and w by TMA into a ring of `stages` SMEM slots; two consumers each own
`tile_m` rows, share the w slice, and accumulate in registers with wgmma. The epilogue's inputs
(the bias slice, or the `post` tile) are loaded by TMA while the K loop runs; the output tile goes
back through SMEM by TMA.

Shapes: N a multiple of `2·tile_m`, F of `tile_n`, D of `tile_k` (`simple`: N = 65,536, D = 768,
F = 3,072). On CPU the kernels run in the Mosaic GPU simulator (`plgpu.InterpretGPUParams`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.attention_mgpu import ring
from pallas_kernels.shapes import out_struct

_F32 = jnp.float32
_CONSUMERS = 2
_TRANSFORMS = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
_COL = plgpu.Layout.WGMMA.reduce(0)  # one value per column of a WGMMA tile


@dataclasses.dataclass(frozen=True, kw_only=True)
class Tiles:
    """Tiling of both kernels.

    Attributes:
      tile_m: rows of one consumer warpgroup's tile (a CTA takes 2·tile_m), a multiple of 64.
      tile_n: columns of F per CTA, a multiple of 64.
      tile_k: the K slice one ring slot holds, a multiple of 64.
      stages: ring slots in SMEM.
    """

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 64
    stages: int = 3


def row_multiple(tiles: Tiles = Tiles()) -> int:
    """N must be a multiple of this: the rows of one CTA."""
    return _CONSUMERS * tiles.tile_m


def _check(n: int, d: int, f: int, tiles: Tiles, dtype) -> None:
    if dtype != jnp.bfloat16:  # the SMEM tiles are 128-byte rows of 64 bf16
        raise ValueError(f"relu2_mgpu: the GEMMs take bf16 activations, got {jnp.dtype(dtype).name}")
    for name in ("tile_m", "tile_n", "tile_k"):
        if getattr(tiles, name) % 64:
            raise ValueError(f"relu2_mgpu: {name} = {getattr(tiles, name)} must be a multiple of 64")
    if tiles.stages < 2:
        raise ValueError(f"relu2_mgpu: stages = {tiles.stages} must be at least 2")
    if n % (_CONSUMERS * tiles.tile_m) or f % tiles.tile_n or d % tiles.tile_k:
        raise ValueError(
            f"relu2_mgpu: need N = {n} a multiple of {_CONSUMERS * tiles.tile_m}, F = {f} of "
            f"{tiles.tile_n} and D = {d} of {tiles.tile_k}"
        )


def _producer(
    a_ref, w_ref, a_smem, w_smem, a_loaded, w_loaded, freed, *, mi, cols, w_rows_are_n, tiles, k_steps
):
    """Streams each K slice: both consumers' rows of `a` and the shared w slice, into the ring."""
    plgpu.set_max_registers(40, action="decrease")
    tm, tk = tiles.tile_m, tiles.tile_k

    def load(j, s):
        ks = pl.ds(j * tk, tk)
        for c in range(_CONSUMERS):
            rows = pl.ds((mi * _CONSUMERS + c) * tm, tm)
            plgpu.copy_gmem_to_smem(a_ref.at[rows, ks], a_smem.at[s, c], a_loaded.at[s * _CONSUMERS + c])
        w_at = w_ref.at[cols, ks] if w_rows_are_n else w_ref.at[ks, cols]
        plgpu.copy_gmem_to_smem(w_at, w_smem.at[s], w_loaded.at[s])

    ring(0, k_steps, tiles.stages, load, (freed,))


def _accumulate(a_smem, w_smem, a_loaded, w_loaded, freed, *, wg, w_rows_are_n, tiles, k_steps):
    """One consumer's `[tile_m, tile_n]` float32 product over every K slice of the ring."""
    stages = tiles.stages

    def mma(acc_ref):
        @pl.loop(0, k_steps)
        def _step(j):
            s = lax.rem(j, jnp.int32(stages))
            plgpu.barrier_wait(a_loaded.at[s * _CONSUMERS + wg])
            plgpu.barrier_wait(w_loaded.at[s])
            plgpu.wgmma(acc_ref, a_smem.at[s, wg], w_smem.at[s].T if w_rows_are_n else w_smem.at[s])
            plgpu.wgmma_wait(1)  # the previous slice's product is done: its slot can be refilled

            @pl.when(j > 0)
            def _():
                plgpu.barrier_arrive(freed.at[lax.rem(j - 1, jnp.int32(stages))])

        plgpu.wgmma_wait(0)
        plgpu.barrier_arrive(freed.at[(k_steps - 1) % stages])
        return acc_ref[...]

    return pl.run_scoped(mma, plgpu.ACC((tiles.tile_m, tiles.tile_n), _F32))


def _launch(kernel, a, w, extra, *, w_rows_are_n, out_shape, tiles, interpret, name):
    n = a.shape[0]
    f = w.shape[0] if w_rows_are_n else w.shape[1]
    return plgpu.kernel(
        kernel,
        out_type=out_shape,
        grid=(f // tiles.tile_n, n // (_CONSUMERS * tiles.tile_m)),
        grid_names=("n_tiles", "m_tiles"),
        num_threads=_CONSUMERS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
        kernel_name=name,
    )(a, w, *extra)


def _ring_scratch(a, w, tiles, w_rows_are_n):
    """SMEM of the K ring and its barriers: a slots, w slots, a loaded, w loaded, freed."""
    tm, tn, tk, stages = tiles.tile_m, tiles.tile_n, tiles.tile_k, tiles.stages
    return (
        plgpu.SMEM((stages, _CONSUMERS, tm, tk), a.dtype, transforms=_TRANSFORMS),
        plgpu.SMEM((stages, *((tn, tk) if w_rows_are_n else (tk, tn))), w.dtype, transforms=_TRANSFORMS),
        plgpu.Barrier(num_barriers=stages * _CONSUMERS),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=stages),
    )


@functools.partial(jax.jit, static_argnames=("tiles", "interpret"))
def up_relu2(x_ND, w1_DF, b1_F=None, *, tiles: Tiles = Tiles(), interpret=None):
    """`relu(x @ w1 + b1)²` `[N, F]` in x's dtype; the bias (any float dtype) is added in float32."""
    n, d = x_ND.shape
    f = w1_DF.shape[1]
    _check(n, d, f, tiles, x_ND.dtype)
    tm, tn = tiles.tile_m, tiles.tile_n
    has_bias = b1_F is not None
    k_steps = d // tiles.tile_k

    def kernel(x_ref, w_ref, *refs):
        b_ref = refs[0] if has_bias else None
        post_ref = refs[-1]

        def scoped(ring_smem, out_smem, b_smem, b_loaded):
            a_smem, w_smem, a_loaded, w_loaded, freed = ring_smem
            ni, mi, wg = lax.axis_index("n_tiles"), lax.axis_index("m_tiles"), lax.axis_index("wg")
            cols = pl.ds(ni * tn, tn)

            @pl.when(wg < _CONSUMERS)
            def _consumer():
                plgpu.set_max_registers(232, action="increase")
                if has_bias:
                    plgpu.copy_gmem_to_smem(b_ref.at[cols], b_smem.at[wg], b_loaded.at[wg])
                acc = _accumulate(
                    a_smem,
                    w_smem,
                    a_loaded,
                    w_loaded,
                    freed,
                    wg=wg,
                    w_rows_are_n=False,
                    tiles=tiles,
                    k_steps=k_steps,
                )
                if has_bias:
                    plgpu.barrier_wait(b_loaded.at[wg])
                    acc = acc + lax.broadcast_in_dim(
                        plgpu.load(b_smem.at[wg], layout=_COL), acc.shape, [1]
                    )
                relu = jnp.maximum(acc, 0.0)
                out = out_smem.at[wg]
                out[...] = (relu * relu).astype(out.dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out, post_ref.at[pl.ds((mi * _CONSUMERS + wg) * tm, tm), cols])
                plgpu.wait_smem_to_gmem(0)

            @pl.when(wg == _CONSUMERS)
            def _():
                _producer(
                    x_ref,
                    w_ref,
                    a_smem,
                    w_smem,
                    a_loaded,
                    w_loaded,
                    freed,
                    mi=mi,
                    cols=cols,
                    w_rows_are_n=False,
                    tiles=tiles,
                    k_steps=k_steps,
                )

        pl.run_scoped(
            scoped,
            _ring_scratch(x_ND, w1_DF, tiles, False),
            plgpu.SMEM((_CONSUMERS, tm, tn), x_ND.dtype, transforms=_TRANSFORMS),
            plgpu.SMEM((_CONSUMERS, tn), _F32),
            plgpu.Barrier(num_barriers=_CONSUMERS),
            collective_axes="wg",
        )

    extra = [b1_F.astype(_F32)] if has_bias else []
    return _launch(
        kernel,
        x_ND,
        w1_DF.astype(x_ND.dtype),
        extra,
        w_rows_are_n=False,
        out_shape=out_struct(x_ND, (n, f), x_ND.dtype),
        tiles=tiles,
        interpret=interpret,
        name="relu2_up_mgpu",
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
    tm, tn = tiles.tile_m, tiles.tile_n
    k_steps = d // tiles.tile_k

    def kernel(dy_ref, w_ref, post_ref, dpre_ref, *sum_refs):
        def scoped(ring_smem, io_smem, sum_smem, post_loaded, turn):
            a_smem, w_smem, a_loaded, w_loaded, freed = ring_smem
            ni, mi, wg = lax.axis_index("n_tiles"), lax.axis_index("m_tiles"), lax.axis_index("wg")
            cols = pl.ds(ni * tn, tn)

            @pl.when(wg < _CONSUMERS)
            def _consumer():
                plgpu.set_max_registers(232, action="increase")
                m_tile = mi * _CONSUMERS + wg
                rows = pl.ds(m_tile * tm, tm)
                io = io_smem.at[wg]  # the post tile in, the d_pre tile out
                plgpu.copy_gmem_to_smem(post_ref.at[rows, cols], io, post_loaded.at[wg])
                acc = _accumulate(
                    a_smem,
                    w_smem,
                    a_loaded,
                    w_loaded,
                    freed,
                    wg=wg,
                    w_rows_are_n=True,
                    tiles=tiles,
                    k_steps=k_steps,
                )
                plgpu.barrier_wait(post_loaded.at[wg])
                post = plgpu.load(io, layout=plgpu.Layout.WGMMA).astype(_F32)
                grad = 2.0 * jnp.sqrt(post) * acc
                io[...] = grad.astype(io.dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(io, dpre_ref.at[rows, cols])
                if column_sum:
                    # the cross-warp reduction uses one SMEM scratch for the CTA: one consumer at a time
                    @pl.when(wg == 1)
                    def _():
                        plgpu.barrier_wait(turn)

                    sum_smem.at[wg][...] = grad.sum(axis=0)

                    @pl.when(wg == 0)
                    def _():
                        plgpu.barrier_arrive(turn)

                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(sum_smem.at[wg], sum_refs[0].at[m_tile, cols])
                plgpu.wait_smem_to_gmem(0)

            @pl.when(wg == _CONSUMERS)
            def _():
                _producer(
                    dy_ref,
                    w_ref,
                    a_smem,
                    w_smem,
                    a_loaded,
                    w_loaded,
                    freed,
                    mi=mi,
                    cols=cols,
                    w_rows_are_n=True,
                    tiles=tiles,
                    k_steps=k_steps,
                )

        pl.run_scoped(
            scoped,
            _ring_scratch(dy_ND, w2_FD, tiles, True),
            plgpu.SMEM((_CONSUMERS, tm, tn), post_NF.dtype, transforms=_TRANSFORMS),
            plgpu.SMEM((_CONSUMERS, tn), _F32),
            plgpu.Barrier(num_barriers=_CONSUMERS),
            plgpu.Barrier(),
            collective_axes="wg",
        )

    out_shape = [out_struct(dy_ND, (n, f), post_NF.dtype)]
    if column_sum:
        out_shape.append(out_struct(dy_ND, (n // tm, f), _F32))
    outs = _launch(
        kernel,
        dy_ND,
        w2_FD.astype(dy_ND.dtype),
        [post_NF],
        w_rows_are_n=True,
        out_shape=out_shape,
        tiles=tiles,
        interpret=interpret,
        name="relu2_dpre_mgpu",
    )
    return outs[0], (outs[1] if column_sum else None)
