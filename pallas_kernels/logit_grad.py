"""The head's logit gradient and its bias's column sum in one Pallas pass.

For softcapped cross-entropy over saved raw logits `zraw = h·W` (bf16, `[N, V]`):

    z = zraw + b (in bf16),  s = cap(z),  p = exp(s − lse),
    dz = (p − onehot(target)) · ds/dz · g,   written in bf16,   db = Σ_rows dz (of the bf16 dz)

XLA runs this as an elementwise fusion that writes `dz`, then a column reduction that reads all
of it back for `db` (6.6 GB a 64-sequence micro-batch at V = 50,304, about 1.7 TB/s; docs/PERF.md).
Here a program owns `block_rows` rows × `block_v` columns: it walks its rows in `block_m`-row
slices, writes each slice of `dz` and adds it to a `[block_m, block_v]` float32 sum in registers,
summed over rows once at the end into one partial row of `db`. XLA adds the `[N / block_rows, V]`
float32 partials.

Caps: 'isru' (`c·z/√(z² + c²)`) and 'tanh' (`c·tanh(z/c)`), as `jaxrun.model.head_loss`.
V must be a multiple of `block_v` (50,304 = 393 · 128) and N of `block_rows`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.shapes import out_struct

_F32 = jnp.float32
CAPS = ("isru", "tanh")
# the tiling arguments of both logit passes, static under jit
STATIC_TILING = ("block_rows", "block_m", "block_v", "num_warps", "num_stages", "interpret")


def softcap(z: jax.Array, cap: str, c: float) -> tuple[jax.Array, jax.Array]:
    """Capped logits and ds/dz in float32 (the logit passes share it)."""
    if cap == "isru":
        r = lax.rsqrt(z * z + c * c)
        return c * z * r, (c * r) ** 3
    t = jnp.tanh(z / c)
    return c * t, 1.0 - t * t


def _dz(zraw, b, targets, lse, g, cols, cap: str, c: float):
    """dL/dz in float32 for `[rows, cols]` raw logits; `cols` holds each column's vocabulary index."""
    z = zraw if b is None else zraw + b.astype(zraw.dtype)[None]
    s, ds_dz = softcap(z.astype(_F32), cap, c)
    p = jnp.exp(s - lse[:, None])
    return (jnp.where(cols == targets[:, None], p - 1.0, p) * ds_dz) * g[:, None]


def reference(zraw_NV, b_V, targets_N, lse_N, g_N, *, cap: str, cap_value: float):
    """`(dz [N, V] in zraw's dtype, db [V] float32 or None)` in plain JAX. `g_N` is each row's
    loss gradient, zero on ignored rows (the kernel reads targets only to find the target column)."""
    cols = lax.broadcasted_iota(jnp.int32, zraw_NV.shape, 1)
    dz = _dz(zraw_NV, b_V, targets_N, lse_N, g_N, cols, cap, cap_value).astype(zraw_NV.dtype)
    return dz, None if b_V is None else jnp.sum(dz.astype(_F32), axis=0)


def _kernel(zraw_ref, *refs, has_bias: bool, block_m: int, cap: str, c: float):
    refs = list(refs)
    b_ref = refs.pop(0) if has_bias else None
    targets_ref, lse_ref, g_ref, dz_ref = refs[:4]
    db_ref = refs[4] if has_bias else None
    block_rows, block_v = zraw_ref.shape
    cols = pl.program_id(1) * block_v + lax.broadcasted_iota(jnp.int32, (block_m, block_v), 1)
    b = b_ref[...] if has_bias else None

    def rows(i, total):
        at = pl.ds(pl.multiple_of(i * block_m, block_m), block_m)
        dz = _dz(zraw_ref[at, :], b, targets_ref[at], lse_ref[at], g_ref[at], cols, cap, c)
        dz = dz.astype(dz_ref.dtype)
        dz_ref[at, :] = dz
        return total + dz.astype(_F32) if has_bias else total

    # the running column sums stay in registers, one per slice entry; rows are summed across once
    zeros = jnp.zeros((block_m, block_v) if has_bias else (), _F32)
    total = lax.fori_loop(0, block_rows // block_m, rows, zeros)
    if has_bias:
        db_ref[...] = jnp.sum(total, axis=0)


@functools.partial(
    jax.jit,
    static_argnames=("cap", "cap_value", *STATIC_TILING),
)
def logit_grad(
    zraw_NV: jax.Array,
    b_V: jax.Array | None,
    targets_N: jax.Array,
    lse_N: jax.Array,
    g_N: jax.Array,
    *,
    cap: str,
    cap_value: float,
    block_rows: int = 1024,
    block_m: int = 16,
    block_v: int = 128,
    num_warps: int = 8,
    num_stages: int = 3,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """`(dz, db)` as `reference`, in one pass over the raw logits. Blocks shrink to fit small N."""
    n, v = zraw_NV.shape
    if cap not in CAPS:
        raise ValueError(f"logit_grad: cap must be one of {CAPS}, got {cap!r}")
    if v % block_v:
        raise ValueError(f"logit_grad: the vocabulary V = {v} must be a multiple of block_v = {block_v}")
    block_rows = min(block_rows, n & -n)  # the largest power of two dividing N, at most block_rows
    block_m = min(block_m, block_rows)
    if (targets_N.shape, lse_N.shape, g_N.shape) != ((n,), (n,), (n,)):
        raise ValueError(
            f"logit_grad: need targets, lse and g of shape ({n},), got {targets_N.shape}, {lse_N.shape}, {g_N.shape}"
        )
    has_bias = b_V is not None
    tile = pl.BlockSpec((block_rows, block_v), lambda i, j: (i, j))
    per_row = pl.BlockSpec((block_rows,), lambda i, j: (i,))
    in_specs = [tile] + ([pl.BlockSpec((block_v,), lambda i, j: (j,))] if has_bias else [])
    in_specs += [per_row, per_row, per_row]
    out_specs, out_shape = [tile], [out_struct(zraw_NV, (n, v), zraw_NV.dtype)]
    if has_bias:
        out_specs.append(pl.BlockSpec((None, block_v), lambda i, j: (i, j)))
        out_shape.append(out_struct(zraw_NV, (n // block_rows, v), _F32))
    args = [zraw_NV] + ([b_V] if has_bias else []) + [targets_N, lse_N.astype(_F32), g_N.astype(_F32)]
    outs = pl.pallas_call(
        functools.partial(_kernel, has_bias=has_bias, block_m=block_m, cap=cap, c=float(cap_value)),
        grid=(n // block_rows, v // block_v),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="softcap_ce_logit_grad",
    )(*args)
    return outs[0], (outs[1].sum(axis=0) if has_bias else None)
