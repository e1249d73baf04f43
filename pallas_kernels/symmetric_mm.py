"""Symmetric products for Newton–Schulz: `X·Xᵀ`, `Xᵀ·X` and `b·A + c·A·A` for symmetric `A`.

Each output is symmetric, so the kernels compute only the tiles on and above
the diagonal and store each off-diagonal tile twice, as itself and mirrored:
about half the FLOPs of a full matmul (record #77's symmetric kernels, by
@byronxu99 in modded-nanogpt). The 1-D grid runs over (matrix, upper-triangle
tile) pairs only, `B · t(t+1)/2` programs for `t` tiles a side, not a full
`t × t` grid with early exits. Inputs are `[..., m, n]` batches of matrices;
products accumulate in fp32 and are rounded once to the input dtype. Each has
a `custom_vjp` whose backward is two plain XLA matmuls. Kernels are portable
`pallas_call`s with BlockSpecs (Triton on GPU), so `interpret=True` runs them
on CPU.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.shapes import out_struct

_F32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))  # a @ bᵀ
_TN = (((0,), (0,)), ((), ()))  # aᵀ @ b
_SMEM = 200 * 1024  # pipeline buffers of the K loop, below H100's 227 KiB


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Tiling of the symmetric kernels.

    Attributes:
      block_m: side of the square output tile (a power of two, >= 16).
      block_k: slice of the contraction loaded per pipeline stage.
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining depth of the K loop.
    """

    # Record #77's Triton config for its 768-wide Gram matrices (tuned on H100 there).
    block_m: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 4

    @classmethod
    def get_default(cls) -> "BlockSizes":
        return cls()


def _fit(bs: BlockSizes, out_dim: int, contract_dim: int, itemsize: int) -> BlockSizes:
    """Shrinks tiles to small problems and to shared memory."""
    if bs.block_m & (bs.block_m - 1) or bs.block_k & (bs.block_k - 1):
        raise ValueError(f"block_m={bs.block_m} and block_k={bs.block_k} must be powers of two")
    bs = dataclasses.replace(
        bs,
        block_m=min(bs.block_m, max(16, pl.next_power_of_2(out_dim))),
        block_k=min(bs.block_k, max(16, pl.next_power_of_2(contract_dim))),
    )
    # Each pipeline stage holds a [block_m, block_k] slice of both strips.
    while bs.block_k > 16 and bs.num_stages * 2 * bs.block_m * bs.block_k * itemsize > _SMEM:
        bs = dataclasses.replace(bs, block_k=bs.block_k // 2)
    return bs


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _precision(dtype) -> lax.Precision | None:
    # fp32 checks want full fp32 products (IEEE on GPU, not TF32).
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == _F32 else None


# ----------------------------------------------------------------------------
# Tiles of the upper triangle


def _num_upper_tiles(tiles: int) -> int:
    return tiles * (tiles + 1) // 2


def _upper_tile(t, tiles: int):
    """(row, col) of the `t`-th tile of the upper triangle, counted row by row."""
    # Row r starts at r·tiles - r(r-1)/2; the row is the number of later starts t has reached.
    row = jnp.int32(0)
    for r in range(1, tiles):
        row = row + (t >= r * tiles - r * (r - 1) // 2).astype(jnp.int32)
    return row, t - (row * tiles - row * (row - 1) // 2) + row


def _program_tile(p, tiles: int):
    """(matrix, row tile, col tile) of program `p`."""
    per_matrix = _num_upper_tiles(tiles)
    row, col = _upper_tile(p % per_matrix, tiles)
    return p // per_matrix, row, col


def _strip_product(a_ref, b_ref, *, block_k: int, rows: bool) -> jax.Array:
    """fp32 `a @ bᵀ` of two `[bm, K]` strips, or `aᵀ @ b` of two `[K, bm]` strips (`rows`)."""
    k_dim = a_ref.shape[0] if rows else a_ref.shape[1]
    precision = _precision(a_ref.dtype)

    def product(k):
        # The first slice's start is a Python 0, which multiple_of cannot annotate on the GPU.
        start = k * block_k if isinstance(k, int) else pl.multiple_of(k * block_k, block_k)
        ks = pl.ds(start, block_k)
        a, b = (a_ref[ks, :], b_ref[ks, :]) if rows else (a_ref[:, ks], b_ref[:, ks])
        return lax.dot_general(a, b, _TN if rows else _NT, precision=precision, preferred_element_type=_F32)

    # The first slice starts the sum: a zeros carry would not vary over the mesh axes the
    # operands vary over, which the interpreter rejects inside shard_map.
    return lax.fori_loop(1, k_dim // block_k, lambda k, acc: acc + product(k), product(0))


def _store_mirrored(out_ref, tile: jax.Array, tiles: int) -> None:
    """Writes this program's tile at (row, col) of the `[M, M]` output and, off the diagonal, its
    transpose at (col, row)."""
    block_m = tile.shape[0]
    _, row, col = _program_tile(pl.program_id(0), tiles)
    rows = pl.ds(pl.multiple_of(row * block_m, block_m), block_m)
    cols = pl.ds(pl.multiple_of(col * block_m, block_m), block_m)
    out_ref[rows, cols] = tile

    @pl.when(row != col)
    def _():
        out_ref[cols, rows] = tile.T


def _gram_kernel(a_ref, b_ref, out_ref, *, block_k: int, rows: bool, tiles: int):
    acc = _strip_product(a_ref, b_ref, block_k=block_k, rows=rows)
    _store_mirrored(out_ref, acc.astype(out_ref.dtype), tiles)


def _poly_kernel(
    a_rows_ref, a_cols_ref, a_tile_ref, out_ref, *, b: float, c: float, block_k: int, tiles: int
):
    # (A·A)[i, j] = A[i, :] · A[:, j] = A[i, :] · A[j, :]ᵀ, as A is symmetric.
    acc = _strip_product(a_rows_ref, a_cols_ref, block_k=block_k, rows=False)
    out = b * a_tile_ref[...].astype(_F32) + c * acc
    _store_mirrored(out_ref, out.astype(out_ref.dtype), tiles)


def _triangle_call(kernel, operands, in_specs, out_dim: int, bs: BlockSizes, interpret: bool, name: str):
    """Launches `kernel` once per (matrix, upper tile); the output is `[B, out_dim, out_dim]`."""
    batch = operands[0].shape[0]
    tiles = out_dim // bs.block_m
    return pl.pallas_call(
        functools.partial(kernel, block_k=bs.block_k, tiles=tiles),
        grid=(batch * _num_upper_tiles(tiles),),
        in_specs=in_specs(functools.partial(_program_tile, tiles=tiles)),
        # The whole matrix: each program writes its tile and the mirror through dynamic slices.
        out_specs=pl.BlockSpec((None, out_dim, out_dim), lambda p: (p // _num_upper_tiles(tiles), 0, 0)),
        out_shape=out_struct(operands[0], (batch, out_dim, out_dim), operands[0].dtype),
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name=name,
    )(*operands)


def _xxt_call(x, bs, interpret):
    m, n = x.shape[1:]
    strip = lambda ids, side: pl.BlockSpec((None, bs.block_m, n), lambda p: (ids(p)[0], ids(p)[side], 0))
    kernel = functools.partial(_gram_kernel, rows=False)
    specs = lambda ids: [strip(ids, 1), strip(ids, 2)]
    return _triangle_call(kernel, (x, x), specs, m, bs, interpret, "symmetric_xxt")


def _xtx_call(x, bs, interpret):
    m, n = x.shape[1:]
    strip = lambda ids, side: pl.BlockSpec((None, m, bs.block_m), lambda p: (ids(p)[0], 0, ids(p)[side]))
    kernel = functools.partial(_gram_kernel, rows=True)
    specs = lambda ids: [strip(ids, 1), strip(ids, 2)]
    return _triangle_call(kernel, (x, x), specs, n, bs, interpret, "symmetric_xtx")


def _poly_call(a, b, c, bs, interpret):
    m = a.shape[1]
    strip = lambda ids, side: pl.BlockSpec((None, bs.block_m, m), lambda p: (ids(p)[0], ids(p)[side], 0))

    def specs(ids):
        tile = pl.BlockSpec((None, bs.block_m, bs.block_m), ids)
        return [strip(ids, 1), strip(ids, 2), tile]

    kernel = functools.partial(_poly_kernel, b=b, c=c)
    return _triangle_call(kernel, (a, a, a), specs, m, bs, interpret, "symmetric_ba_plus_caa")


# ----------------------------------------------------------------------------
# Differentiable forms: the backward is plain XLA


def _matmul(u, v, dtype):
    return jnp.matmul(u, v, precision=_precision(dtype), preferred_element_type=_F32)


def _sym(g):
    """`g + gᵀ` in fp32, rounded to `g`'s dtype."""
    g32 = g.astype(_F32)
    return (g32 + jnp.swapaxes(g32, -1, -2)).astype(g.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _xxt(x, bs, interpret):
    return _xxt_call(x, bs, interpret)


def _xxt_fwd(x, bs, interpret):
    return _xxt_call(x, bs, interpret), x


def _xxt_bwd(bs, interpret, x, g):
    # d(X Xᵀ) = dX Xᵀ + X dXᵀ, so dX = (G + Gᵀ) X.
    return (_matmul(_sym(g.astype(x.dtype)), x, x.dtype).astype(x.dtype),)


_xxt.defvjp(_xxt_fwd, _xxt_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _xtx(x, bs, interpret):
    return _xtx_call(x, bs, interpret)


def _xtx_fwd(x, bs, interpret):
    return _xtx_call(x, bs, interpret), x


def _xtx_bwd(bs, interpret, x, g):
    return (_matmul(x, _sym(g.astype(x.dtype)), x.dtype).astype(x.dtype),)


_xtx.defvjp(_xtx_fwd, _xtx_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _ba_plus_caa(a, b, c, bs, interpret):
    return _poly_call(a, b, c, bs, interpret)


def _ba_plus_caa_fwd(a, b, c, bs, interpret):
    return _poly_call(a, b, c, bs, interpret), a


def _ba_plus_caa_bwd(b, c, bs, interpret, a, g):
    # The gradient of A -> b·A + c·A·A at A (symmetric or not): b·G + c·(G Aᵀ + Aᵀ G).
    g = g.astype(a.dtype)
    a_t = jnp.swapaxes(a, -1, -2)
    da = b * g.astype(_F32) + c * (_matmul(g, a_t, a.dtype) + _matmul(a_t, g, a.dtype))
    return (da.astype(a.dtype),)


_ba_plus_caa.defvjp(_ba_plus_caa_fwd, _ba_plus_caa_bwd)


# ----------------------------------------------------------------------------
# Public wrappers


def _batched(x: jax.Array, rows: int, cols: int) -> jax.Array:
    """`x` as `[B, rows, cols]`: leading axes flattened, zero-padded at the end of each matrix."""
    m, n = x.shape[-2:]
    x = x.reshape(math.prod(x.shape[:-2]), m, n)
    if (rows, cols) != (m, n):
        x = jnp.pad(x, ((0, 0), (0, rows - m), (0, cols - n)))
    return x


def _unbatched(out: jax.Array, lead: tuple[int, ...], side: int) -> jax.Array:
    return out[:, :side, :side].reshape(*lead, side, side)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def xxt(x: jax.Array, *, block_sizes: BlockSizes | None = None, interpret: bool = False) -> jax.Array:
    """`X·Xᵀ` of each matrix of `x`, from the upper triangle of tiles; differentiable.

    Args:
      x: `[..., m, n]`; leading axes are a batch. Any float dtype (bf16 in training).
      block_sizes: kernel tiling; `BlockSizes.get_default()` when None.
      interpret: run the Pallas kernel in the interpreter (CPU).

    Returns:
      `[..., m, m]` in `x.dtype`, accumulated in fp32 (at full fp32 precision
      for fp32 inputs). Sizes that are not tile multiples are zero-padded.
    """
    m, n = x.shape[-2:]
    bs = _fit(block_sizes or BlockSizes.get_default(), m, n, x.dtype.itemsize)
    padded = _batched(x, _round_up(m, bs.block_m), _round_up(n, bs.block_k))
    return _unbatched(_xxt(padded, bs, interpret), x.shape[:-2], m)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def xtx(x: jax.Array, *, block_sizes: BlockSizes | None = None, interpret: bool = False) -> jax.Array:
    """`Xᵀ·X` of each matrix of `x` (the small Gram matrix of tall ones); as `xxt`, `[..., n, n]`."""
    m, n = x.shape[-2:]
    bs = _fit(block_sizes or BlockSizes.get_default(), n, m, x.dtype.itemsize)
    padded = _batched(x, _round_up(m, bs.block_k), _round_up(n, bs.block_m))
    return _unbatched(_xtx(padded, bs, interpret), x.shape[:-2], n)


@functools.partial(jax.jit, static_argnames=("b", "c", "block_sizes", "interpret"))
def ba_plus_caa(
    a: jax.Array,
    b: float,
    c: float,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """`b·A + c·A·A` for each symmetric matrix `A` of `a`, from the upper triangle; differentiable in `a`.

    The kernel reads `A[:, j]` as `A[j, :]`, so `a` must be symmetric (a Gram
    matrix from `xxt` or `xtx`); the product is rounded once after the sum.

    Args:
      a: `[..., m, m]` symmetric matrices.
      b: coefficient of `A` (static: one compile per value).
      c: coefficient of `A·A` (static).
      block_sizes: kernel tiling; `BlockSizes.get_default()` when None.
      interpret: run the Pallas kernel in the interpreter (CPU).

    Returns:
      `[..., m, m]` in `a.dtype`. The gradient is that of `b·A + c·A·A` at `a`.
    """
    m = a.shape[-1]
    if a.shape[-2] != m:
        raise ValueError(f"ba_plus_caa needs square matrices, got shape {a.shape}")
    bs = _fit(block_sizes or BlockSizes.get_default(), m, m, a.dtype.itemsize)
    # One padded side serves as both the output tiles and the contraction slices.
    side = _round_up(m, max(bs.block_m, bs.block_k))
    padded = _batched(a, side, side)
    return _unbatched(_ba_plus_caa(padded, float(b), float(c), bs, interpret), a.shape[:-2], m)


# ----------------------------------------------------------------------------
# References


def xxt_reference(x: jax.Array) -> jax.Array:
    """Plain-JAX `X·Xᵀ` in fp32 at `Precision.HIGHEST`, in `x.dtype`."""
    x32 = x.astype(_F32)
    return jnp.matmul(x32, jnp.swapaxes(x32, -1, -2), precision=lax.Precision.HIGHEST).astype(x.dtype)


def xtx_reference(x: jax.Array) -> jax.Array:
    """Plain-JAX `Xᵀ·X` in fp32 at `Precision.HIGHEST`, in `x.dtype`."""
    x32 = x.astype(_F32)
    return jnp.matmul(jnp.swapaxes(x32, -1, -2), x32, precision=lax.Precision.HIGHEST).astype(x.dtype)


def ba_plus_caa_reference(a: jax.Array, b: float, c: float) -> jax.Array:
    """Plain-JAX `b·A + c·A·A` in fp32 at `Precision.HIGHEST`, in `a.dtype`."""
    a32 = a.astype(_F32)
    return (b * a32 + c * jnp.matmul(a32, a32, precision=lax.Precision.HIGHEST)).astype(a.dtype)
