"""Fused ReLU² MLP: `y = relu(x @ w1 + b1)² @ w2 + b2` with a hand-written backward.

The up-projection is a Pallas kernel whose epilogue applies bias and ReLU², so
the pre-activation never reaches HBM; only `post = relu(pre)²` is stored. The
backward recovers `relu(pre) = sqrt(post)` instead of keeping `pre`, and fuses
`d_pre = 2·relu(pre)·(dy @ w2ᵀ)` (and the column sums that give `db1`) into
the epilogue of the `dy @ w2ᵀ` kernel. The three plain matmuls
(`post @ w2`, `dw1`/`dx`, `dw2`) go to XLA, whose cuBLAS GEMMs a Triton-lowered
kernel does not beat. Kernels are portable `pallas_call`s with BlockSpecs, so
`interpret=True` runs them on CPU. With `gemms="mosaic"` the two epilogue GEMMs are the Hopper
kernels of `relu2_mgpu.py` instead (wgmma and TMA; the Mosaic GPU simulator on CPU).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu_mosaic
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import gemm_mgpu, relu2_mgpu
from pallas_kernels.shapes import out_struct

_F32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))  # a @ bᵀ
_TN = (((0,), (0,)), ((), ()))  # aᵀ @ b
_SMEM = 200 * 1024  # pipeline buffers; Triton needs a little more for the epilogue


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Tiling of the two `[N, F]` kernels (contraction over the width D).

    Attributes:
      block_m: rows (tokens) per tile.
      block_n: hidden units (F) per tile.
      block_k: contraction slice loaded per pipeline stage.
      group_m: row tiles launched together per column tile, so its weight
        slice is read from L2 rather than HBM.
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining depth of the K loop.
    """

    # Fastest of five tilings on one H100 (benchmarks/mlp_ce_bench.py --sweep),
    # though within the run-to-run spread of the next two.
    block_m: int = 128
    block_n: int = 256
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 4

    @classmethod
    def get_default(cls) -> "BlockSizes":
        return cls()


def _tile_ids(pid, n_m: int, n_n: int, group_m: int):
    """Maps a 1-D program id to a (row, column) tile in grouped (L2-friendly) order."""
    per_group = group_m * n_n
    first_m = (pid // per_group) * group_m
    size_m = jnp.minimum(n_m - first_m, group_m)
    local = pid % per_group
    return first_m + local % size_m, local // size_m


def _matmul_tile(a_ref, b_ref, *, block_k: int, trans_b: bool) -> jax.Array:
    """fp32 `a_ref @ b_ref` (or `a_ref @ b_refᵀ`) over the whole K, in `block_k` slices."""
    block_m, k_dim = a_ref.shape
    block_n = b_ref.shape[0] if trans_b else b_ref.shape[1]

    def body(k, acc):
        ks = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
        a = a_ref[:, ks]
        if trans_b:
            return acc + lax.dot_general(a, b_ref[:, ks], _NT, preferred_element_type=_F32)
        return acc + jnp.dot(a, b_ref[ks, :], preferred_element_type=_F32)

    acc = jnp.zeros((block_m, block_n), _F32)
    return lax.fori_loop(0, k_dim // block_k, body, acc)


def _relu2_up_kernel(x_ref, w1_ref, *refs, block_k: int, has_bias: bool):
    """post = relu(x @ w1 + b1)² for one [block_m, block_n] tile."""
    if has_bias:
        b1_ref, post_ref = refs
    else:
        (post_ref,) = refs
    pre = _matmul_tile(x_ref, w1_ref, block_k=block_k, trans_b=False)
    if has_bias:
        pre = pre + b1_ref[...].astype(_F32)[None, :]
    relu = jnp.maximum(pre, 0.0)
    post_ref[...] = (relu * relu).astype(post_ref.dtype)


def _relu2_dpre_kernel(dy_ref, w2_ref, post_ref, *refs, block_k: int, has_bias: bool):
    """d_pre = 2·sqrt(post)·(dy @ w2ᵀ) for one tile, plus its column sums (for db1)."""
    dpost = _matmul_tile(dy_ref, w2_ref, block_k=block_k, trans_b=True)
    d_pre = 2.0 * jnp.sqrt(post_ref[...].astype(_F32)) * dpost
    refs[0][...] = d_pre.astype(refs[0].dtype)
    if has_bias:
        refs[1][...] = jnp.sum(d_pre, axis=0)


def _hidden_call(kernel, a, b, trans_b, extra, extra_specs, out_shape, out_specs, bs, interpret, name):
    """Launches `kernel` over the [N, F] tile grid in grouped order; `b` is [D, F], or [F, D] if `trans_b`."""
    n, d = a.shape
    f = out_shape[0].shape[1]
    n_m, n_n = n // bs.block_m, f // bs.block_n
    ids = functools.partial(_tile_ids, n_m=n_m, n_n=n_n, group_m=bs.group_m)
    b_spec = (
        pl.BlockSpec((bs.block_n, d), lambda p: (ids(p)[1], 0))
        if trans_b
        else pl.BlockSpec((d, bs.block_n), lambda p: (0, ids(p)[1]))
    )
    return pl.pallas_call(
        kernel,
        grid=(n_m * n_n,),
        in_specs=[pl.BlockSpec((bs.block_m, d), lambda p: (ids(p)[0], 0)), b_spec, *extra_specs(ids)],
        out_specs=out_specs(ids),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name=name,
    )(a, b, *extra)


def _up_projection(x, w1, b1, bs, interpret):
    n, f = x.shape[0], w1.shape[1]
    has_bias = b1 is not None
    kernel = functools.partial(_relu2_up_kernel, block_k=bs.block_k, has_bias=has_bias)
    extra = [b1] if has_bias else []
    (post,) = _hidden_call(
        kernel,
        x,
        w1,
        False,
        extra,
        lambda ids: [pl.BlockSpec((bs.block_n,), lambda p: (ids(p)[1],))] if has_bias else [],
        [out_struct(x, (n, f), x.dtype)],
        lambda ids: [pl.BlockSpec((bs.block_m, bs.block_n), ids)],
        bs,
        interpret,
        "relu2_mlp_up",
    )
    return post


def _d_pre(dy, w2, post, has_bias, bs, interpret):
    n, f = post.shape
    kernel = functools.partial(_relu2_dpre_kernel, block_k=bs.block_k, has_bias=has_bias)
    out_shape = [out_struct(dy, (n, f), post.dtype)]
    if has_bias:
        out_shape.append(out_struct(dy, (n // bs.block_m, f), _F32))

    def out_specs(ids):
        specs = [pl.BlockSpec((bs.block_m, bs.block_n), ids)]
        if has_bias:
            specs.append(pl.BlockSpec((None, bs.block_n), ids))
        return specs

    outs = _hidden_call(
        kernel,
        dy,
        w2,
        True,
        [post],
        lambda ids: [pl.BlockSpec((bs.block_m, bs.block_n), ids)],
        out_shape,
        out_specs,
        bs,
        interpret,
        "relu2_mlp_dpre",
    )
    return outs[0], (outs[1].sum(axis=0) if has_bias else None)


def _mosaic_interpret(interpret: bool):
    return plgpu_mosaic.InterpretGPUParams() if interpret else None


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _relu2_mlp(x, w1, w2, b1, b2, bs, gemms, interpret):
    return _relu2_mlp_fwd(x, w1, w2, b1, b2, bs, gemms, interpret)[0]


def _relu2_mlp_fwd(x, w1, w2, b1, b2, bs, gemms, interpret):
    if gemms == "mosaic":
        post = relu2_mgpu.up_relu2(x, w1, b1, interpret=_mosaic_interpret(interpret))
    else:
        post = _up_projection(x, w1, b1, bs, interpret)
    y = jnp.dot(post, w2, preferred_element_type=_F32)
    if b2 is not None:
        y = y + b2.astype(_F32)[None, :]
    return y.astype(x.dtype), (x, w1, w2, b1, b2, post)


def _relu2_mlp_bwd(bs, gemms, interpret, res, dy):
    x, w1, w2, b1, b2, post = res
    dy = dy.astype(post.dtype)
    if gemms == "mosaic":
        d_pre, sums = relu2_mgpu.d_pre(
            dy, w2, post, column_sum=b1 is not None, interpret=_mosaic_interpret(interpret)
        )
        db1 = None if sums is None else sums.sum(axis=0)
    else:
        d_pre, db1 = _d_pre(dy, w2, post, b1 is not None, bs, interpret)
    dw2 = lax.dot_general(post, dy, _TN, preferred_element_type=_F32).astype(w2.dtype)
    dw1 = lax.dot_general(x, d_pre, _TN, preferred_element_type=_F32).astype(w1.dtype)
    dx = jnp.dot(d_pre, w1.T, preferred_element_type=_F32).astype(x.dtype)
    db1 = None if b1 is None else db1.astype(b1.dtype)
    db2 = None if b2 is None else jnp.sum(dy, axis=0, dtype=_F32).astype(b2.dtype)
    return dx, dw1, dw2, db1, db2


_relu2_mlp.defvjp(_relu2_mlp_fwd, _relu2_mlp_bwd)


def _fit(bs: BlockSizes, n: int, d: int, f: int, itemsize: int) -> BlockSizes:
    """Shrinks tiles to small problems and to shared memory; checks divisibility."""
    bs = dataclasses.replace(
        bs,
        block_m=min(bs.block_m, max(16, pl.next_power_of_2(n))),
        block_n=min(bs.block_n, f),
        block_k=min(bs.block_k, d),
    )
    # The K pipeline keeps num_stages (x, w) slices in shared memory (227 KiB on H100).
    while bs.block_k > 16 and bs.num_stages * (bs.block_m + bs.block_n) * bs.block_k * itemsize > _SMEM:
        bs = dataclasses.replace(bs, block_k=bs.block_k // 2)
    if f % bs.block_n or d % bs.block_k:
        raise ValueError(
            f"hidden width {f} and model width {d} must be multiples of "
            f"block_n={bs.block_n} and block_k={bs.block_k}"
        )
    return bs


@functools.partial(jax.jit, static_argnames=("block_sizes", "gemms", "interpret"))
def relu2_mlp(
    x: jax.Array,
    w1: jax.Array,
    w2: jax.Array,
    b1: jax.Array | None = None,
    b2: jax.Array | None = None,
    *,
    block_sizes: BlockSizes | None = None,
    gemms: str = "triton",
    interpret: bool = False,
) -> jax.Array:
    """ReLU² MLP `relu(x @ w1 + b1)² @ w2 + b2`, differentiable in every array.

    Args:
      x: `[..., D]` activations (bf16 in training; any float dtype works).
      w1: `[D, F]` up-projection.
      w2: `[F, D]` down-projection.
      b1: optional `[F]` bias of the up-projection.
      b2: optional `[D]` bias of the down-projection.
      block_sizes: the Triton kernels' tiling; `BlockSizes.get_default()` when None.
      gemms: "triton" (portable) or "mosaic" (Hopper; `relu2_mgpu.py`, its default tiling) for
        the two GEMMs with the activation in their epilogue.
      interpret: run the Pallas kernels in the interpreter (CPU), or the Mosaic GPU simulator.

    Returns:
      `[..., D]` output in `x.dtype`; matmuls accumulate in fp32. Rows are
      padded to a multiple of `block_m` internally.
    """
    if gemms not in ("triton", "mosaic"):
        raise ValueError(f"relu2_mlp: gemms must be 'triton' or 'mosaic', got {gemms!r}")
    lead, d = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, d)
    n = x2.shape[0]
    if gemms == "mosaic":  # relu2_mgpu checks its own shapes; the Triton tiling is unused
        bs, rows = None, gemm_mgpu.row_multiple()
    else:
        bs = _fit(block_sizes or BlockSizes.get_default(), n, d, w1.shape[1], x.dtype.itemsize)
        rows = bs.block_m
    pad = -n % rows
    if pad:
        x2 = jnp.pad(x2, ((0, pad), (0, 0)))
    y = _relu2_mlp(x2, w1.astype(x.dtype), w2.astype(x.dtype), b1, b2, bs, gemms, interpret)
    return y[:n].reshape(*lead, w2.shape[1])


def relu2_mlp_reference(
    x: jax.Array,
    w1: jax.Array,
    w2: jax.Array,
    b1: jax.Array | None = None,
    b2: jax.Array | None = None,
) -> jax.Array:
    """Plain-JAX fp32 ReLU² MLP at `Precision.HIGHEST`; returns fp32."""
    hi = lax.Precision.HIGHEST
    pre = jnp.matmul(x.astype(_F32), w1.astype(_F32), precision=hi)
    if b1 is not None:
        pre = pre + b1.astype(_F32).reshape((1,) * (pre.ndim - 1) + (-1,))
    y = jnp.matmul(jnp.square(jax.nn.relu(pre)), w2.astype(_F32), precision=hi)
    if b2 is not None:
        y = y + b2.astype(_F32).reshape((1,) * (y.ndim - 1) + (-1,))
    return y
