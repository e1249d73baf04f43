"""Hopper forward pass of causal flash attention in Mosaic GPU (`plgpu`): wgmma, TMA, warp roles.

Same semantics and residuals as the forward in `attention.py` (causal, optional sliding window,
log-sum-exp saved in base 2 with the scale applied), without document masks. Each CTA takes
2·block_q consecutive queries of one (batch, head) and runs three warpgroups:

- a producer streams the key and value blocks by TMA into a ring of `stages` SMEM slots;
- two consumers each own block_q queries and share those K/V slots. A barrier pair makes them
  take turns on the tensor cores: one runs its QKᵀ or PV wgmma while the other does its softmax
  (the FlashAttention-3 ping-pong).

The producer loads the union of the key blocks the two consumers visit. Each consumer walks
that union in order: masked and unmasked blocks of its own range are computed, the rest are
passed over (their barriers still taken, so both consumers stay in step). Blocks outside the
window or past the diagonal are never loaded.

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

from pallas_kernels.shapes import out_struct

_LOG2E = math.log2(math.e)
# Finite, so a row with no visible key in a block gives exp2(0) there; the rescale at its first
# visible key (the diagonal is always one) multiplies that by exp2(_MASK - m) = 0.
_MASK = -0.7 * float(jnp.finfo(jnp.float32).max)
_CONSUMERS = 2


def _cdiv(x: jax.Array, n: int) -> jax.Array:
    return lax.div(x + (n - 1), jnp.int32(n))


def key_blocks(q_start: jax.Array, rows: int, block_k: int, window: int | None):
    """Key blocks `[lo, full_lo, full_hi, hi)` of rows q_start..q_start+rows-1.

    [lo, hi) holds every visible key; inside it, [full_lo, full_hi) needs no mask.
    """
    lo_pos = jnp.int32(0) if window is None else jnp.maximum(q_start - window, 0)
    lo = lax.div(lo_pos, jnp.int32(block_k))
    hi = _cdiv(q_start + rows, block_k)
    full_lo_pos = jnp.int32(0) if window is None else jnp.maximum(q_start + rows - 1 - window, 0)
    full_lo = jnp.clip(_cdiv(full_lo_pos, block_k), lo, hi)
    full_hi = jnp.clip(lax.div(q_start + 1, jnp.int32(block_k)), full_lo, hi)
    return lo, full_lo, full_hi, hi


def forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: int | None,
    scale: float,
    block_q: int = 64,
    block_k: int = 128,
    stages: int = 2,
    interpret=None,
) -> tuple[jax.Array, jax.Array]:
    """Output `[B, T, H, K]` and log2-sum-exp `[B, H, T]` f32; T a multiple of 2·block_q and block_k.

    `interpret` takes a `plgpu.InterpretGPUParams` to run on the CPU simulator.
    """
    b, t, h, d = q.shape
    if t % (_CONSUMERS * block_q) or t % block_k:
        raise ValueError(f"T = {t} must be a multiple of {_CONSUMERS * block_q} and of {block_k}")
    if block_q % 64 or block_k % 64 or d % 64 or stages < 2:
        raise ValueError("need block_q, block_k, head dim multiples of 64 and stages >= 2")
    dtype = q.dtype
    c = scale * _LOG2E
    num_tiles = t // (_CONSUMERS * block_q)

    def kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, smem, loaded, freed, turn):
        q_smem2, k_smem, v_smem, lse_smem2 = smem
        k_loaded, v_loaded, q_loaded = loaded
        k_freed, v_freed = freed
        bi, hi = lax.axis_index("batch"), lax.axis_index("heads")
        tile = num_tiles - 1 - lax.axis_index("q_tiles")  # heaviest causal tiles first
        cta_q = tile * (_CONSUMERS * block_q)
        first = key_blocks(cta_q, block_q, block_k, window)[0]
        last = key_blocks(cta_q + block_q, block_q, block_k, window)[3]
        wg = lax.axis_index("wg")

        def slot(j):
            return lax.rem(j - first, jnp.int32(stages))

        def take_turn():
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        @pl.when(wg < _CONSUMERS)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            q_smem, lse_smem = q_smem2.at[wg], lse_smem2.at[wg]
            q_start = cta_q + wg * block_q
            lo, full_lo, full_hi, hi_blk = key_blocks(q_start, block_q, block_k, window)
            plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(q_start, block_q), hi], q_smem, q_loaded.at[wg])
            plgpu.barrier_wait(q_loaded.at[wg])
            m = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            l = plgpu.layout_cast(jnp.zeros((block_q,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
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
                    gap = (rows + q_start) - (cols + j * block_k)  # query position - key position
                    visible = gap >= 0 if window is None else (gap >= 0) & (gap <= window)
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

            for i in range(stages):
                pl.when(first + i < last)(functools.partial(load, first + i, i))

            @pl.loop(first + stages, last)
            def _refill(j):
                s_ = slot(j)
                plgpu.barrier_wait(k_freed.at[s_])
                plgpu.barrier_wait(v_freed.at[s_])
                load(j, s_)

            @pl.loop(jnp.maximum(first, last - stages), last)
            def _drain(j):  # observe the last frees too, so every barrier phase is consumed
                plgpu.barrier_wait(k_freed.at[slot(j)])
                plgpu.barrier_wait(v_freed.at[slot(j)])

    def entry(q_ref, k_ref, v_ref, o_ref, lse_ref):
        transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        smem = (
            plgpu.SMEM((_CONSUMERS, block_q, d), dtype, transforms=transforms),
            plgpu.SMEM((stages, block_k, d), dtype, transforms=transforms),
            plgpu.SMEM((stages, block_k, d), dtype, transforms=transforms),
            plgpu.SMEM((_CONSUMERS, block_q), jnp.float32),
        )
        loaded = (
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=_CONSUMERS),
        )
        freed = (plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=stages),) * 2
        turn = plgpu.Barrier(num_arrivals=_CONSUMERS)
        pl.run_scoped(
            lambda *scratch: kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *scratch),
            smem,
            loaded,
            freed,
            turn,
            collective_axes="wg",
        )

    out_type = (out_struct(q, q.shape, dtype), out_struct(q, (b, h, t), jnp.float32))
    return plgpu.kernel(
        entry,
        out_type=out_type,
        grid=(h, num_tiles, b),
        grid_names=("heads", "q_tiles", "batch"),
        num_threads=_CONSUMERS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
        kernel_name="flash_attention_fwd_mgpu",
    )(q, k, v)
