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

The kernels are persistent: one CTA per SM walks output tiles of `2·tile_m` rows × `tile_n`
columns with three warpgroups. A producer streams the K slices of x (or dy) and w by TMA into a
ring of `stages` SMEM slots, running on into the next tile while the consumers finish the last;
two consumers each own `tile_m` rows of a tile, share its w slice, and accumulate in registers with
wgmma. The epilogue's inputs (the bias slice, or the `post` tile) are loaded by TMA while the K
loop runs; the output tile goes back through SMEM by TMA, its store overlapping the next tile.

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
from pallas_kernels.shapes import out_struct, vary_like

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


@dataclasses.dataclass(frozen=True)
class _Schedule:
    """The persistent grid: `programs` CTAs walk the `[N / (2·tile_m), F / tile_n]` tiles in row-major
    order, CTA p taking tiles p, p + programs, ... (consecutive CTAs share the rows of `a`)."""

    tiles: Tiles
    k_steps: int
    col_tiles: int
    total: int
    programs: int

    def count(self, pid):
        """How many tiles CTA `pid` takes."""
        return (self.total - pid + self.programs - 1) // self.programs

    def tile(self, pid, i):
        """`(row tile of the CTA, column tile)` of CTA `pid`'s i-th tile."""
        t = pid + i * self.programs
        return t // self.col_tiles, t % self.col_tiles


def _schedule(n: int, d: int, f: int, tiles: Tiles, interpret) -> _Schedule:
    total = (n // (_CONSUMERS * tiles.tile_m)) * (f // tiles.tile_n)
    # one CTA per SM on a GPU; in the simulator, a few, so each walks several tiles
    sms = 5 if interpret is not None else jax.devices()[0].core_count
    return _Schedule(tiles, d // tiles.tile_k, f // tiles.tile_n, total, min(total, sms))


def _producer(a_ref, w_ref, ring_smem, *, pid, w_rows_are_n, sched):
    """Streams every K slice of every tile of this CTA, in order: both consumers' rows of `a` and
    the shared w slice, into the ring (it runs ahead into the next tile while the consumers finish)."""
    plgpu.set_max_registers(40, action="decrease")
    a_smem, w_smem, a_loaded, w_loaded, freed = ring_smem
    tm, tn, tk = sched.tiles.tile_m, sched.tiles.tile_n, sched.tiles.tile_k

    def load(g, s):
        mi, ni = sched.tile(pid, g // sched.k_steps)
        ks, cols = pl.ds(lax.rem(g, sched.k_steps) * tk, tk), pl.ds(ni * tn, tn)
        for c in range(_CONSUMERS):
            rows = pl.ds((mi * _CONSUMERS + c) * tm, tm)
            plgpu.copy_gmem_to_smem(a_ref.at[rows, ks], a_smem.at[s, c], a_loaded.at[s * _CONSUMERS + c])
        w_at = w_ref.at[cols, ks] if w_rows_are_n else w_ref.at[ks, cols]
        plgpu.copy_gmem_to_smem(w_at, w_smem.at[s], w_loaded.at[s])

    ring(0, sched.count(pid) * sched.k_steps, sched.tiles.stages, load, (freed,))


def _accumulate(ring_smem, *, wg, first, w_rows_are_n, sched):
    """One consumer's `[tile_m, tile_n]` float32 product over one tile's K slices, the ring's
    steps `first`.. (the ring runs on across tiles)."""
    a_smem, w_smem, a_loaded, w_loaded, freed = ring_smem
    stages = sched.tiles.stages

    def slot(g):
        return lax.rem(g, jnp.int32(stages))

    def mma(acc_ref):
        @pl.loop(0, sched.k_steps)
        def _step(j):
            s = slot(first + j)
            plgpu.barrier_wait(a_loaded.at[s * _CONSUMERS + wg])
            plgpu.barrier_wait(w_loaded.at[s])
            plgpu.wgmma(acc_ref, a_smem.at[s, wg], w_smem.at[s].T if w_rows_are_n else w_smem.at[s])
            plgpu.wgmma_wait(1)  # the previous slice's product is done: its slot can be refilled

            @pl.when(j > 0)
            def _():
                plgpu.barrier_arrive(freed.at[slot(first + j - 1)])

        plgpu.wgmma_wait(0)
        plgpu.barrier_arrive(freed.at[slot(first + sched.k_steps - 1)])
        return acc_ref[...]

    return pl.run_scoped(mma, plgpu.ACC((sched.tiles.tile_m, sched.tiles.tile_n), _F32))


def _launch(kernel, a, w, extra, *, out_shape, sched, interpret, name):
    outs = plgpu.kernel(
        kernel,
        out_type=out_shape,
        grid=(sched.programs,),
        grid_names=("programs",),
        num_threads=_CONSUMERS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
        kernel_name=name,
    )(a, w, *extra)
    return jax.tree.map(functools.partial(vary_like, a), outs)  # inside shard_map, as `a` varies


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


def _consumer_loop(pid, sched, tile_body) -> None:
    """`tile_body(i, mi, ni, first)` for each of CTA `pid`'s tiles, then waits for its last stores."""
    plgpu.set_max_registers(232, action="increase")

    @pl.loop(0, sched.count(pid))
    def _tile(i):
        mi, ni = sched.tile(pid, i)
        tile_body(i, mi, ni, i * sched.k_steps)

    plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("tiles", "interpret"))
def up_relu2(x_ND, w1_DF, b1_F=None, *, tiles: Tiles = Tiles(), interpret=None):
    """`relu(x @ w1 + b1)²` `[N, F]` in x's dtype; the bias (any float dtype) is added in float32."""
    n, d = x_ND.shape
    f = w1_DF.shape[1]
    _check(n, d, f, tiles, x_ND.dtype)
    sched = _schedule(n, d, f, tiles, interpret)
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
                acc = _accumulate(ring_smem, wg=wg, first=first, w_rows_are_n=False, sched=sched)
                if has_bias:
                    plgpu.barrier_wait(b_loaded.at[wg])
                    acc = acc + lax.broadcast_in_dim(plgpu.load(b_smem.at[wg], layout=_COL), acc.shape, [1])
                relu = jnp.maximum(acc, 0.0)
                out = out_smem.at[wg]
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's store has left SMEM
                out[...] = (relu * relu).astype(out.dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out, post_ref.at[pl.ds((mi * _CONSUMERS + wg) * tm, tm), cols])

            pl.when(wg < _CONSUMERS)(lambda: _consumer_loop(pid, sched, tile_body))
            pl.when(wg == _CONSUMERS)(
                lambda: _producer(x_ref, w_ref, ring_smem, pid=pid, w_rows_are_n=False, sched=sched)
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
    out_shape = out_struct(x_ND, (n, f), x_ND.dtype)
    w1 = w1_DF.astype(x_ND.dtype)
    return _launch(
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
    sched = _schedule(n, d, f, tiles, interpret)
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
                m_tile = mi * _CONSUMERS + wg
                rows, cols = pl.ds(m_tile * tm, tm), pl.ds(ni * tn, tn)
                io = io_smem.at[wg]  # the post tile in, the d_pre tile out
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's stores have left SMEM
                plgpu.copy_gmem_to_smem(post_ref.at[rows, cols], io, post_loaded.at[wg])
                acc = _accumulate(ring_smem, wg=wg, first=first, w_rows_are_n=True, sched=sched)
                plgpu.barrier_wait(post_loaded.at[wg])
                grad = 2.0 * jnp.sqrt(plgpu.load(io, layout=plgpu.Layout.WGMMA).astype(_F32)) * acc
                io[...] = grad.astype(io.dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(io, dpre_ref.at[rows, cols])
                if column_sum:
                    column_sums(i, grad, m_tile, cols)

            @pl.when(wg < _CONSUMERS)
            def _():
                _consumer_loop(pid, sched, tile_body)
                if column_sum:  # consumer 0 takes the last turn's barrier too: every phase is observed

                    @pl.when((wg == 0) & (sched.count(pid) > 0))
                    def _():
                        plgpu.barrier_wait(summed.at[1])

            pl.when(wg == _CONSUMERS)(
                lambda: _producer(dy_ref, w_ref, ring_smem, pid=pid, w_rows_are_n=True, sched=sched)
            )

        pl.run_scoped(
            scoped,
            _ring_scratch(dy_ND, w2_FD, tiles, True),
            plgpu.SMEM((_CONSUMERS, tm, tn), post_NF.dtype, transforms=_TRANSFORMS),
            plgpu.SMEM((_CONSUMERS, tn), _F32),
            plgpu.Barrier(num_barriers=_CONSUMERS),
            plgpu.Barrier(num_barriers=_CONSUMERS),
            collective_axes="wg",
        )

    out_shape = [out_struct(dy_ND, (n, f), post_NF.dtype)]
    if column_sum:
        out_shape.append(out_struct(dy_ND, (n // tm, f), _F32))
    w2 = w2_FD.astype(dy_ND.dtype)
    outs = _launch(
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
