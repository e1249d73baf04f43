"""The persistent Hopper GEMM that the Mosaic GPU kernels with epilogues share (`plgpu`: wgmma, TMA).

One CTA per SM walks output tiles of `2·tile_m` rows × `tile_n` columns with three warpgroups. A
producer streams the K slices of `a` and `w` by TMA into a ring of `stages` SMEM slots, running on
into the next tile while the consumers finish the last; two consumers each own `tile_m` rows of a
tile, share its w slice, and accumulate in float32 registers with wgmma. A kernel built on these
pieces supplies the tile body: its epilogue, and the store of the tile by TMA. Users:
`relu2_mgpu.py` (the ReLU² MLP's GEMMs, bf16) and `fp8_logits_mgpu.py` (the FP8 head's logits).
On CPU the kernels run in the Mosaic GPU simulator (`plgpu.InterpretGPUParams`).
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
from pallas_kernels.shapes import vary_like

_F32 = jnp.float32
CONSUMERS = 2
H100_SMS = 132


def transforms(dtype) -> tuple:
    """SMEM tiles of 8 rows × 128 bytes, 128-byte swizzled: the layout wgmma and TMA share."""
    return (plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(128))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Tiles:
    """Tiling of a persistent GEMM.

    Attributes:
      tile_m: rows of one consumer warpgroup's tile (a CTA takes 2·tile_m), a multiple of 64.
      tile_n: columns of F per CTA, a multiple of 64.
      tile_k: the K slice one ring slot holds, 128 bytes a row or a multiple of it (64 bf16, 128 FP8).
      stages: ring slots in SMEM.
    """

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 64
    stages: int = 3


def row_multiple(tiles: Tiles = Tiles()) -> int:
    """N must be a multiple of this: the rows of one CTA."""
    return CONSUMERS * tiles.tile_m


@dataclasses.dataclass(frozen=True)
class Schedule:
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


def schedule(n: int, d: int, f: int, tiles: Tiles, interpret) -> Schedule:
    total = (n // (CONSUMERS * tiles.tile_m)) * (f // tiles.tile_n)
    # one CTA per SM on a GPU; in the simulator, a few, so each walks several tiles; lowered for
    # CUDA on a host without one (the lowering tests), an H100's 132
    sms = 5 if interpret is not None else getattr(jax.devices()[0], "core_count", H100_SMS)
    return Schedule(tiles, d // tiles.tile_k, f // tiles.tile_n, total, min(total, sms))


def producer(a_ref, w_ref, ring_smem, *, pid, w_rows_are_n, sched):
    """Streams every K slice of every tile of this CTA, in order: both consumers' rows of `a` and
    the shared w slice, into the ring (it runs ahead into the next tile while the consumers finish)."""
    plgpu.set_max_registers(40, action="decrease")
    a_smem, w_smem, a_loaded, w_loaded, freed = ring_smem
    tm, tn, tk = sched.tiles.tile_m, sched.tiles.tile_n, sched.tiles.tile_k

    def load(g, s):
        mi, ni = sched.tile(pid, g // sched.k_steps)
        ks, cols = pl.ds(lax.rem(g, sched.k_steps) * tk, tk), pl.ds(ni * tn, tn)
        for c in range(CONSUMERS):
            rows = pl.ds((mi * CONSUMERS + c) * tm, tm)
            plgpu.copy_gmem_to_smem(a_ref.at[rows, ks], a_smem.at[s, c], a_loaded.at[s * CONSUMERS + c])
        w_at = w_ref.at[cols, ks] if w_rows_are_n else w_ref.at[ks, cols]
        plgpu.copy_gmem_to_smem(w_at, w_smem.at[s], w_loaded.at[s])

    ring(0, sched.count(pid) * sched.k_steps, sched.tiles.stages, load, (freed,))


def accumulate(ring_smem, *, wg, first, w_rows_are_n, sched):
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
            plgpu.barrier_wait(a_loaded.at[s * CONSUMERS + wg])
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


def launch(kernel, a, w, extra, *, out_shape, sched, interpret, name):
    outs = plgpu.kernel(
        kernel,
        out_type=out_shape,
        grid=(sched.programs,),
        grid_names=("programs",),
        num_threads=CONSUMERS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
        kernel_name=name,
    )(a, w, *extra)
    return jax.tree.map(functools.partial(vary_like, a), outs)  # inside shard_map, as `a` varies


def ring_scratch(a, w, tiles, w_rows_are_n):
    """SMEM of the K ring and its barriers: a slots, w slots, a loaded, w loaded, freed."""
    tm, tn, tk, stages = tiles.tile_m, tiles.tile_n, tiles.tile_k, tiles.stages
    return (
        plgpu.SMEM((stages, CONSUMERS, tm, tk), a.dtype, transforms=transforms(a.dtype)),
        plgpu.SMEM(
            (stages, *((tn, tk) if w_rows_are_n else (tk, tn))), w.dtype, transforms=transforms(w.dtype)
        ),
        plgpu.Barrier(num_barriers=stages * CONSUMERS),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
    )


def consumer_loop(pid, sched, tile_body) -> None:
    """`tile_body(i, mi, ni, first)` for each of CTA `pid`'s tiles, then waits for its last stores."""
    plgpu.set_max_registers(232, action="increase")

    @pl.loop(0, sched.count(pid))
    def _tile(i):
        mi, ni = sched.tile(pid, i)
        tile_body(i, mi, ni, i * sched.k_steps)

    plgpu.wait_smem_to_gmem(0)
