"""Hopper backward pass of flash attention in Mosaic GPU (`plgpu`): dq, dk, dv for `attention_mgpu`.

Same masks as the forward (causal, optional sliding window, documents as contiguous runs of
segment ids), and the same residual: the base-2 log-sum-exp of the scaled scores. Two kernels,
as in FlashAttention-2's backward:

- dk/dv: each CTA owns 2·block_k keys (block_k per consumer warpgroup) and walks the query blocks
  that see them. Per query block: Sᵀ = K·Qᵀ, Pᵀ = exp2(c·Sᵀ - lse), dPᵀ = V·dOᵀ,
  dV += Pᵀ·dO, dSᵀ = Pᵀ ∘ (dPᵀ - δ), dK += dSᵀ·Q. Working with the transposed scores keeps
  every product's left operand a plain register or SMEM tile.
- dq: each CTA owns 2·block_q queries and walks the key blocks they see: S = Q·Kᵀ,
  dP = dO·Vᵀ, dS = P ∘ (dP - δ), dQ += dS·K.

dq is a separate kernel rather than atomic adds from the dk/dv kernel (FlashAttention-2/3's
choice): it costs three products per visible block instead of one, but it is deterministic, needs
no f32 dq buffer and no cleanup pass, and the CPU simulator that tests these kernels runs
neither `atomic_add` nor TMA reductions (`copy_smem_to_gmem(reduction_op=...)`).

δ = rowsum(dO ∘ O) is computed by XLA before the kernels. In both kernels a producer warpgroup
streams the column-side tiles by TMA through a ring of SMEM slots (`attention_mgpu.ring`), only
over the union of the blocks the two consumers need; each consumer computes its own range
(masked on its edge blocks only) and passes over the rest.

References:
  Dao, FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning, 2023.
  https://arxiv.org/abs/2307.08691
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

from pallas_kernels.attention_mgpu import (
    _CONSUMERS,
    _MASK,
    _TRANSFORMS,
    key_block_ranges,
    query_block_ranges,
    read_bound,
    ring,
    visible_bounds,
)
from pallas_kernels.shapes import out_struct, vary_like

_LOG2E = math.log2(math.e)
_ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a WGMMA tile
_COL = plgpu.Layout.WGMMA.reduce(0)  # one value per column


def _iota(shape, dim):
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _accumulate(accs, lhs, rhs_smem, interpret) -> tuple[jax.Array, ...]:
    """accs[i] + lhs[i] @ rhs_smem[i] for register `lhs` and SMEM `rhs`, issued back to back."""
    if interpret is not None:  # the simulator has no `run_state`: the same products, by XLA
        return tuple(
            acc + jnp.dot(a, b[...], preferred_element_type=jnp.float32)
            for acc, a, b in zip(accs, lhs, rhs_smem, strict=True)
        )

    def body(acc_refs):
        for acc_ref, a, b in zip(acc_refs, lhs, rhs_smem, strict=True):
            plgpu.wgmma(acc_ref, a, b)

    return tuple(pl.run_state(body)(tuple(plgpu.ACC.init(acc) for acc in accs)))


def _two_products(first, second, shape, between):
    """Issues two SMEM × SMEM products, runs `between(first_result)` while the second is in
    flight, and returns `(between(...), second_result)`. Each of `first`, `second` is (lhs, rhs)."""

    def body(first_ref, second_ref):
        plgpu.wgmma(first_ref, *first)
        plgpu.wgmma(second_ref, *second)
        out = between(plgpu.wgmma_accumulator_load(first_ref, wait_n=1))
        return out, second_ref[...]

    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32), plgpu.ACC(shape, jnp.float32))


def _tile_span(ranges_ref, bi, row) -> tuple[jax.Array, jax.Array]:
    """The blocks the CTA's consumers visit between them, [first, last): its ring's span."""
    return read_bound(ranges_ref, bi, row, 0), read_bound(ranges_ref, bi, row + _CONSUMERS - 1, 3)


def _walk(ranges_ref, bi, tile, wg, stages, wait_loaded, freed, step, carry):
    """A consumer's loop over the CTA's column blocks: compute its own range, pass over the rest.

    Every block's loaded barriers are waited and its freed barrier arrived at, so both consumers
    and the producer stay in step through the ring.
    """
    row = _CONSUMERS * tile
    first, last = _tile_span(ranges_ref, bi, row)
    lo, full_lo, full_hi, hi = (read_bound(ranges_ref, bi, row + wg, i) for i in range(4))

    def slot(j):
        return lax.rem(j - first, jnp.int32(stages))

    def visit(j, carry, masked: bool):
        s_ = slot(j)
        carry = step(j, s_, carry, masked)
        plgpu.barrier_arrive(freed.at[s_])
        return carry

    def pass_over(j, carry):
        s_ = slot(j)
        wait_loaded(s_)
        plgpu.barrier_arrive(freed.at[s_])
        return carry

    carry = lax.fori_loop(first, lo, pass_over, carry)
    carry = lax.fori_loop(lo, full_lo, functools.partial(visit, masked=True), carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(visit, masked=False), carry)
    carry = lax.fori_loop(full_hi, hi, functools.partial(visit, masked=True), carry)
    return lax.fori_loop(hi, last, pass_over, carry)


def _launch(body, out_type, scratch, grid, name, interpret, *args):
    def entry(*refs):
        pl.run_scoped(lambda *s: body(*refs, *s), *scratch, collective_axes="wg")

    outs = plgpu.kernel(
        entry,
        out_type=out_type,
        grid=grid,
        grid_names=("heads", "tiles", "batch"),
        num_threads=_CONSUMERS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
        kernel_name=name,
    )(*args)
    return jax.tree.map(functools.partial(vary_like, args[0]), outs)  # inside shard_map, as q varies


def _dkdv(q, k, v, do, lse, delta, last_query_BT, *, scale, block_q, block_k, stages, interpret):
    b, t, h, d = q.shape
    dtype = q.dtype
    c = scale * _LOG2E
    ranges = query_block_ranges(last_query_BT, block_k, block_q)

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ranges_ref, lq_ref, dk_ref, dv_ref, *scratch):
        (k_smem2, v_smem2, lq_smem2, q_smem, do_smem, lse_smem, delta_smem), loaded, freed = scratch
        own_loaded, (q_loaded, do_loaded, lse_loaded, delta_loaded) = loaded
        bi, hi, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        tile = lax.axis_index("tiles")  # early keys are seen by the most queries: first

        @pl.when(wg < _CONSUMERS)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            k_smem, v_smem, lq_smem = k_smem2.at[wg], v_smem2.at[wg], lq_smem2.at[wg]
            k_start = (_CONSUMERS * tile + wg) * block_k
            rows = (bi, pl.ds(k_start, block_k), hi)
            for i, (src, dst) in enumerate(
                (
                    (k_ref.at[rows], k_smem),
                    (v_ref.at[rows], v_smem),
                    (lq_ref.at[bi, pl.ds(k_start, block_k)], lq_smem),
                )
            ):
                plgpu.copy_gmem_to_smem(src, dst, own_loaded.at[_CONSUMERS * i + wg])
            for i in range(3):
                plgpu.barrier_wait(own_loaded.at[_CONSUMERS * i + wg])
            last_query = plgpu.load(lq_smem, layout=_ROW)  # broadcast where used: registers are scarce

            def step(j, s_, carry, masked):
                dk, dv = carry
                plgpu.barrier_wait(q_loaded.at[s_])
                plgpu.barrier_wait(lse_loaded.at[s_])
                plgpu.barrier_wait(do_loaded.at[s_])
                shape = (block_k, block_q)

                def probabilities(st):  # Pᵀ, while dPᵀ = V·dOᵀ runs
                    lse = lax.broadcast_in_dim(plgpu.load(lse_smem.at[s_], layout=_COL), shape, [1])
                    if masked:
                        key_pos, query_pos = _iota(shape, 0) + k_start, _iota(shape, 1) + j * block_q
                        last = lax.broadcast_in_dim(last_query, shape, [0])
                        visible = (query_pos >= key_pos) & (query_pos <= last)
                        return jnp.exp2(jnp.where(visible, st * c, _MASK) - lse)
                    return jnp.exp2(st * c - lse)

                pt, dpt = _two_products(
                    (k_smem, q_smem.at[s_].T), (v_smem, do_smem.at[s_].T), shape, probabilities
                )
                plgpu.barrier_wait(delta_loaded.at[s_])
                delta = lax.broadcast_in_dim(plgpu.load(delta_smem.at[s_], layout=_COL), shape, [1])
                dst16 = (pt * (dpt - delta)).astype(dtype)
                lhs, rhs = (pt.astype(dtype), dst16), (do_smem.at[s_], q_smem.at[s_])
                dv, dk = _accumulate((dv, dk), lhs, rhs, interpret)  # dV += Pᵀ·dO, dK += dSᵀ·Q
                return dk, dv

            def wait_loaded(s_):
                for barrier in (q_loaded, lse_loaded, do_loaded, delta_loaded):
                    plgpu.barrier_wait(barrier.at[s_])

            zeros = plgpu.layout_cast(jnp.zeros((block_k, d), jnp.float32), plgpu.Layout.WGMMA)
            dk, dv = _walk(ranges_ref, bi, tile, wg, stages, wait_loaded, freed, step, (zeros, zeros))
            k_smem[...] = (dk * scale).astype(dtype)
            v_smem[...] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[rows])
            plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == _CONSUMERS)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            row = _CONSUMERS * tile

            def load(j, s_):
                rows, cols = (bi, pl.ds(j * block_q, block_q), hi), (bi, hi, pl.ds(j * block_q, block_q))
                plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[s_], q_loaded.at[s_])
                plgpu.copy_gmem_to_smem(lse_ref.at[cols], lse_smem.at[s_], lse_loaded.at[s_])
                plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[s_], do_loaded.at[s_])
                plgpu.copy_gmem_to_smem(delta_ref.at[cols], delta_smem.at[s_], delta_loaded.at[s_])

            ring(*_tile_span(ranges_ref, bi, row), stages, load, (freed,))

    scratch = (
        (
            plgpu.SMEM((_CONSUMERS, block_k, d), dtype, transforms=_TRANSFORMS),
            plgpu.SMEM((_CONSUMERS, block_k, d), dtype, transforms=_TRANSFORMS),
            plgpu.SMEM((_CONSUMERS, block_k), jnp.int32),
            plgpu.SMEM((stages, block_q, d), dtype, transforms=_TRANSFORMS),
            plgpu.SMEM((stages, block_q, d), dtype, transforms=_TRANSFORMS),
            plgpu.SMEM((stages, block_q), jnp.float32),
            plgpu.SMEM((stages, block_q), jnp.float32),
        ),
        (plgpu.Barrier(num_barriers=3 * _CONSUMERS), (plgpu.Barrier(num_barriers=stages),) * 4),
        plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=stages),
    )
    out_type = (out_struct(k, k.shape, dtype), out_struct(v, v.shape, dtype))
    grid = (h, t // (_CONSUMERS * block_k), b)
    args = (q, k, v, do, lse, delta, ranges, last_query_BT)
    return _launch(kernel, out_type, scratch, grid, "flash_attention_dkdv_mgpu", interpret, *args)


def _dq(q, k, v, do, lse, delta, first_key_BT, *, scale, block_q, block_k, stages, interpret):
    b, t, h, d = q.shape
    dtype = q.dtype
    c = scale * _LOG2E
    ranges = key_block_ranges(first_key_BT, block_q, block_k)
    num_tiles = t // (_CONSUMERS * block_q)

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ranges_ref, fk_ref, dq_ref, *scratch):
        (q_smem2, do_smem2, lse_smem2, delta_smem2, fk_smem2, k_smem, v_smem), loaded, freed = scratch
        own_loaded, (k_loaded, v_loaded) = loaded
        bi, hi, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        tile = num_tiles - 1 - lax.axis_index("tiles")  # heaviest causal tiles first

        @pl.when(wg < _CONSUMERS)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
            q_start = (_CONSUMERS * tile + wg) * block_q
            rows, vec = (bi, pl.ds(q_start, block_q), hi), (bi, hi, pl.ds(q_start, block_q))
            copies = (
                (q_ref.at[rows], q_smem),
                (do_ref.at[rows], do_smem),
                (lse_ref.at[vec], lse_smem2.at[wg]),
                (delta_ref.at[vec], delta_smem2.at[wg]),
                (fk_ref.at[bi, pl.ds(q_start, block_q)], fk_smem2.at[wg]),
            )
            for i, (src, dst) in enumerate(copies):
                plgpu.copy_gmem_to_smem(src, dst, own_loaded.at[_CONSUMERS * i + wg])
            for i in range(len(copies)):
                plgpu.barrier_wait(own_loaded.at[_CONSUMERS * i + wg])
            shape = (block_q, block_k)
            # one value per row, broadcast where used: registers are scarce
            lse, delta, first_key = (
                plgpu.load(ref.at[wg], layout=_ROW) for ref in (lse_smem2, delta_smem2, fk_smem2)
            )

            def per_row(x):
                return lax.broadcast_in_dim(x, shape, [0])

            def step(j, s_, dq, masked):
                plgpu.barrier_wait(k_loaded.at[s_])
                plgpu.barrier_wait(v_loaded.at[s_])

                def probabilities(s):  # P, while dP = dO·Vᵀ runs
                    if masked:
                        query_pos, key_pos = _iota(shape, 0) + q_start, _iota(shape, 1) + j * block_k
                        visible = (key_pos <= query_pos) & (key_pos >= per_row(first_key))
                        return jnp.exp2(jnp.where(visible, s * c, _MASK) - per_row(lse))
                    return jnp.exp2(s * c - per_row(lse))

                p, dp = _two_products(
                    (q_smem, k_smem.at[s_].T), (do_smem, v_smem.at[s_].T), shape, probabilities
                )
                ds16 = (p * (dp - per_row(delta))).astype(dtype)
                return _accumulate((dq,), (ds16,), (k_smem.at[s_],), interpret)[0]

            def wait_loaded(s_):
                plgpu.barrier_wait(k_loaded.at[s_])
                plgpu.barrier_wait(v_loaded.at[s_])

            zeros = plgpu.layout_cast(jnp.zeros((block_q, d), jnp.float32), plgpu.Layout.WGMMA)
            dq = _walk(ranges_ref, bi, tile, wg, stages, wait_loaded, freed, step, zeros)
            q_smem[...] = (dq * scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == _CONSUMERS)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            row = _CONSUMERS * tile

            def load(j, s_):
                rows = (bi, pl.ds(j * block_k, block_k), hi)
                plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[s_], k_loaded.at[s_])
                plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[s_], v_loaded.at[s_])

            ring(*_tile_span(ranges_ref, bi, row), stages, load, (freed,))

    scratch = (
        (
            plgpu.SMEM((_CONSUMERS, block_q, d), dtype, transforms=_TRANSFORMS),
            plgpu.SMEM((_CONSUMERS, block_q, d), dtype, transforms=_TRANSFORMS),
            plgpu.SMEM((_CONSUMERS, block_q), jnp.float32),
            plgpu.SMEM((_CONSUMERS, block_q), jnp.float32),
            plgpu.SMEM((_CONSUMERS, block_q), jnp.int32),
            plgpu.SMEM((stages, block_k, d), dtype, transforms=_TRANSFORMS),
            plgpu.SMEM((stages, block_k, d), dtype, transforms=_TRANSFORMS),
        ),
        (plgpu.Barrier(num_barriers=5 * _CONSUMERS), (plgpu.Barrier(num_barriers=stages),) * 2),
        plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=stages),
    )
    grid = (h, num_tiles, b)
    args = (q, k, v, do, lse, delta, ranges, first_key_BT)
    return _launch(
        kernel, out_struct(q, q.shape, dtype), scratch, grid, "flash_attention_dq_mgpu", interpret, *args
    )


def backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    o: jax.Array,
    lse: jax.Array,
    do: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    window: int | None,
    scale: float,
    block_q_dq: int = 64,
    block_k_dq: int = 64,
    block_q_dkv: int = 64,
    block_k_dkv: int = 64,
    stages: int = 2,
    interpret=None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """dq, dk, dv `[B, T, H, K]` in q's dtype, from the forward's output `o` and log2-sum-exp `lse`.

    T must be a multiple of 2·block_q_dq, 2·block_k_dkv, block_k_dq and block_q_dkv; every block
    a multiple of 64. `interpret` takes a `plgpu.InterpretGPUParams` to run on the CPU simulator.
    """
    b, t, _, d = q.shape
    blocks = (block_q_dq, block_k_dq, block_q_dkv, block_k_dkv)
    if any(x % 64 for x in (*blocks, d)) or stages < 2:
        raise ValueError(f"need blocks {blocks} and head dim {d} multiples of 64, and stages >= 2")
    multiples = (_CONSUMERS * block_q_dq, _CONSUMERS * block_k_dkv, block_k_dq, block_q_dkv)
    if any(t % x for x in multiples):
        raise ValueError(f"T = {t} must be a multiple of each of {multiples}")
    delta = jnp.einsum("bthk,bthk->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    first_key_BT, last_query_BT = visible_bounds(segment_ids, b, t, window)
    args = (q, k, v, do, lse, delta)
    common = {"scale": scale, "stages": stages, "interpret": interpret}
    dq = _dq(*args, first_key_BT, block_q=block_q_dq, block_k=block_k_dq, **common)
    dk, dv = _dkdv(*args, last_query_BT, block_q=block_q_dkv, block_k=block_k_dkv, **common)
    return dq, dk, dv
