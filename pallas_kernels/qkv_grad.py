"""The QKV projection's output gradient in one Pallas pass: QK-norm and RoPE backward, V copied in.

The attention computes, per head and token, from the projected (biased) `q` and `k`:

    q' = rope(rmsnorm(q)),   k' = rope(rmsnorm(k))      (norm without a gain, 'halves' RoPE)

and attends over `q'`, `k'` and `v`. Given the attention's gradients `dq'`, `dk'`, `dv`, the
projection needs `dqkv = [dq | dk | dv]` (`[N, 3F]`, F = heads · head_dim) for one GEMM each of
`dh = dqkv · W_qkvᵀ` and `dW_qkv = hᵀ · dqkv`, and its column sums for the biases. Per head row:

    g = rope⁻¹(dq') = (dq'₁ c − dq'₂ s, dq'₁ s + dq'₂ c),  rounded to the activations' dtype
    dq = rstd · (g − q̂ · mean(g · q̂)),   q̂ = q · rstd

XLA runs this as a row-reduction fusion for both means and one fusion per `dq` and `dk`; autodiff
then adds the three GEMMs' `dh` in a fourth pass and sums each bias's column in three more (66.3 ms
of `simple`'s step on an H100; this pass takes 30.4 ms, about 2.5 TB/s; docs/PERF.md). Here a
program owns `block_rows` tokens of one head: it reads that head's `dq'`, `dk'`, `dv`, `q`, `k`
once, writes its three slices of `dqkv`, and with `column_sum` also its partial column sums
(`[N / block_rows, 3F]` float32, added by XLA).

The roundings are autodiff's: `g` and `dq` rounded to the activations' dtype. RoPE's tables are
`[T, K/2]` (cos, sin per position and pair); the tokens are `B · T` rows, so a block of rows never
crosses a sequence and reads the tables' rows at `row mod T`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.shapes import out_struct

_F32 = jnp.float32


def _unrope(dy1, dy2, cos, sin, dtype):
    """RoPE's transpose on the two halves (float32 in), rounded to `dtype` and back to float32."""
    g1 = (dy1 * cos - dy2 * sin).astype(dtype).astype(_F32)
    g2 = (dy1 * sin + dy2 * cos).astype(dtype).astype(_F32)
    return g1, g2


def _unnorm(g1, g2, x1, x2, rstd):
    """RMSNorm's backward (no gain) on the halves of a head, float32."""
    xh1, xh2 = x1 * rstd, x2 * rstd
    mean = (jnp.sum(g1 * xh1, axis=-1, keepdims=True) + jnp.sum(g2 * xh2, axis=-1, keepdims=True)) / (
        2 * x1.shape[-1]
    )
    return rstd * (g1 - xh1 * mean), rstd * (g2 - xh2 * mean)


def reference(dq_NF, dk_NF, dv_NF, q_NF, k_NF, rstd_q_HN, rstd_k_HN, cos_TR, sin_TR, *, heads, column_sum):
    """`(dqkv [N, 3F] in dq's dtype, Σ_rows dqkv [3F] float32 or None)` in plain JAX."""
    n, f = q_NF.shape
    dtype, half = dq_NF.dtype, f // heads // 2
    t = cos_TR.shape[0]
    cos = jnp.tile(cos_TR.astype(_F32), (n // t, 1))[:, None, :]  # [N, 1, K/2]
    sin = jnp.tile(sin_TR.astype(_F32), (n // t, 1))[:, None, :]

    def one(dy_NF, x_NF, rstd_HN):
        dy = dy_NF.reshape(n, heads, 2, half).astype(_F32)
        x = x_NF.reshape(n, heads, 2, half).astype(_F32)
        g1, g2 = _unrope(dy[:, :, 0], dy[:, :, 1], cos, sin, dtype)
        d1, d2 = _unnorm(g1, g2, x[:, :, 0], x[:, :, 1], rstd_HN.T[:, :, None])
        return jnp.stack([d1, d2], axis=2).astype(dtype).reshape(n, f)

    dqkv = jnp.concatenate([one(dq_NF, q_NF, rstd_q_HN), one(dk_NF, k_NF, rstd_k_HN), dv_NF], axis=1)
    return dqkv, jnp.sum(dqkv.astype(_F32), axis=0) if column_sum else None


def _kernel(
    dq_ref,
    dk_ref,
    dv_ref,
    q_ref,
    k_ref,
    rq_ref,
    rk_ref,
    cos_ref,
    sin_ref,
    out_ref,
    *sum_refs,
    chunk: int,
    f: int,
):
    block_rows, width = q_ref.shape
    half = width // 2
    row0, head = pl.program_id(0) * block_rows, pl.program_id(1)
    lo, hi = pl.ds(0, half), pl.ds(half, half)

    def rows(i, sums):
        at = pl.ds(pl.multiple_of(i * chunk, chunk), chunk)
        cos, sin = cos_ref[at, :].astype(_F32), sin_ref[at, :].astype(_F32)
        out_rows = pl.ds(pl.multiple_of(row0 + i * chunk, chunk), chunk)
        parts = []
        for part, (dy_ref, x_ref, r_ref) in enumerate(((dq_ref, q_ref, rq_ref), (dk_ref, k_ref, rk_ref))):
            dy1, dy2 = dy_ref[at, lo].astype(_F32), dy_ref[at, hi].astype(_F32)
            g1, g2 = _unrope(dy1, dy2, cos, sin, out_ref.dtype)
            rstd = r_ref[at][:, None]
            d1, d2 = _unnorm(g1, g2, x_ref[at, lo].astype(_F32), x_ref[at, hi].astype(_F32), rstd)
            col = part * f + head * width
            d1, d2 = d1.astype(out_ref.dtype), d2.astype(out_ref.dtype)
            out_ref[out_rows, pl.ds(col, half)] = d1
            out_ref[out_rows, pl.ds(col + half, half)] = d2
            parts += [d1, d2]
        dv1, dv2 = dv_ref[at, lo], dv_ref[at, hi]
        col = 2 * f + head * width
        out_ref[out_rows, pl.ds(col, half)] = dv1
        out_ref[out_rows, pl.ds(col + half, half)] = dv2
        parts += [dv1, dv2]
        return tuple(s + p.astype(_F32) for s, p in zip(sums, parts))

    zeros = tuple(jnp.zeros((chunk, half), _F32) for _ in range(6))
    sums = jax.lax.fori_loop(0, block_rows // chunk, rows, zeros)
    if sum_refs:
        (sum_ref,) = sum_refs
        for j, s in enumerate(sums):  # q lo, q hi, k lo, k hi, v lo, v hi
            part, second = divmod(j, 2)
            sum_ref[pl.ds(part * f + head * width + second * half, half)] = jnp.sum(s, axis=0)


@functools.partial(
    jax.jit,
    static_argnames=(
        "heads",
        "column_sum",
        "block_rows",
        "chunk_rows",
        "num_warps",
        "num_stages",
        "interpret",
    ),
)
def qkv_grad(
    dq_NF: jax.Array,
    dk_NF: jax.Array,
    dv_NF: jax.Array,
    q_NF: jax.Array,
    k_NF: jax.Array,
    rstd_q_HN: jax.Array,
    rstd_k_HN: jax.Array,
    cos_TR: jax.Array,
    sin_TR: jax.Array,
    *,
    heads: int,
    column_sum: bool = False,
    block_rows: int = 128,
    chunk_rows: int = 16,
    num_warps: int = 8,
    num_stages: int = 1,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """`(dqkv, Σ_rows dqkv)` as `reference`, in one pass.

    dq, dk, dv: the attention's gradients `[N, F]` (N = B·T tokens, F = heads · head_dim), the
    rotated side for q and k. q, k: the projection's outputs before the norm, `[N, F]`. rstd:
    the forward's `1/√(mean(x²) + eps)` per head and token, `[heads, N]` float32. cos, sin:
    RoPE's `[T, head_dim / 2]` tables, T dividing N. `block_rows` and `chunk_rows` (powers of two)
    are upper bounds, shrunk to divide T. `num_warps` and `num_stages`: Triton's warps per program
    and software-pipelining depth of the chunk loop.
    """
    n, f = q_NF.shape
    t, half = cos_TR.shape
    width = f // heads if heads > 0 and f % heads == 0 else 0
    if width < 32 or width & (width - 1) or 2 * half != width:
        raise ValueError(
            f"qkv_grad: need F = {f} split into {heads} heads of a power-of-two width >= 32 and "
            f"tables of half that width, got tables {cos_TR.shape}"
        )
    if any(a.shape != (n, f) for a in (dq_NF, dk_NF, dv_NF, k_NF)) or n % t or sin_TR.shape != (t, half):
        raise ValueError(
            f"qkv_grad: need dq, dk, dv, q, k of one shape [N, F] with N a multiple of the tables' T, "
            f"got {[a.shape for a in (dq_NF, dk_NF, dv_NF, q_NF, k_NF)]}, tables {cos_TR.shape}, {sin_TR.shape}"
        )
    if rstd_q_HN.shape != (heads, n) or rstd_k_HN.shape != (heads, n):
        raise ValueError(
            f"qkv_grad: need rstd [heads, N] = {(heads, n)}, got {rstd_q_HN.shape}, {rstd_k_HN.shape}"
        )
    for name, value in (("block_rows", block_rows), ("chunk_rows", chunk_rows)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"qkv_grad: {name} = {value} must be a power of two")
    bn = min(block_rows, t & -t)  # rows of one program: a power of two dividing T
    chunk = min(chunk_rows, bn)
    head_block = pl.BlockSpec((bn, width), lambda i, h: (i, h))
    rstd_block = pl.BlockSpec((None, bn), lambda i, h: (h, i))
    table_block = pl.BlockSpec((bn, half), lambda i, h: (i % (t // bn), 0))
    # dqkv is written a head's three slices at a time: each program sees the whole array
    out_specs, out_shape = [pl.BlockSpec()], [out_struct(dq_NF, (n, 3 * f), dq_NF.dtype)]
    if column_sum:
        out_specs.append(pl.BlockSpec((None, 3 * f), lambda i, h: (i, 0)))
        out_shape.append(out_struct(dq_NF, (n // bn, 3 * f), _F32))
    outs = pl.pallas_call(
        functools.partial(_kernel, chunk=chunk, f=f),
        grid=(n // bn, heads),
        in_specs=[head_block] * 5 + [rstd_block] * 2 + [table_block] * 2,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="qkv_grad",
    )(dq_NF, dk_NF, dv_NF, q_NF, k_NF, rstd_q_HN.astype(_F32), rstd_k_HN.astype(_F32), cos_TR, sin_TR)
    return outs[0], outs[1].sum(axis=0) if column_sum else None
