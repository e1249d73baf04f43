"""Flash attention in Pallas: causal, with an optional sliding window and document masking.

q, k and v are `[B, T, H, K]`. Query i sees key j when j <= i, i - j <= window (if a window is
given) and both lie in the same document (if segment ids are given; each document must be one
contiguous run of positions, as in packed batches). The T x T score matrix is never stored:
each program walks the key blocks of one query block with an online softmax (FlashAttention-2)
and saves only the log-sum-exp for the backward pass, which recomputes the probabilities in two
kernels (dk/dv over query blocks, dq over key blocks). Block ranges are computed per block from
the window and the document bounds, so blocks wholly outside either are skipped, and the mask
is evaluated only on blocks that straddle an edge. The kernels use the portable `pallas_call`
BlockSpec API (Triton lowering on GPU) and run under `interpret=True` on CPU. On a Hopper GPU,
bf16/f16 inputs with a head dim that is a multiple of 64 run the Mosaic GPU kernels instead, for
every mask: the forward in `attention_mgpu.py` and the backward in `attention_mgpu_bwd.py`
(TMA, wgmma, warp-specialised), which keep the same residuals; `interpret=True` runs them on the
Mosaic GPU simulator. The Triton kernels remain the portable path (other GPUs, f32, and the
`mosaic_forward` / `mosaic_backward` switches of `BlockSizes`).

References:
  Dao, FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning, 2023.
  https://arxiv.org/abs/2307.08691
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plmgpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import attention_mgpu, attention_mgpu_bwd
from pallas_kernels.shapes import out_struct

_LOG2E = math.log2(math.e)
# Finite, so a row masked across a whole block gives exp2(0) = 1 there, which the rescale by
# exp2(_MASK - m) erases as soon as the row meets a visible key (its diagonal always is).
_MASK = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Tiles (powers of two, at least 16) and launch settings, one group per kernel.

    The `mgpu` groups are the Mosaic GPU kernels' (tiles multiples of 64; the forward's and dq's
    query tiles and dk/dv's key tiles are per consumer warpgroup, a CTA takes two), used on Hopper
    for bf16/f16 when `mosaic_forward` / `mosaic_backward` are set (`mosaic_documents` too for a
    forward with segment ids); the other groups are Triton's.

    Defaults were picked by `benchmarks/attention_bench.py --sweep` on an H100 (docs/PERF.md). The
    Mosaic backward and the Mosaic forward with documents pass their GPU tests and beat the Triton
    kernels there; the model turns them on through `model.kernels.attention` ("mosaic", or "auto"
    with documents on Hopper). Here they stay off by default, so "pallas" keeps its Triton path.
    """

    block_q: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    num_warps_dkv: int = 4
    num_stages_dkv: int = 2
    block_q_dq: int = 128
    block_k_dq: int = 64
    num_warps_dq: int = 8
    num_stages_dq: int = 3
    mosaic_forward: bool = True
    mosaic_documents: bool = False
    block_q_mgpu: int = 64  # per consumer warpgroup; a CTA takes two
    block_k_mgpu: int = 128
    stages_mgpu: int = 2
    mosaic_backward: bool = False
    block_q_dq_mgpu: int = 64
    block_k_dq_mgpu: int = 64
    block_q_dkv_mgpu: int = 64
    block_k_dkv_mgpu: int = 64
    stages_bwd_mgpu: int = 2

    @classmethod
    def get_default(cls) -> BlockSizes:
        return cls()

    @property
    def blocks(self) -> tuple[int, ...]:
        return tuple(getattr(self, n) for n in _BLOCK_FIELDS)

    def fit(self, t: int) -> BlockSizes:
        """Shrinks every block to the sequence length rounded up to a power of two."""
        cap = max(16, pl.next_power_of_2(t))
        return dataclasses.replace(self, **{n: min(getattr(self, n), cap) for n in _BLOCK_FIELDS})


_BLOCK_FIELDS = ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq")


# ----------------------------------------------------------------------------- block ranges


def _doc_bounds(segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """First position and one past the last position of each token's document, `[B, T]` each."""
    b, t = segment_ids.shape
    pos = jnp.arange(t, dtype=jnp.int32)[None, :]
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    edge = jnp.ones((b, 1), bool)
    starts = lax.cummax(jnp.where(jnp.concatenate([edge, change], axis=1), pos, 0), axis=1)
    ends = lax.cummin(jnp.where(jnp.concatenate([change, edge], axis=1), pos + 1, t), axis=1, reverse=True)
    return starts, ends


def _split(lo: jax.Array, full_lo: jax.Array, full_hi: jax.Array, hi: jax.Array, blk: int) -> jax.Array:
    """Turns position bounds into block bounds `[a, b, c, d]`: [a, b) and [c, d) need the mask."""
    a = lo // blk
    d = (hi + blk - 1) // blk
    b = jnp.clip((full_lo + blk - 1) // blk, a, d)
    c = jnp.clip(full_hi // blk, b, d)
    return jnp.stack([a, b, c, d], axis=-1).astype(jnp.int32)


def _kv_ranges(batch: int, t: int, bq: int, bk: int, window: int | None, docs) -> jax.Array:
    """For each query block, the key blocks it visits, `[B, T // bq, 4]`."""
    qs = jnp.arange(0, t, bq, dtype=jnp.int32)[None, :]
    qe = qs + bq
    lo = qs - window if window is not None else jnp.zeros_like(qs)
    full_lo = qe - 1 - window if window is not None else jnp.zeros_like(qs)
    if docs is not None:
        lo = jnp.maximum(lo, docs[0][:, qs[0]])
        full_lo = jnp.maximum(full_lo, docs[0][:, qe[0] - 1])
    lo, full_lo = jnp.broadcast_arrays(jnp.maximum(lo, 0), jnp.maximum(full_lo, 0))
    full_hi, hi = jnp.broadcast_to(qs + 1, lo.shape), jnp.broadcast_to(qe, lo.shape)
    return jnp.broadcast_to(_split(lo, full_lo, full_hi, hi, bk), (batch, t // bq, 4))


def _q_ranges(batch: int, t: int, bq: int, bk: int, window: int | None, docs) -> jax.Array:
    """For each key block, the query blocks that see it, `[B, T // bk, 4]`."""
    ks = jnp.arange(0, t, bk, dtype=jnp.int32)[None, :]
    ke = ks + bk
    hi = jnp.full_like(ks, t) if window is None else jnp.minimum(ke + window, t)
    full_hi = jnp.full_like(ks, t) if window is None else jnp.minimum(ks + window + 1, t)
    if docs is not None:
        hi = jnp.minimum(hi, docs[1][:, ke[0] - 1])
        full_hi = jnp.minimum(full_hi, docs[1][:, ks[0]])
    hi, full_hi = jnp.broadcast_arrays(hi, full_hi)
    lo, full_lo = jnp.broadcast_to(ks, hi.shape), jnp.broadcast_to(ke - 1, hi.shape)
    return jnp.broadcast_to(_split(lo, full_lo, full_hi, hi, bq), (batch, t // bk, 4))


# ----------------------------------------------------------------------------- kernels


def _dot(a: jax.Array, b: jax.Array, trans_b: bool = False) -> jax.Array:
    """a @ b (or a @ b.T) with f32 accumulation; f32 operands stay f32 (Triton's default is TF32)."""
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    f32 = a.dtype == b.dtype == jnp.float32
    precision = lax.Precision.HIGHEST if f32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _visible(q_pos: jax.Array, k_pos: jax.Array, q_seg, k_seg, window: int | None) -> jax.Array:
    """Mask of visible pairs; arguments broadcast against each other."""
    mask = k_pos <= q_pos
    if window is not None:
        mask = jnp.logical_and(mask, q_pos - k_pos <= window)
    if q_seg is not None:
        mask = jnp.logical_and(mask, q_seg == k_seg)
    return mask


def _three_loops(range_refs, body, carry):
    """Runs `body(i, carry, masked)` over the masked, unmasked and masked block ranges."""
    a, b, c, d = (r[()] for r in range_refs)
    carry = lax.fori_loop(a, b, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(b, c, functools.partial(body, masked=False), carry)
    return lax.fori_loop(c, d, functools.partial(body, masked=True), carry)


def _fwd_kernel(*refs, scale: float, window: int | None, block_k: int, num_q_blocks: int):
    range_refs, (q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref) = refs[:4], refs[4:]
    block_q, head_dim = q_ref.shape
    q_start = (num_q_blocks - 1 - pl.program_id(0)) * block_q
    q = q_ref[...]
    q_pos = (q_start + jnp.arange(block_q, dtype=jnp.int32))[:, None]
    q_seg = None if qseg_ref is None else qseg_ref[...][:, None]

    def body(j, carry, masked):
        acc, m, l = carry
        k_start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(k_start, block_k), :]
        s = _dot(q, k, trans_b=True) * (scale * _LOG2E)
        if masked:
            k_pos = (k_start + jnp.arange(block_k, dtype=jnp.int32))[None, :]
            k_seg = None if kseg_ref is None else kseg_ref[pl.ds(k_start, block_k)][None, :]
            s = jnp.where(_visible(q_pos, k_pos, q_seg, k_seg, window), s, _MASK)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        v = v_ref[pl.ds(k_start, block_k), :]
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, l

    init = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    acc, m, l = _three_loops(range_refs, body, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log2(l)


def _dkdv_kernel(*refs, scale: float, window: int | None, block_q: int):
    range_refs = refs[:4]
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dk_ref, dv_ref = refs[4:]
    block_k, head_dim = k_ref.shape
    k_start = pl.program_id(0) * block_k
    k, v = k_ref[...], v_ref[...]
    k_pos = (k_start + jnp.arange(block_k, dtype=jnp.int32))[:, None]
    k_seg = None if kseg_ref is None else kseg_ref[...][:, None]

    def body(i, carry, masked):
        dk, dv = carry
        q_start = pl.multiple_of(i * block_q, block_q)
        rows = pl.ds(q_start, block_q)
        q, do = q_ref[rows, :], do_ref[rows, :]
        # Transposed scores, [block_k, block_q], so every product below has a plain left operand.
        st = _dot(k, q, trans_b=True) * (scale * _LOG2E)
        if masked:
            q_pos = (q_start + jnp.arange(block_q, dtype=jnp.int32))[None, :]
            q_seg = None if qseg_ref is None else qseg_ref[rows][None, :]
            st = jnp.where(_visible(q_pos, k_pos, q_seg, k_seg, window), st, _MASK)
        pt = jnp.exp2(st - lse_ref[rows][None, :])
        dv = dv + _dot(pt.astype(do.dtype), do)
        dpt = _dot(v, do, trans_b=True)
        dst = pt * (dpt - delta_ref[rows][None, :])
        dk = dk + _dot(dst.astype(q.dtype), q)
        return dk, dv

    zeros = jnp.zeros((block_k, head_dim), jnp.float32)
    dk, dv = _three_loops(range_refs, body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, scale: float, window: int | None, block_k: int, num_q_blocks: int):
    range_refs = refs[:4]
    q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref, qseg_ref, kseg_ref, dq_ref, delta_ref = refs[4:]
    block_q, head_dim = q_ref.shape
    q_start = (num_q_blocks - 1 - pl.program_id(0)) * block_q
    q, do = q_ref[...], do_ref[...]
    # delta_i = sum_k dO_ik O_ik, the row term of the softmax VJP; the dk/dv kernel reads it next.
    delta = jnp.sum(o_ref[...].astype(jnp.float32) * do.astype(jnp.float32), axis=1)
    delta_ref[...] = delta
    lse, delta = lse_ref[...][:, None], delta[:, None]
    q_pos = (q_start + jnp.arange(block_q, dtype=jnp.int32))[:, None]
    q_seg = None if qseg_ref is None else qseg_ref[...][:, None]

    def body(j, dq, masked):
        k_start = pl.multiple_of(j * block_k, block_k)
        cols = pl.ds(k_start, block_k)
        k, v = k_ref[cols, :], v_ref[cols, :]
        s = _dot(q, k, trans_b=True) * (scale * _LOG2E)
        if masked:
            k_pos = (k_start + jnp.arange(block_k, dtype=jnp.int32))[None, :]
            k_seg = None if kseg_ref is None else kseg_ref[cols][None, :]
            s = jnp.where(_visible(q_pos, k_pos, q_seg, k_seg, window), s, _MASK)
        p = jnp.exp2(s - lse)
        ds = p * (_dot(do, v, trans_b=True) - delta)
        return dq + _dot(ds.astype(k.dtype), k)

    dq = _three_loops(range_refs, body, jnp.zeros((block_q, head_dim), jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------- pallas calls


def _range_specs(index_map):
    """Four scalar BlockSpecs reading `[a, b, c, d]` of one row of a `[B, N, 4]` range table."""
    return [pl.BlockSpec((None, None, None), functools.partial(index_map, c)) for c in range(4)]


def _mosaic_ok(q: jax.Array, interpret: bool) -> bool:
    """bf16/f16, head dim a multiple of 64, and Hopper (wgmma) or its simulator."""
    if q.dtype not in (jnp.bfloat16, jnp.float16) or q.shape[-1] % 64:
        return False
    return interpret or getattr(jax.devices()[0], "compute_capability", None) == "9.0"


def _uses_mosaic(q: jax.Array, bs: BlockSizes, interpret: bool, documents: bool) -> bool:
    return bs.mosaic_forward and (bs.mosaic_documents or not documents) and _mosaic_ok(q, interpret)


def _uses_mosaic_bwd(q: jax.Array, bs: BlockSizes, interpret: bool) -> bool:
    return bs.mosaic_backward and _mosaic_ok(q, interpret)


def _forward(q, k, v, segment_ids, window, scale, bs: BlockSizes, interpret: bool):
    if _uses_mosaic(q, bs, interpret, segment_ids is not None):
        tiles = {"block_q": bs.block_q_mgpu, "block_k": bs.block_k_mgpu, "stages": bs.stages_mgpu}
        sim = plmgpu.InterpretGPUParams() if interpret else None
        return attention_mgpu.forward(
            q, k, v, segment_ids=segment_ids, window=window, scale=scale, interpret=sim, **tiles
        )
    b, t, h, d = q.shape
    nq = t // bs.block_q
    docs = None if segment_ids is None else _doc_bounds(segment_ids)
    ranges = _kv_ranges(b, t, bs.block_q, bs.block_k, window, docs)
    qi = lambda i: nq - 1 - i  # heaviest causal blocks first
    seg = segment_ids is not None
    in_specs = [
        *_range_specs(lambda c, i, bb, hh: (bb, qi(i), c)),
        pl.BlockSpec((None, bs.block_q, None, d), lambda i, bb, hh: (bb, qi(i), hh, 0)),
        pl.BlockSpec((None, t, None, d), lambda i, bb, hh: (bb, 0, hh, 0)),
        pl.BlockSpec((None, t, None, d), lambda i, bb, hh: (bb, 0, hh, 0)),
        pl.BlockSpec((None, bs.block_q), lambda i, bb, hh: (bb, qi(i))) if seg else None,
        pl.BlockSpec((None, t), lambda i, bb, hh: (bb, 0)) if seg else None,
    ]
    out_specs = [
        pl.BlockSpec((None, bs.block_q, None, d), lambda i, bb, hh: (bb, qi(i), hh, 0)),
        pl.BlockSpec((None, None, bs.block_q), lambda i, bb, hh: (bb, hh, qi(i))),
    ]
    kernel = functools.partial(_fwd_kernel, scale=scale, window=window, block_k=bs.block_k, num_q_blocks=nq)
    return pl.pallas_call(
        kernel,
        grid=(nq, b, h),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=[out_struct(q, q.shape, q.dtype), out_struct(q, (b, h, t), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="flash_attention_fwd",
    )(*(ranges,) * 4, q, k, v, segment_ids, segment_ids)


def _bwd_specs(t: int, d: int, seg: bool):
    """Specs for whole-sequence rows of one (batch, head): `[T, K]` tiles, `[T]` rows, `[T]` ids."""
    full = pl.BlockSpec((None, t, None, d), lambda i, bb, hh: (bb, 0, hh, 0))
    full_row = pl.BlockSpec((None, None, t), lambda i, bb, hh: (bb, hh, 0))
    full_seg = pl.BlockSpec((None, t), lambda i, bb, hh: (bb, 0)) if seg else None
    return full, full_row, full_seg


def _dkdv_call(q, k, v, do, lse, delta, segment_ids, window, scale, bs: BlockSizes, interpret: bool):
    b, t, h, d = q.shape
    seg = segment_ids is not None
    docs = _doc_bounds(segment_ids) if seg else None
    full, full_row, full_seg = _bwd_specs(t, d, seg)
    bq, bk = bs.block_q_dkv, bs.block_k_dkv
    tile = pl.BlockSpec((None, bk, None, d), lambda i, bb, hh: (bb, i, hh, 0))
    return pl.pallas_call(
        functools.partial(_dkdv_kernel, scale=scale, window=window, block_q=bq),
        grid=(t // bk, b, h),
        in_specs=[
            *_range_specs(lambda c, i, bb, hh: (bb, i, c)),
            *(full, tile, tile, full, full_row, full_row),
            full_seg,
            pl.BlockSpec((None, bk), lambda i, bb, hh: (bb, i)) if seg else None,
        ],
        out_specs=[tile, tile],
        out_shape=[out_struct(k, k.shape, k.dtype), out_struct(v, v.shape, v.dtype)],
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps_dkv, num_stages=bs.num_stages_dkv),
        interpret=interpret,
        name="flash_attention_dkdv",
    )(*(_q_ranges(b, t, bq, bk, window, docs),) * 4, q, k, v, do, lse, delta, segment_ids, segment_ids)


def _dq_call(q, k, v, o, do, lse, segment_ids, window, scale, bs: BlockSizes, interpret: bool):
    """dq, and the softmax-VJP row term delta `[B, H, T]` f32 for the dk/dv kernel."""
    b, t, h, d = q.shape
    seg = segment_ids is not None
    docs = _doc_bounds(segment_ids) if seg else None
    full, _, full_seg = _bwd_specs(t, d, seg)
    bq, bk, nq = bs.block_q_dq, bs.block_k_dq, t // bs.block_q_dq
    qi = lambda i: nq - 1 - i  # heaviest causal blocks first
    tile = pl.BlockSpec((None, bq, None, d), lambda i, bb, hh: (bb, qi(i), hh, 0))
    row = pl.BlockSpec((None, None, bq), lambda i, bb, hh: (bb, hh, qi(i)))
    return pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, window=window, block_k=bk, num_q_blocks=nq),
        grid=(nq, b, h),
        in_specs=[
            *_range_specs(lambda c, i, bb, hh: (bb, qi(i), c)),
            *(tile, full, full, tile, tile, row),
            pl.BlockSpec((None, bq), lambda i, bb, hh: (bb, qi(i))) if seg else None,
            full_seg,
        ],
        out_specs=[tile, row],
        out_shape=[out_struct(q, q.shape, q.dtype), out_struct(q, (b, h, t), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps_dq, num_stages=bs.num_stages_dq),
        interpret=interpret,
        name="flash_attention_dq",
    )(*(_kv_ranges(b, t, bq, bk, window, docs),) * 4, q, k, v, o, do, lse, segment_ids, segment_ids)


def _backward(q, k, v, segment_ids, o, lse, do, window, scale, bs: BlockSizes, interpret: bool):
    if _uses_mosaic_bwd(q, bs, interpret):
        tiles = {
            "block_q_dq": bs.block_q_dq_mgpu,
            "block_k_dq": bs.block_k_dq_mgpu,
            "block_q_dkv": bs.block_q_dkv_mgpu,
            "block_k_dkv": bs.block_k_dkv_mgpu,
            "stages": bs.stages_bwd_mgpu,
        }
        sim = plmgpu.InterpretGPUParams() if interpret else None
        return attention_mgpu_bwd.backward(
            q, k, v, o, lse, do, segment_ids=segment_ids, window=window, scale=scale, interpret=sim, **tiles
        )
    rest = (window, scale, bs, interpret)
    dq, delta = _dq_call(q, k, v, o, do, lse, segment_ids, *rest)
    dk, dv = _dkdv_call(q, k, v, do, lse, delta, segment_ids, *rest)
    return dq, dk, dv


# ----------------------------------------------------------------------------- public API


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, segment_ids, window, scale, bs, interpret):
    return _forward(q, k, v, segment_ids, window, scale, bs, interpret)[0]


def _flash_fwd(q, k, v, segment_ids, window, scale, bs, interpret):
    o, lse = _forward(q, k, v, segment_ids, window, scale, bs, interpret)
    return o, (q, k, v, segment_ids, o, lse)


def _flash_bwd(window, scale, bs, interpret, res, do):
    q, k, v, segment_ids, o, lse = res
    dq, dk, dv = _backward(q, k, v, segment_ids, o, lse, do, window, scale, bs, interpret)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(jax.jit, static_argnames=("window", "scale", "block_sizes", "interpret"))
def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    window: int | None = None,
    scale: float,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Causal flash attention with an optional sliding window and document mask.

    Args:
      q, k, v: `[B, T, H, K]`, bf16 (f32 also works); K a power of two, at least 16.
      segment_ids: optional `[B, T]` int32 document ids; each document one contiguous run.
      window: optional static int; query i sees keys i - window .. i. Each value compiles once.
      scale: softmax scale applied to q.k (static; the recipes use 0.12).
      block_sizes: tiles and launch settings; `BlockSizes.get_default()` if None.
      interpret: run the Pallas interpreter (CPU tests) instead of compiling for the GPU.

    Returns:
      `[B, T, H, K]` in q's dtype; softmax statistics and products accumulate in f32.
    """
    if not q.shape == k.shape == v.shape:
        raise ValueError(f"q, k, v must share one shape, got {q.shape}, {k.shape}, {v.shape}")
    if window is not None and window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    b, t = q.shape[:2]
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids must be {(b, t)}, got {segment_ids.shape}")
    bs = (block_sizes or BlockSizes.get_default()).fit(t)
    multiple = max(bs.blocks)
    if _uses_mosaic(q, bs, interpret, segment_ids is not None):
        multiple = math.lcm(multiple, 2 * bs.block_q_mgpu, bs.block_k_mgpu)
    if _uses_mosaic_bwd(q, bs, interpret):
        tiles = (2 * bs.block_q_dq_mgpu, bs.block_k_dq_mgpu, bs.block_q_dkv_mgpu, 2 * bs.block_k_dkv_mgpu)
        multiple = math.lcm(multiple, *tiles)
    tp = -(-t // multiple) * multiple
    if tp != t:
        # Padded keys sit after every real query, so the causal mask already hides them; padded
        # queries get a document of their own and their rows are dropped below.
        q, k, v = (jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0))) for x in (q, k, v))
        if segment_ids is not None:
            tail = jnp.broadcast_to(segment_ids[:, -1:] + 1, (b, tp - t))
            segment_ids = jnp.concatenate([segment_ids, tail.astype(segment_ids.dtype)], axis=1)
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
    return _flash(q, k, v, segment_ids, window, float(scale), bs, interpret)[:, :t]


def attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    window: int | None = None,
    scale: float,
) -> jax.Array:
    """Plain-JAX f32 attention with the same masks, materialising `[B, H, T, T]`."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    t = q.shape[1]
    hi = lax.Precision.HIGHEST
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=hi) * scale
    pos = jnp.arange(t)
    seg = (
        (None, None)
        if segment_ids is None
        else (segment_ids[:, None, :, None], segment_ids[:, None, None, :])
    )
    mask = _visible(pos[None, None, :, None], pos[None, None, None, :], *seg, window)
    logits = jnp.where(mask, logits, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v, precision=hi)
