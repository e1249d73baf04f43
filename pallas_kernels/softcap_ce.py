"""Softcapped cross-entropy over the LM head without materializing fp32 logits.

`loss[i] = logsumexp_j z[i, j] - z[i, t_i]` with `z = cap(x @ w + b)`, for a
50k vocabulary. The forward is a Pallas kernel tiled over (tokens, vocab);
each tile's epilogue reduces its fp32 logits to a partial sum of `exp(z - c)`,
so only `[V / block_v, N]` partials reach HBM; the target logits come from a
gather of head columns. Because both softcaps are bounded by `c = cap_value`,
the shift `c` is a safe fixed maximum and no running max is needed. The
backward recomputes each logit tile and writes `dL/d(x @ w)` in bf16
(optionally a chunk of tokens at a time), and XLA's cuBLAS GEMMs turn it into
`dx` and `dw`. With `save_logits=True` the forward also stores the raw logits
in bf16 and the backward skips the recompute GEMM. Targets below zero are ignored
(loss 0, no gradient). Kernels are portable `pallas_call`s with BlockSpecs, so
`interpret=True` runs them on CPU.

Caps: `"isru"` is `c·s/sqrt(s² + c²)` (c = 15, train_gpt_simple);
`"sigmoid"` is `c·σ((s + 5)/7.5)` (c = 23, modded-nanogpt record 77).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.shapes import out_struct

_F32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))  # a @ bᵀ
_TN = (((0,), (0,)), ((), ()))  # aᵀ @ b
_CAPS = ("isru", "sigmoid")
_LOG2E = 1.4426950408889634
_SMEM = 200 * 1024  # pipeline buffers; Triton needs a little more for the epilogue


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Tiling of the logit kernels (contraction over the width D).

    Attributes:
      block_m: tokens per tile.
      block_v: vocabulary entries per tile; V is padded up to a multiple.
      block_k: contraction slice loaded per pipeline stage.
      group_m: token tiles launched together per vocab tile (L2 reuse of w).
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining depth of the K loop.
      bwd_chunk: tokens per backward step; bounds the bf16 `[chunk, V]`
        gradient buffer (0: one step over all tokens, the fastest).
    """

    # Fastest of six tilings and four chunk sizes on one H100
    # (benchmarks/mlp_ce_bench.py --sweep).
    block_m: int = 128
    block_v: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    bwd_chunk: int = 0

    @classmethod
    def get_default(cls) -> "BlockSizes":
        return cls()


@dataclasses.dataclass(frozen=True)
class _Static:
    cap: str
    cap_value: float
    vocab: int
    bs: BlockSizes
    save_logits: bool
    interpret: bool


def _softcap(s: jax.Array, cap: str, c: float) -> jax.Array:
    """Capped logits (plain jnp; used outside the kernels)."""
    if cap == "isru":
        return c * s * lax.rsqrt(s * s + c * c)
    return c * jax.nn.sigmoid((s + 5.0) / 7.5)


def _softcap_log2(s: jax.Array, cap: str, c: float) -> tuple[jax.Array, jax.Array]:
    """`log2(e)·cap(s)` and `cap'(s)` in few instructions: the tile epilogues are
    bound by the special-function unit (an rsqrt and an exp2 per logit)."""
    if cap == "isru":
        r = lax.rsqrt(s * s + c * c)
        cr = c * r
        return s * (r * (c * _LOG2E)), cr * cr * cr
    sig = 1.0 / (1.0 + jnp.exp2((s + 5.0) * (-_LOG2E / 7.5)))
    return sig * (c * _LOG2E), (c / 7.5) * sig * (1.0 - sig)


def _tile_ids(pid, n_m: int, n_n: int, group_m: int):
    """Maps a 1-D program id to a (row, column) tile in grouped (L2-friendly) order."""
    per_group = group_m * n_n
    first_m = (pid // per_group) * group_m
    size_m = jnp.minimum(n_m - first_m, group_m)
    local = pid % per_group
    return first_m + local % size_m, local // size_m


def _logit_tile(x_ref, w_ref, b_ref, *, block_k: int) -> jax.Array:
    """fp32 raw logits `x @ w (+ b)` of one [block_m, block_v] tile."""
    block_m, d = x_ref.shape

    def body(k, acc):
        ks = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
        return acc + jnp.dot(x_ref[:, ks], w_ref[ks, :], preferred_element_type=_F32)

    acc = lax.fori_loop(0, d // block_k, body, jnp.zeros((block_m, w_ref.shape[1]), _F32))
    if b_ref is not None:
        acc = acc + b_ref[...].astype(_F32)[None, :]
    return acc


def _columns(st: _Static, n_m: int, n_v: int):
    _, j = _tile_ids(pl.program_id(0), n_m, n_v, st.bs.group_m)
    return j * st.bs.block_v + jnp.arange(st.bs.block_v, dtype=jnp.int32)


def _softcap_ce_fwd_kernel(x_ref, w_ref, *refs, st: _Static, n_m: int, n_v: int, has_bias: bool):
    """Partial `sum_j exp(z - c)` of one tile (and, if saving, its raw logits in bf16)."""
    b_ref, (sum_ref, *s_ref) = (refs[0], refs[1:]) if has_bias else (None, refs)
    s = _logit_tile(x_ref, w_ref, b_ref, block_k=st.bs.block_k)
    if st.save_logits:
        s_ref[0][...] = s.astype(s_ref[0].dtype)
        s = s.astype(s_ref[0].dtype).astype(_F32)  # the backward sees the rounded logits: stay consistent
    z2, _ = _softcap_log2(s, st.cap, st.cap_value)
    e = jnp.exp2(z2 - st.cap_value * _LOG2E)
    if st.vocab % st.bs.block_v:
        e = jnp.where(_columns(st, n_m, n_v)[None, :] < st.vocab, e, 0.0)
    sum_ref[...] = jnp.sum(e, axis=1)


def _softcap_ce_bwd_kernel(x_ref, w_ref, *refs, st: _Static, n_m: int, n_v: int, has_bias: bool):
    """`dL/ds = g·(softmax(z) - onehot(t))·cap'(s)` of one tile, plus its column sums (db)."""
    b_ref, refs = (refs[0], refs[1:]) if has_bias else (None, refs)
    t_ref, lse2_ref, g_ref, ds_ref = refs[:4]
    z2, dz_ds = _softcap_log2(_logit_tile(x_ref, w_ref, b_ref, block_k=st.bs.block_k), st.cap, st.cap_value)
    cols = _columns(st, n_m, n_v)[None, :]
    p = jnp.exp2(z2 - lse2_ref[...][:, None])
    ds = jnp.where(cols == t_ref[...][:, None], p - 1.0, p) * (g_ref[...][:, None] * dz_ds)
    if st.vocab % st.bs.block_v:
        ds = jnp.where(cols < st.vocab, ds, 0.0)
    ds_ref[...] = ds.astype(ds_ref.dtype)
    if has_bias:
        refs[4][...] = jnp.sum(ds, axis=0)


def _logit_call(kernel, x, w, b, rows, out_shape, out_specs, st: _Static, name: str):
    """Launches `kernel` over the [N, V] tile grid in grouped order."""
    bs = st.bs
    (n, d), v = x.shape, w.shape[1]
    n_m, n_v = n // bs.block_m, v // bs.block_v
    ids = functools.partial(_tile_ids, n_m=n_m, n_n=n_v, group_m=bs.group_m)
    has_bias = b is not None
    in_specs = [
        pl.BlockSpec((bs.block_m, d), lambda p: (ids(p)[0], 0)),
        pl.BlockSpec((d, bs.block_v), lambda p: (0, ids(p)[1])),
    ]
    if has_bias:
        in_specs.append(pl.BlockSpec((bs.block_v,), lambda p: (ids(p)[1],)))
    in_specs += [pl.BlockSpec((bs.block_m,), lambda p: (ids(p)[0],)) for _ in rows]
    return pl.pallas_call(
        functools.partial(kernel, st=st, n_m=n_m, n_v=n_v, has_bias=has_bias),
        grid=(n_m * n_v,),
        in_specs=in_specs,
        out_specs=out_specs(ids),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=st.interpret,
        name=name,
    )(x, w, *([b] if has_bias else []), *rows)


def _lse(x, w, b, st: _Static):
    """Per-token log-sum-exp of the capped logits, and the bf16 raw logits if saved."""
    (n, _), v = x.shape, w.shape[1]
    bm, bv = st.bs.block_m, st.bs.block_v
    out_shape = [out_struct(x, (v // bv, n), _F32)]
    if st.save_logits:
        out_shape.append(out_struct(x, (n, v), x.dtype))

    def out_specs(ids):
        specs = [pl.BlockSpec((None, bm), lambda p: (ids(p)[1], ids(p)[0]))]
        return specs + ([pl.BlockSpec((bm, bv), ids)] if st.save_logits else [])

    sums, *saved = _logit_call(
        _softcap_ce_fwd_kernel, x, w, b, [], out_shape, out_specs, st, "softcap_ce_fwd"
    )
    return st.cap_value + jnp.log(jnp.sum(sums, axis=0)), (saved[0] if saved else None)


def _target_logit(x, w, b, t, st: _Static):
    """z[i, t_i] from gathered head columns (fp32 sums of bf16 products, like the kernel)."""
    t = jnp.maximum(t, 0)
    s = jnp.einsum("nd,nd->n", x, jnp.take(w.T, t, axis=0), preferred_element_type=_F32)
    if b is not None:
        s = s + jnp.take(b, t).astype(_F32)
    if st.save_logits:
        s = s.astype(x.dtype).astype(_F32)
    return _softcap(s, st.cap, st.cap_value)


def _dlogits(x, w, b, t, lse2, g, st: _Static):
    n, v = x.shape[0], w.shape[1]
    out_shape = [out_struct(x, (n, v), x.dtype)]
    if b is not None:
        out_shape.append(out_struct(x, (n // st.bs.block_m, v), _F32))

    def out_specs(ids):
        specs = [pl.BlockSpec((st.bs.block_m, st.bs.block_v), ids)]
        if b is not None:
            specs.append(pl.BlockSpec((None, st.bs.block_v), ids))
        return specs

    outs = _logit_call(
        _softcap_ce_bwd_kernel, x, w, b, [t, lse2, g], out_shape, out_specs, st, "softcap_ce_bwd"
    )
    return outs[0], (jnp.sum(outs[1], axis=0) if b is not None else None)


def _dlogits_saved(s, t, lse2, g, has_bias: bool, st: _Static):
    """The backward kernel's epilogue in plain jnp over saved logits; XLA fuses it into one pass."""
    z2, dz_ds = _softcap_log2(s.astype(_F32), st.cap, st.cap_value)
    cols = lax.broadcasted_iota(jnp.int32, s.shape, 1)
    p = jnp.exp2(z2 - lse2[:, None])
    ds = jnp.where(cols == t[:, None], p - 1.0, p) * (g[:, None] * dz_ds)
    if s.shape[1] != st.vocab:
        ds = jnp.where(cols < st.vocab, ds, 0.0)
    return ds.astype(s.dtype), (jnp.sum(ds, axis=0) if has_bias else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _softcap_ce(x, w, b, t, st):
    return _softcap_ce_fwd(x, w, b, t, st)[0]


def _softcap_ce_fwd(x, w, b, t, st):
    lse, saved = _lse(x, w, b, st)
    loss = jnp.where(t >= 0, lse - _target_logit(x, w, b, t, st), 0.0)
    return loss, (x, w, b, t, lse, saved)


def _softcap_ce_bwd(st, res, g):
    x, w, b, t, lse, saved = res
    g = jnp.where(t >= 0, g.astype(_F32), 0.0)
    n, d = x.shape
    chunk = st.bs.bwd_chunk if 0 < st.bs.bwd_chunk < n else n

    def grads(x_c, t_c, lse2_c, g_c, *saved_c, dw_dtype):
        if st.save_logits:
            ds, db_c = _dlogits_saved(saved_c[0], t_c, lse2_c, g_c, b is not None, st)
        else:
            ds, db_c = _dlogits(x_c, w, b, t_c, lse2_c, g_c, st)
        dx_c = lax.dot_general(ds, w, _NT, preferred_element_type=x.dtype)
        return dx_c, lax.dot_general(x_c, ds, _TN, preferred_element_type=dw_dtype), db_c

    xs = (x, t, lse * _LOG2E, g) + ((saved,) if st.save_logits else ())
    if chunk == n:
        dx, dw, db = grads(*xs, dw_dtype=w.dtype)
    else:
        # Chunks of tokens bound the [chunk, V] gradient buffer; dw accumulates in fp32.
        def step(carry, xs_c):
            dx_c, dw_c, db_c = grads(*xs_c, dw_dtype=_F32)
            return (carry[0] + dw_c, None if b is None else carry[1] + db_c), dx_c

        init = (jnp.zeros(w.shape, _F32), None if b is None else jnp.zeros(b.shape, _F32))
        xs = tuple(a.reshape(n // chunk, chunk, *a.shape[1:]) for a in xs)
        (dw, db), dx = lax.scan(step, init, xs)
    db = None if b is None else db.astype(b.dtype)
    return dx.reshape(n, d), dw.astype(w.dtype), db, None


_softcap_ce.defvjp(_softcap_ce_fwd, _softcap_ce_bwd)


def _fit(bs: BlockSizes, n: int, d: int, v: int, itemsize: int) -> BlockSizes:
    """Shrinks tiles to small problems and shared memory, makes the chunk a multiple of block_m."""
    block_m = min(bs.block_m, max(16, pl.next_power_of_2(n)))
    chunk = bs.bwd_chunk if 0 < bs.bwd_chunk < n else 0
    bs = dataclasses.replace(
        bs,
        block_m=block_m,
        block_v=min(bs.block_v, max(16, pl.next_power_of_2(v))),
        block_k=min(bs.block_k, d),
        bwd_chunk=pl.cdiv(chunk, block_m) * block_m,
    )
    # The K pipeline keeps num_stages (x, w) slices in shared memory (227 KiB on H100).
    while bs.block_k > 16 and bs.num_stages * (bs.block_m + bs.block_v) * bs.block_k * itemsize > _SMEM:
        bs = dataclasses.replace(bs, block_k=bs.block_k // 2)
    if d % bs.block_k:
        raise ValueError(f"model width {d} must be a multiple of block_k={bs.block_k}")
    return bs


@functools.partial(jax.jit, static_argnames=("cap", "cap_value", "block_sizes", "save_logits", "interpret"))
def softcap_ce(
    x: jax.Array,
    w: jax.Array,
    targets: jax.Array,
    b: jax.Array | None = None,
    *,
    cap: str = "isru",
    cap_value: float = 15.0,
    block_sizes: BlockSizes | None = None,
    save_logits: bool = False,
    interpret: bool = False,
) -> jax.Array:
    """Per-token cross-entropy of `softcap(x @ w + b)` against `targets`.

    Args:
      x: `[..., D]` final hidden states (bf16 in training).
      w: `[D, V]` head weights; cast to `x.dtype`.
      targets: `[...]` int token ids; negative entries are ignored.
      b: optional `[V]` head bias.
      cap: `"isru"` (`c·s/sqrt(s²+c²)`) or `"sigmoid"` (`c·σ((s+5)/7.5)`).
      cap_value: `c`: 15 for train_gpt_simple's ISRU, 23 for record 77.
      block_sizes: kernel tiling; `BlockSizes.get_default()` when None.
      save_logits: keep the raw logits in bf16 (`[N, V]`, 2 bytes each) for
        the backward instead of recomputing them: one GEMM fewer, more memory.
        Loss and gradient then use the bf16-rounded logits, as PyTorch's
        bf16 head does.
      interpret: run the Pallas kernels in the interpreter (CPU).

    Returns:
      `[...]` fp32 loss per token (0 where the target is negative);
      differentiable in `x`, `w` and `b`.
    """
    if cap not in _CAPS:
        raise ValueError(f"cap must be one of {_CAPS}, got {cap!r}")
    d, v = x.shape[-1], w.shape[1]
    x2, t = x.reshape(-1, d), targets.reshape(-1).astype(jnp.int32)
    n = x2.shape[0]
    bs = _fit(block_sizes or BlockSizes.get_default(), n, d, v, x.dtype.itemsize)
    n_pad = -n % (bs.bwd_chunk or bs.block_m)
    v_pad = -v % bs.block_v
    x2 = jnp.pad(x2, ((0, n_pad), (0, 0)))
    t = jnp.pad(t, (0, n_pad), constant_values=-1)
    w = jnp.pad(w.astype(x.dtype), ((0, 0), (0, v_pad)))
    if b is not None:
        b = jnp.pad(b, (0, v_pad))
    loss = _softcap_ce(x2, w, b, t, _Static(cap, float(cap_value), v, bs, save_logits, interpret))
    return loss[:n].reshape(targets.shape)


def softcap_ce_reference(
    x: jax.Array,
    w: jax.Array,
    targets: jax.Array,
    b: jax.Array | None = None,
    *,
    cap: str = "isru",
    cap_value: float = 15.0,
) -> jax.Array:
    """Plain-JAX fp32 per-token softcapped cross-entropy at `Precision.HIGHEST`."""
    s = jnp.matmul(x.astype(_F32), w.astype(_F32), precision=lax.Precision.HIGHEST)
    if b is not None:
        s = s + b.astype(_F32).reshape((1,) * (s.ndim - 1) + (-1,))
    if cap == "isru":
        z = cap_value * s / jnp.sqrt(s * s + cap_value * cap_value)
    else:
        z = cap_value * jax.nn.sigmoid((s + 5.0) / 7.5)
    t = targets.astype(jnp.int32)
    zt = jnp.take_along_axis(z, jnp.maximum(t, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(t >= 0, jax.nn.logsumexp(z, axis=-1) - zt, 0.0)
