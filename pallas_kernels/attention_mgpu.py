"""Hopper forward pass of causal flash attention in Mosaic GPU (`plgpu`): wgmma, TMA, warp roles.

Same semantics and residuals as the forward in `attention.py` (causal, optional sliding window,
documents given as contiguous runs of segment ids; log-sum-exp saved in base 2 with the scale
applied). The masks reach the kernel as one int32 per query, the first key it sees
(`visible_bounds`), and as a per-block table of key-block ranges computed by XLA beforehand
(`key_block_ranges`): the blocks with any visible pair, and inside them those where all are.
Each CTA takes 2·block_q consecutive queries of one (batch, head) and runs three warpgroups:

- a producer streams the key and value blocks by TMA into a ring of `stages` SMEM slots;
- two consumers each own block_q queries and share those K/V slots. A barrier pair makes them
  take turns on the tensor cores: one runs its QKᵀ or PV wgmma while the other does its softmax
  (the FlashAttention-3 ping-pong).

The producer loads the union of the key blocks the two consumers visit. Each consumer walks
that union in order: masked and unmasked blocks of its own range are computed, the rest are
passed over (their barriers still taken, so both consumers stay in step). Blocks outside the
window, in earlier documents or past the diagonal are never loaded; the mask is applied only on
blocks that straddle one of those edges. The backward is in `attention_mgpu_bwd.py`.

References:
  Shah et al., FlashAttention-3: Fast and Accurate Attention with Asynchrony and Low-precision,
  2024. https://arxiv.org/abs/2407.08608
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.shapes import out_struct, vary_like

_LOG2E = math.log2(math.e)
# Finite, so a row with no visible key in a block gives exp2(0) there; the rescale at its first
# visible key (the diagonal is always one) multiplies that by exp2(_MASK - m) = 0.
_MASK = -0.7 * float(jnp.finfo(jnp.float32).max)
_CONSUMERS = 2
_TRANSFORMS = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def _cdiv(x, n: int):
    return (x + (n - 1)) // n


# ----------------------------------------------------------------------------- masks and block ranges


def visible_bounds(segment_ids_BT: jax.Array | None, batch: int, t: int, window: int | None):
    """`first_key_BT` (the first key each query sees) and `last_query_BT` (the last query that sees
    each key), int32 `[B, T]`.

    Query q sees key k iff first_key[q] <= k <= q, equivalently k <= q <= last_query[k]: documents
    are contiguous runs of equal ids, so "same document" is "k at or after q's document start" once
    k <= q. Both are nondecreasing along T, which makes every block range below one interval.
    """
    pos = jnp.arange(t, dtype=jnp.int32)[None, :]
    first = jnp.zeros_like(pos) if window is None else jnp.maximum(pos - window, 0)
    last = jnp.full_like(pos, t - 1) if window is None else jnp.minimum(pos + window, t - 1)
    if segment_ids_BT is not None:
        change = segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]
        edge = jnp.ones((segment_ids_BT.shape[0], 1), bool)
        starts = lax.cummax(jnp.where(jnp.concatenate([edge, change], axis=1), pos, 0), axis=1)
        ends = lax.cummin(
            jnp.where(jnp.concatenate([change, edge], axis=1), pos, t - 1), axis=1, reverse=True
        )
        first, last = jnp.maximum(first, starts), jnp.minimum(last, ends)
    shape = (batch, t)
    return jnp.broadcast_to(first, shape).astype(jnp.int32), jnp.broadcast_to(last, shape).astype(jnp.int32)


def _stack(a, full_lo, full_hi, d):
    a, full_lo, full_hi, d = jnp.broadcast_arrays(a, full_lo, full_hi, d)
    b = jnp.clip(full_lo, a, d)
    return jnp.stack([a, b, jnp.clip(full_hi, b, d), d], axis=-1).astype(jnp.int32)


def key_block_ranges(first_key_BT: jax.Array, rows: int, cols: int) -> jax.Array:
    """For each block of `rows` queries, its key blocks of `cols` keys `[a, b, c, d]`, `[B, T // rows, 4]`.

    [a, d) are the blocks holding a visible pair; [b, c) those where every pair is visible.
    """
    qs = jnp.arange(0, first_key_BT.shape[1], rows, dtype=jnp.int32)
    a = first_key_BT[:, qs] // cols
    d = ((qs + rows - 1) // cols + 1)[None, :]
    return _stack(a, _cdiv(first_key_BT[:, qs + rows - 1], cols), ((qs + 1) // cols)[None, :], d)


def query_block_ranges(last_query_BT: jax.Array, rows: int, cols: int) -> jax.Array:
    """For each block of `rows` keys, its query blocks of `cols` queries `[a, b, c, d]`, `[B, T // rows, 4]`."""
    ks = jnp.arange(0, last_query_BT.shape[1], rows, dtype=jnp.int32)
    d = last_query_BT[:, ks + rows - 1] // cols + 1
    return _stack(
        (ks // cols)[None, :], _cdiv(ks + rows - 1, cols)[None, :], (last_query_BT[:, ks] + 1) // cols, d
    )


def read_bound(ref, *index) -> jax.Array:
    """A block index read from `ref` to bound a loop.

    Inside shard_map the kernel's refs carry the mesh's manual axes in their type, but the kernel is
    traced without them, so arithmetic on a read drops them: a loop counter that started from the
    raw read would change type after one `+ 1`. One such operation here gives every bound the type
    its counter will have.
    """
    return ref[index] + 0


def ring(first, last, stages: int, load, freed) -> None:
    """Producer side of a ring of `stages` SMEM slots: `load(j, slot)` for blocks first..last-1.

    Block j goes to slot (j - first) mod stages once the consumers have arrived at every barrier
    in `freed` for that slot's previous block.
    """

    def slot(j):
        return lax.rem(j - first, jnp.int32(stages))

    for i in range(stages):
        pl.when(first + i < last)(functools.partial(load, first + i, i))

    @pl.loop(first + stages, last)
    def _refill(j):
        for barrier in freed:
            plgpu.barrier_wait(barrier.at[slot(j)])
        load(j, slot(j))

    @pl.loop(jnp.maximum(first, last - stages), last)
    def _drain(j):  # observe the last frees too, so every barrier phase is consumed
        for barrier in freed:
            plgpu.barrier_wait(barrier.at[slot(j)])


def forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    window: int | None,
    scale: float,
    block_q: int = 64,
    block_k: int = 128,
    stages: int = 2,
    interpret=None,
) -> tuple[jax.Array, jax.Array]:
    """Output `[B, T, H, K]` and log2-sum-exp `[B, H, T]` f32; T a multiple of 2·block_q and block_k.

    `segment_ids` `[B, T]` int32 (documents as contiguous runs) or None. `interpret` takes a
    `plgpu.InterpretGPUParams` to run on the CPU simulator.
    """
    b, t, h, d = q.shape
    if t % (_CONSUMERS * block_q) or t % block_k:
        raise ValueError(f"T = {t} must be a multiple of {_CONSUMERS * block_q} and of {block_k}")
    if block_q % 64 or block_k % 64 or d % 64 or stages < 2:
        raise ValueError("need block_q, block_k, head dim multiples of 64 and stages >= 2")
    dtype = q.dtype
    c = scale * _LOG2E
    num_tiles = t // (_CONSUMERS * block_q)
    first_key_BT, _ = visible_bounds(segment_ids, b, t, window)
    ranges = key_block_ranges(first_key_BT, block_q, block_k)

    def kernel(q_ref, k_ref, v_ref, ranges_ref, fk_ref, o_ref, lse_ref, smem, loaded, freed, turn):
        q_smem2, k_smem, v_smem, lse_smem2, fk_smem2 = smem
        k_loaded, v_loaded, q_loaded, fk_loaded = loaded
        k_freed, v_freed = freed
        bi, hi = lax.axis_index("batch"), lax.axis_index("heads")
        tile = num_tiles - 1 - lax.axis_index("q_tiles")  # heaviest causal tiles first
        cta_q = tile * (_CONSUMERS * block_q)
        first = read_bound(ranges_ref, bi, _CONSUMERS * tile, 0)
        last = read_bound(ranges_ref, bi, _CONSUMERS * tile + _CONSUMERS - 1, 3)
        wg = lax.axis_index("wg")

        def slot(j):
            return lax.rem(j - first, jnp.int32(stages))

        def take_turn():
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        @pl.when(wg < _CONSUMERS)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            q_smem, lse_smem, fk_smem = q_smem2.at[wg], lse_smem2.at[wg], fk_smem2.at[wg]
            q_start = cta_q + wg * block_q
            lo, full_lo, full_hi, hi_blk = (
                read_bound(ranges_ref, bi, _CONSUMERS * tile + wg, i) for i in range(4)
            )
            plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(q_start, block_q), hi], q_smem, q_loaded.at[wg])
            plgpu.copy_gmem_to_smem(fk_ref.at[bi, pl.ds(q_start, block_q)], fk_smem, fk_loaded.at[wg])
            plgpu.barrier_wait(q_loaded.at[wg])
            plgpu.barrier_wait(fk_loaded.at[wg])
            row_layout = plgpu.Layout.WGMMA.reduce(1)
            first_key = plgpu.load(fk_smem, layout=row_layout)
            m = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32), row_layout)
            l = plgpu.layout_cast(jnp.zeros((block_q,), jnp.float32), row_layout)
            acc = plgpu.layout_cast(jnp.zeros((block_q, d), jnp.float32), plgpu.Layout.WGMMA)
            plgpu.barrier_wait(k_loaded.at[0])  # every tile has a block: its diagonal
            pl.when(wg == 1)(take_turn)

            def wait_next_k(j):
                @pl.when(j + 1 < last)
                def _():
                    plgpu.barrier_wait(k_loaded.at[slot(j + 1)])

            def compute(j, carry, masked: bool):
                acc, m, l = carry
                s_ = slot(j)

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, q_smem, k_smem.at[s_].T)
                    take_turn()
                    return acc_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((block_q, block_k), jnp.float32))
                plgpu.barrier_arrive(k_freed.at[s_])
                if masked:
                    s = s * c
                    rows = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
                    cols = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
                    key_pos = cols + j * block_k
                    visible = (key_pos <= rows + q_start) & (
                        key_pos >= lax.broadcast_in_dim(first_key, s.shape, [0])
                    )
                    s = jnp.where(visible, s, _MASK)
                    m_new = jnp.maximum(m, s.max(axis=1))
                    p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                else:  # scale inside the exponent's FMA
                    m_new = jnp.maximum(m, s.max(axis=1) * c)
                    p = jnp.exp2(s * c - lax.broadcast_in_dim(m_new, s.shape, [0]))
                alpha = jnp.exp2(m - m_new)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l = l * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
                plgpu.barrier_arrive(turn)  # softmax done
                plgpu.barrier_wait(v_loaded.at[s_])
                plgpu.barrier_wait(turn)  # tensor cores free

                if interpret is None:

                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p16, v_smem.at[s_])
                        wait_next_k(j)  # while the wgmma runs

                    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                else:  # the simulator has no `run_state`: the same product, unpipelined
                    acc = acc + jnp.dot(p16, v_smem[s_], preferred_element_type=jnp.float32)
                    wait_next_k(j)
                plgpu.barrier_arrive(v_freed.at[s_])
                return acc, m_new, l

            def pass_over(j, carry):
                s_ = slot(j)
                plgpu.barrier_arrive(k_freed.at[s_])
                take_turn()
                plgpu.barrier_wait(v_loaded.at[s_])
                take_turn()
                plgpu.barrier_arrive(v_freed.at[s_])
                wait_next_k(j)
                return carry

            carry = lax.fori_loop(first, lo, pass_over, (acc, m, l))
            carry = lax.fori_loop(lo, full_lo, functools.partial(compute, masked=True), carry)
            carry = lax.fori_loop(full_lo, full_hi, functools.partial(compute, masked=False), carry)
            carry = lax.fori_loop(full_hi, hi_blk, functools.partial(compute, masked=True), carry)
            acc, m, l = lax.fori_loop(hi_blk, last, pass_over, carry)
            pl.when(wg == 0)(take_turn)

            q_smem[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(dtype)
            lse_smem[...] = m + jnp.log2(l)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, o_ref.at[bi, pl.ds(q_start, block_q), hi])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, hi, pl.ds(q_start, block_q)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == _CONSUMERS)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")

            def load(j, s_):
                rows = (bi, pl.ds(j * block_k, block_k), hi)
                plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[s_], k_loaded.at[s_])
                plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[s_], v_loaded.at[s_])

            ring(first, last, stages, load, (k_freed, v_freed))

    def entry(q_ref, k_ref, v_ref, ranges_ref, fk_ref, o_ref, lse_ref):
        smem = (
            plgpu.SMEM((_CONSUMERS, block_q, d), dtype, transforms=_TRANSFORMS),
            plgpu.SMEM((stages, block_k, d), dtype, transforms=_TRANSFORMS),
            plgpu.SMEM((stages, block_k, d), dtype, transforms=_TRANSFORMS),
            plgpu.SMEM((_CONSUMERS, block_q), jnp.float32),
            plgpu.SMEM((_CONSUMERS, block_q), jnp.int32),
        )
        loaded = (
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=_CONSUMERS),
            plgpu.Barrier(num_barriers=_CONSUMERS),
        )
        freed = (plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=stages),) * 2
        turn = plgpu.Barrier(num_arrivals=_CONSUMERS)
        pl.run_scoped(
            lambda *scratch: kernel(q_ref, k_ref, v_ref, ranges_ref, fk_ref, o_ref, lse_ref, *scratch),
            smem,
            loaded,
            freed,
            turn,
            collective_axes="wg",
        )

    out_type = (out_struct(q, q.shape, dtype), out_struct(q, (b, h, t), jnp.float32))
    outs = plgpu.kernel(
        entry,
        out_type=out_type,
        grid=(h, num_tiles, b),
        grid_names=("heads", "q_tiles", "batch"),
        num_threads=_CONSUMERS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
        kernel_name="flash_attention_fwd_mgpu",
    )(q, k, v, ranges, first_key_BT)
    return tuple(vary_like(q, out) for out in outs)  # inside shard_map, as q varies
