"""RMSNorm's backward and the residual stream's gradient in one Pallas pass.

A sublayer reads the residual stream `x` twice: through its norm, `y = x·rstd·gain` with
`rstd = 1/sqrt(mean(x²) + eps)`, and through the skip path. Its gradient is therefore
`r + dx`, where `r` is the gradient that reached the stream from above and

    xhat = x·rstd,   gy = g·gain,   dx = rstd·(gy − xhat·mean(gy·xhat)),   dgain = Σ_rows g·xhat

for the norm's output gradient `g`. XLA splits this into a row-reduction fusion (the mean) and
a multi-output fusion that writes `r + dx` and the gain's column sums; the second runs at about
a third of the card's memory bandwidth (docs/PERF.md). Here one program owns a block of rows
and walks it a few rows at a time: it reads `x`, `g` and `r` once, keeps each slice's rows in
registers for the row mean, writes `r + dx`, and keeps the gain's column terms as running sums in
registers; at the end it writes its block's partial `dgain`. XLA sums the partials
(`[N / block_rows, D]`, float32).

With `column_sum`, the kernel also sums the columns of `r + dx`: the gradient of a bias added to
the stream just before the norm (the model folds each sublayer's output bias into the next norm's
input, so no separate reduction has to read the stream's gradient again).

`dx` is rounded to the stream's dtype before it is added to `r`, as autodiff (and torch, which
accumulates the stream's gradient in bf16) does it. Rows are loaded in power-of-two column
slices, as Triton wants, so D may be any multiple of 16 (768 is three slices of 256).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.shapes import out_struct

_F32 = jnp.float32


def reference(x_ND, g_ND, r_ND, rstd_N, gain_D, column_sum=False):
    """`(r + dx, dgain, Σ_rows (r + dx))` in plain JAX: the function the kernel computes (dgain None
    without a gain, the column sum None unless asked)."""
    xhat = x_ND.astype(_F32) * rstd_N[:, None]
    gf = g_ND.astype(_F32)
    gy = gf if gain_D is None else gf * gain_D.astype(_F32)[None]
    dx = rstd_N[:, None] * (gy - xhat * jnp.mean(gy * xhat, axis=1, keepdims=True))
    out = (r_ND.astype(_F32) + dx.astype(r_ND.dtype).astype(_F32)).astype(r_ND.dtype)
    dgain = None if gain_D is None else jnp.sum(gf * xhat, axis=0).astype(gain_D.dtype)
    return out, dgain, jnp.sum(out.astype(_F32), axis=0) if column_sum else None


def _column_slices(d: int) -> list[pl.Slice]:
    width = min(d & -d, 256)  # the largest power of two dividing D, at most 256
    if width < 16:
        raise ValueError(f"rms_norm_bwd: the width D = {d} must be a multiple of 16")
    return [pl.ds(c, width) for c in range(0, d, width)]


def _kernel(x_ref, g_ref, r_ref, rstd_ref, *refs, has_gain: bool, column_sum: bool, chunk: int):
    refs = list(refs)
    gain_ref = refs.pop(0) if has_gain else None
    out_ref = refs.pop(0)
    dgain_ref = refs.pop(0) if has_gain else None
    sum_ref = refs.pop(0) if column_sum else None
    cols = _column_slices(x_ref.shape[1])
    gain = [gain_ref[c].astype(_F32)[None, :] for c in cols] if has_gain else None

    def rows(i, sums):
        """`chunk` rows: write r + dx, add their column terms to the [chunk, width] running sums."""
        dgain, total = sums
        at = pl.ds(pl.multiple_of(i * chunk, chunk), chunk)
        rstd = rstd_ref[at][:, None]
        xhat = [x_ref[at, c].astype(_F32) * rstd for c in cols]
        g = [g_ref[at, c].astype(_F32) for c in cols]
        gy = [gi * ga for gi, ga in zip(g, gain)] if has_gain else g
        mean = sum(jnp.sum(a * b, axis=1, keepdims=True) for a, b in zip(gy, xhat)) / x_ref.shape[1]
        outs = []
        for c, a, b in zip(cols, gy, xhat):
            dx = (rstd * (a - b * mean)).astype(out_ref.dtype)
            out = (r_ref[at, c].astype(_F32) + dx.astype(_F32)).astype(out_ref.dtype)
            out_ref[at, c] = out
            outs.append(out.astype(_F32))
        dgain = tuple(s + gi * b for s, gi, b in zip(dgain, g, xhat))
        total = tuple(s + o for s, o in zip(total, outs))
        return dgain, total

    zeros = tuple(jnp.zeros((chunk, c.size), _F32) for c in cols)
    # the running sums stay in registers; rows are summed across once, at the end
    dgain, total = jax.lax.fori_loop(0, x_ref.shape[0] // chunk, rows, (zeros, zeros))
    for c, dg, t in zip(cols, dgain, total):
        if has_gain:
            dgain_ref[c] = jnp.sum(dg, axis=0)
        if column_sum:
            sum_ref[c] = jnp.sum(t, axis=0)


@functools.partial(
    jax.jit, static_argnames=("column_sum", "block_rows", "chunk_rows", "num_warps", "interpret")
)
def rms_norm_bwd(
    x_ND: jax.Array,
    g_ND: jax.Array,
    r_ND: jax.Array,
    rstd_N: jax.Array,
    gain_D: jax.Array | None,
    *,
    column_sum: bool = False,
    block_rows: int = 64,
    chunk_rows: int = 4,
    num_warps: int = 4,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """`(r + dx [N, D] in r's dtype, dgain [D] in gain's dtype or None, Σ_rows (r + dx) [D] float32
    or None)`; see `reference`.

    `block_rows` (a power of two) is an upper bound: a block of N's largest power-of-two divisor
    up to it is used, so any N works. A program walks its block in slices of `chunk_rows` rows,
    keeping the gain's and columns' sums in registers, and writes one partial row of each.
    """
    n, d = x_ND.shape
    for name, value in (("block_rows", block_rows), ("chunk_rows", chunk_rows)):
        if value & (value - 1) or value < 1:
            raise ValueError(f"rms_norm_bwd: {name} = {value} must be a power of two")
    if g_ND.shape != (n, d) or r_ND.shape != (n, d) or rstd_N.shape != (n,):
        raise ValueError(
            f"rms_norm_bwd: need x, g, r [N, D] and rstd [N], got {x_ND.shape}, {g_ND.shape}, "
            f"{r_ND.shape}, {rstd_N.shape}"
        )
    _column_slices(d)
    bn = min(block_rows, n & -n)
    chunk = min(chunk_rows, bn)
    has_gain = gain_D is not None
    rows = pl.BlockSpec((bn, d), lambda i: (i, 0))
    in_specs = [rows, rows, rows, pl.BlockSpec((bn,), lambda i: (i,))]
    out_specs, out_shape = [rows], [out_struct(r_ND, (n, d), r_ND.dtype)]
    args = [x_ND, g_ND, r_ND, rstd_N.astype(_F32)]
    if has_gain:
        in_specs.append(pl.BlockSpec((d,), lambda i: (0,)))
        args.append(gain_D)
        out_specs.append(pl.BlockSpec((None, d), lambda i: (i, 0)))
        out_shape.append(out_struct(r_ND, (n // bn, d), _F32))
    if column_sum:
        out_specs.append(pl.BlockSpec((None, d), lambda i: (i, 0)))
        out_shape.append(out_struct(r_ND, (n // bn, d), _F32))
    outs = pl.pallas_call(
        functools.partial(_kernel, has_gain=has_gain, column_sum=column_sum, chunk=chunk),
        grid=(n // bn,),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="rms_norm_bwd",
    )(*args)
    partials = iter(outs[1:])
    dgain = next(partials).sum(axis=0).astype(gain_D.dtype) if has_gain else None
    return outs[0], dgain, next(partials).sum(axis=0) if column_sum else None
