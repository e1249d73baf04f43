"""Tests for pallas_kernels.attention: the kernels against their f32 reference, forward and VJP.

bf16 runs the Mosaic GPU kernels (on CPU, in the Mosaic GPU simulator); `TRITON` tiles switch
them off to test the portable Triton kernels (on CPU, the Pallas interpreter). Document-specific
Mosaic cases are in test_attention_mgpu_docs.py.
"""

import dataclasses
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import attention as attn

SCALE = 0.12  # the recipes' attention scale
HEAD_DIM = 128
# Elementwise bounds, plus a bound on ||out - ref|| / ||ref||. bf16 operands land near 3e-3.
FWD_TOL = {
    jnp.bfloat16: {"atol": 2e-2, "rtol": 2e-2, "rel": 1e-2},
    jnp.float32: {"atol": 1e-4, "rtol": 1e-4, "rel": 1e-4},
}
VJP_TOL = {
    jnp.bfloat16: {"atol": 5e-2, "rtol": 5e-2, "rel": 2e-2},
    jnp.float32: {"atol": 5e-4, "rtol": 5e-4, "rel": 5e-4},
}
# Small, unequal tiles, so T = 256 spans several blocks of each kernel, each with skipped,
# masked and unmasked blocks.
# Every Mosaic GPU kernel on, where the defaults keep some opt-in.
SMALL = attn.BlockSizes(
    block_q=64,
    block_k=32,
    block_q_dkv=32,
    block_k_dkv=64,
    block_q_dq=64,
    block_k_dq=32,
    num_warps=4,
    mosaic_documents=True,
    mosaic_backward=True,
)
# The portable kernels, where bf16 would otherwise run the Mosaic GPU ones (simulator on CPU).
TRITON = dataclasses.replace(SMALL, mosaic_forward=False, mosaic_backward=False)
CASES = {
    "causal": {"t": 256, "window": None, "docs": None},
    "window": {"t": 256, "window": 72, "docs": None},
    "documents": {"t": 256, "window": None, "docs": "random"},
    "window_documents": {"t": 256, "window": 48, "docs": "random"},
    "ragged_t": {"t": 200, "window": 40, "docs": "random"},
    "one_token_documents": {"t": 128, "window": None, "docs": "singletons"},
}


def _segment_ids(rng: np.random.Generator, b: int, t: int, kind: str | None) -> jax.Array | None:
    """Contiguous documents: geometric lengths (mean ~40), or mostly one-token documents."""
    if kind is None:
        return None
    rows = []
    for _ in range(b):
        if kind == "random":
            lengths = rng.geometric(1 / 40, size=t)
        else:
            lengths = np.where(rng.random(t) < 0.8, 1, rng.integers(2, 9, size=t))
        rows.append(np.repeat(np.arange(t), lengths)[:t] + rng.integers(0, 1000))
    return jnp.asarray(np.stack(rows), jnp.int32)


def _inputs(name: str, b: int, t: int, h: int, dtype, docs: str | None):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    q, k, v, do = (jnp.asarray(rng.standard_normal((b, t, h, HEAD_DIM)), dtype) for _ in range(4))
    return q, k, v, do, _segment_ids(rng, b, t, docs)


def _assert_close(name: str, out, ref, tol) -> None:
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all(), f"{name}: non-finite values (unwritten or NaN output)"
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert rel < tol["rel"], f"{name}: ||out - ref|| / ||ref|| = {rel:.2e} >= {tol['rel']:.0e}"
    chex.assert_trees_all_close(out, ref, atol=tol["atol"], rtol=tol["rtol"], custom_message=name)


def _poison_allocator(*shapes) -> None:
    """Hands the device allocator NaN-filled buffers back, so outputs left unwritten read NaN."""
    bufs = [jnp.full(s, jnp.nan, jnp.float32).block_until_ready() for s in shapes for _ in range(4)]
    del bufs


class AttentionTest:
    """Kernel against reference. Compiled for the GPU; the subclass below flips INTERPRET."""

    INTERPRET = False

    def _check(self, name, *, t, window, docs, b=2, h=2, dtype=jnp.bfloat16, block_sizes=SMALL):
        q, k, v, do, seg = _inputs(name, b, t, h, dtype, docs)
        if not self.INTERPRET:
            # The interpreter fills outputs with NaN before the kernel runs; on the GPU, poison.
            _poison_allocator((b, t, h, HEAD_DIM), (b, h, t))

        def kernel(q, k, v):
            return attn.flash_attention(
                q,
                k,
                v,
                segment_ids=seg,
                window=window,
                scale=SCALE,
                block_sizes=block_sizes,
                interpret=self.INTERPRET,
            )

        def reference(q, k, v):
            return attn.attention_reference(q, k, v, segment_ids=seg, window=window, scale=SCALE)

        out, vjp = jax.vjp(kernel, q, k, v)
        assert out.dtype == dtype
        ref, vjp_ref = jax.vjp(reference, *(x.astype(jnp.float32) for x in (q, k, v)))
        _assert_close(f"{name}: out", out, ref, FWD_TOL[dtype])
        grads, grads_ref = vjp(do), vjp_ref(do.astype(jnp.float32))
        for g_name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
            assert g.dtype == dtype
            _assert_close(f"{name}: {g_name}", g, g_ref, VJP_TOL[dtype])

    @pytest.mark.parametrize("name", list(CASES))
    def test_matches_reference(self, name):
        # bf16: the Mosaic GPU forward and backward (the simulator under INTERPRET).
        self._check(name, **CASES[name])

    @pytest.mark.parametrize("name", list(CASES))
    def test_triton_matches_reference(self, name):
        self._check(f"{name}_triton", **CASES[name], block_sizes=TRITON)

    @pytest.mark.parametrize("name", ["causal", "window", "ragged_t"])
    def test_mosaic_forward_triton_backward(self, name):
        # Both backward paths read the same residuals: either forward can feed either backward.
        tiles = dataclasses.replace(SMALL, mosaic_backward=False)
        self._check(f"{name}_mixed", **CASES[name], block_sizes=tiles)

    def test_mosaic_ring_of_three(self):
        # 64-key blocks through three SMEM slots: the rings wrap, and window edges fall mid-block.
        tiles = dataclasses.replace(SMALL, block_k_mgpu=64, stages_mgpu=3, stages_bwd_mgpu=3)
        self._check("ring_of_three", t=512, window=150, docs=None, b=1, block_sizes=tiles)

    def test_float32(self):
        # f32 has no Mosaic kernel: this is the Triton path whatever the switches say.
        self._check("float32", t=128, window=24, docs="random", h=1, dtype=jnp.float32)

    def test_single_block(self):
        # T below every tile: all tiles shrink to 64 and there is exactly one block.
        self._check("single_block", t=64, window=None, docs="random", block_sizes=None)

    def test_window_zero_is_identity_on_v(self):
        q, k, v, _, _ = _inputs("window_zero", 1, 96, 2, jnp.bfloat16, None)
        out = attn.flash_attention(
            q, k, v, window=0, scale=SCALE, block_sizes=SMALL, interpret=self.INTERPRET
        )
        chex.assert_trees_all_equal(out, v)


class TestAttentionInterpret(AttentionTest):
    INTERPRET = True


@pytest.mark.gpu
class TestAttentionGpu(AttentionTest):
    @pytest.mark.parametrize("window", [None, 768])
    def test_default_blocks(self, window):
        self._check(f"default_{window}", t=2048, window=window, docs="random", b=2, h=2, block_sizes=None)


def _visible_np(t: int, window: int | None, seg: np.ndarray) -> np.ndarray:
    pos = np.arange(t)
    mask = pos[None, :] <= pos[:, None]
    if window is not None:
        mask &= pos[:, None] - pos[None, :] <= window
    return mask & (seg[:, None] == seg[None, :])


@pytest.mark.parametrize("window", [None, 0, 40, 100, 1000])
@pytest.mark.parametrize("docs", [None, "random", "singletons"])
def test_block_ranges_are_tight(window, docs):
    """Visited blocks are exactly those with a visible pair, and unmasked ones are all visible."""
    t, bq, bk = 256, 32, 64
    seg = _segment_ids(np.random.default_rng(t + (window or 0)), 1, t, docs)
    seg_np = np.zeros(t, np.int32) if seg is None else np.asarray(seg[0])
    mask = _visible_np(t, window, seg_np)
    bounds = None if seg is None else attn._doc_bounds(seg)
    for ranges, rows, cols, transpose in (
        (attn._kv_ranges(1, t, bq, bk, window, bounds), bq, bk, False),
        (attn._q_ranges(1, t, bq, bk, window, bounds), bk, bq, True),
    ):
        m = mask.T if transpose else mask
        for i, (a, b, c, d) in enumerate(np.asarray(ranges[0])):
            tiles = m[i * rows : (i + 1) * rows].reshape(rows, -1, cols)
            any_visible, all_visible = tiles.any(axis=(0, 2)), tiles.all(axis=(0, 2))
            np.testing.assert_array_equal(np.flatnonzero(any_visible), np.arange(a, d), f"row block {i}")
            np.testing.assert_array_equal(np.flatnonzero(all_visible), np.arange(b, c), f"row block {i}")
