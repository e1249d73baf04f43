"""The Mosaic GPU attention kernels with documents: forward and dq, dk, dv against the f32 reference.

On CPU the kernels run in the Mosaic GPU simulator (`plgpu.InterpretGPUParams`); the `gpu`-marked
class compiles them for Hopper. Documents are built from explicit lengths, so each case pins the
edge it is about: a boundary inside a block, documents of one to three tokens, a document longer
than the window, windows below and above the block size, the record's paired layers (ids repeated
twice over a doubled sequence), and T that is not a multiple of any tile (through the padding in
`flash_attention`).
"""

import dataclasses
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.sharding import PartitionSpec as P

from pallas_kernels import attention as attn
from pallas_kernels import attention_mgpu, attention_mgpu_bwd
from tests.pallas_kernels.test_attention import (
    FWD_TOL,
    HEAD_DIM,
    SCALE,
    VJP_TOL,
    _assert_close,
    _poison_allocator,
)

FWD_TOL = {**FWD_TOL, jnp.float16: FWD_TOL[jnp.bfloat16]}
VJP_TOL = {**VJP_TOL, jnp.float16: VJP_TOL[jnp.bfloat16]}
# flash_attention with the opt-in Mosaic kernels (document forward and backward) on
MOSAIC = attn.BlockSizes(mosaic_documents=True, mosaic_backward=True)


def _ids(lengths, t: int) -> np.ndarray:
    """Document ids for consecutive documents of `lengths` tokens; the last one runs to T."""
    ids = np.repeat(np.arange(len(lengths)), lengths)[:t]
    return np.concatenate([ids, np.full(t - ids.size, len(lengths), ids.dtype)]).astype(np.int32)


# Each case: T, window, document lengths per batch row (the rest of the row is one last document),
# and the kernels' tiles (forward key blocks, backward blocks). Forward query tiles are 64 per
# consumer warpgroup, so blocks fall at multiples of 64 (or 128 where a tile says so).
CASES = {
    # boundaries at 37, 101, 190: inside 64-blocks, each key block straddles one
    "boundary_mid_block": {"t": 256, "window": None, "docs": [[37, 64, 89]]},
    # runs of 1-3 token documents, then a long one: most blocks are edges
    "short_documents": {"t": 256, "window": 40, "docs": [[1, 2, 1, 3, 1, 1, 2, 3] * 6 + [70, 1, 1]]},
    # a 200-token document under a 48-token window: full, masked and skipped blocks inside one document
    "document_longer_than_window": {"t": 256, "window": 48, "docs": [[20, 200]]},
    # window 150 spans several blocks; documents cut it short in some rows only
    "window_above_block": {"t": 384, "window": 150, "docs": [[130, 7, 180], [300]], "b": 2},
    # a window of whole 128-token blocks, as the record's are, with 128-key tiles throughout
    "window_one_block": {
        "t": 512,
        "window": 128,
        "docs": [[100, 250, 3, 40]],
        "tiles": {"block_k": 128, "block_q_dkv": 128, "block_k_dq": 128},
    },
    # the paired layers' doubled sequence: every id twice, window in virtual positions
    "paired": {"t": 256, "window": 2 * 40, "docs": [[2 * 30, 2 * 5, 2 * 50]], "h": 2},
    # three slots in every ring, forward and backward. With 64-key slots this fits a Hopper's
    # 227 KiB of shared memory; three 128-key slots do not fit the dq kernel (259 KiB).
    "ring_of_three": {
        "t": 256,
        "window": 72,
        "docs": [[90, 33]],
        "tiles": {"block_k": 64, "stages_fwd": 3, "stages": 3},
    },
}


def _inputs(name: str, b: int, t: int, h: int, dtype):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return [jnp.asarray(rng.standard_normal((b, t, h, HEAD_DIM)), dtype) for _ in range(4)]


def _reference_vjp(q, k, v, do, seg, window):
    def reference(q, k, v):
        return attn.attention_reference(q, k, v, segment_ids=seg, window=window, scale=SCALE)

    out, vjp = jax.vjp(reference, *(x.astype(jnp.float32) for x in (q, k, v)))
    return out, vjp(do.astype(jnp.float32))


class MosaicDocsTest:
    """The kernels called directly, so the tiles and the simulator are explicit."""

    INTERPRET = True

    def _check(self, name, *, t, window, docs, b=1, h=1, dtype=jnp.bfloat16, tiles=None):
        tiles = dict(tiles or {})
        fwd_tiles = {"block_k": tiles.pop("block_k", 64), "stages": tiles.pop("stages_fwd", 2)}
        q, k, v, do = _inputs(name, b, t, h, dtype)
        seg = jnp.asarray(np.stack([_ids(row, t) for row in docs]), jnp.int32)
        seg = jnp.broadcast_to(seg, (b, t))
        sim = plgpu.InterpretGPUParams() if self.INTERPRET else None
        if not self.INTERPRET:
            _poison_allocator((b, t, h, HEAD_DIM), (b, h, t))
        o, lse = attention_mgpu.forward(
            q, k, v, segment_ids=seg, window=window, scale=SCALE, interpret=sim, **fwd_tiles
        )
        grads = attention_mgpu_bwd.backward(
            q, k, v, o, lse, do, segment_ids=seg, window=window, scale=SCALE, interpret=sim, **tiles
        )
        ref, grads_ref = _reference_vjp(q, k, v, do, seg, window)
        assert o.dtype == dtype and lse.dtype == jnp.float32
        _assert_close(f"{name}: out", o, ref, FWD_TOL[dtype])
        # lse in base 2 of the scaled scores, as the Triton backward also reads it
        logits = jnp.einsum("bqhd,bkhd->bhqk", *(x.astype(jnp.float32) for x in (q, k)), precision="highest")
        pos = jnp.arange(t)
        mask = attn._visible(
            pos[None, None, :, None],
            pos[None, None, None, :],
            seg[:, None, :, None],
            seg[:, None, None, :],
            window,
        )
        lse_ref = jax.nn.logsumexp(jnp.where(mask, logits * SCALE, -jnp.inf), axis=-1) / np.log(2)
        _assert_close(f"{name}: lse", lse, lse_ref, {"atol": 2e-2, "rtol": 1e-3, "rel": 1e-3})
        for g_name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref, strict=True):
            assert g.dtype == dtype
            _assert_close(f"{name}: {g_name}", g, g_ref, VJP_TOL[dtype])

    @pytest.mark.parametrize("name", list(CASES))
    def test_matches_reference(self, name):
        self._check(name, **CASES[name])

    def test_float16(self):
        self._check("float16", t=256, window=100, docs=[[60, 5, 120]], dtype=jnp.float16)

    def test_through_flash_attention_ragged_t(self):
        # T = 200: flash_attention pads to the Mosaic tiles, padded queries get a document of their own.
        b, t, h, window = 2, 200, 2, 56
        q, k, v, do = _inputs("ragged", b, t, h, jnp.bfloat16)
        seg = jnp.asarray(np.stack([_ids([70, 1, 2, 90], t), _ids([199], t)]), jnp.int32)
        tiles = dataclasses.replace(MOSAIC, block_k_mgpu=64)
        if not self.INTERPRET:
            _poison_allocator((b, 256, h, HEAD_DIM), (b, h, 256))

        def kernel(q, k, v):
            return attn.flash_attention(
                q,
                k,
                v,
                segment_ids=seg,
                window=window,
                scale=SCALE,
                block_sizes=tiles,
                interpret=self.INTERPRET,
            )

        out, vjp = jax.vjp(kernel, q, k, v)
        ref, grads_ref = _reference_vjp(q, k, v, do, seg, window)
        _assert_close("ragged: out", out, ref, FWD_TOL[jnp.bfloat16])
        for g_name, g, g_ref in zip(("dq", "dk", "dv"), vjp(do), grads_ref, strict=True):
            _assert_close(f"ragged: {g_name}", g, g_ref, VJP_TOL[jnp.bfloat16])


class TestMosaicDocsSimulator(MosaicDocsTest):
    INTERPRET = True


@pytest.mark.gpu
class TestMosaicDocsGpu(MosaicDocsTest):
    INTERPRET = False

    @pytest.mark.parametrize("window", [128, 768])
    @pytest.mark.parametrize("paired", [False, True])
    def test_record_shapes(self, window, paired):
        # The record's layout at a reduced T: 6 heads (3 over a doubled sequence when paired),
        # documents of geometric lengths (mean 400) cut at 2048, default tiles.
        t, h = 4096, 6
        rng = np.random.default_rng(window + paired)
        lengths = np.minimum(rng.geometric(1 / 400, size=64), 2048)
        seg = _ids(lengths, t)
        if paired:
            t, h, window, seg = 2 * t, h // 2, 2 * window, np.repeat(seg, 2)
        q, k, v, do = _inputs(f"record_{window}_{paired}", 1, t, h, jnp.bfloat16)
        seg = jnp.asarray(seg[None], jnp.int32)
        _poison_allocator((1, t, h, HEAD_DIM), (1, h, t))

        def kernel(q, k, v):
            return attn.flash_attention(
                q, k, v, segment_ids=seg, window=window, scale=SCALE, block_sizes=MOSAIC
            )

        out, vjp = jax.vjp(kernel, q, k, v)
        ref, grads_ref = _reference_vjp(q, k, v, do, seg, window)
        _assert_close("record: out", out, ref, FWD_TOL[jnp.bfloat16])
        for g_name, g, g_ref in zip(("dq", "dk", "dv"), vjp(do), grads_ref, strict=True):
            _assert_close(f"record: {g_name}", g, g_ref, VJP_TOL[jnp.bfloat16])


@pytest.mark.parametrize("window", [None, 256])
def test_gpu_path_lowers_for_hopper(window):
    """The compiled path (wgmma from registers under `run_state`, which the simulator replaces by
    XLA products) lowers to Mosaic GPU for CUDA, shared memory within bounds, without a GPU."""
    b, t, h = 1, 1024, 2
    x = jax.ShapeDtypeStruct((b, t, h, HEAD_DIM), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def fwd_bwd(q, k, v, do, seg):
        o, lse = attention_mgpu.forward(q, k, v, segment_ids=seg, window=window, scale=SCALE)
        return attention_mgpu_bwd.backward(q, k, v, o, lse, do, segment_ids=seg, window=window, scale=SCALE)

    text = jax.jit(fwd_bwd).trace(x, x, x, x, seg).lower(lowering_platforms=("cuda",)).as_text()
    for name in ("flash_attention_fwd_mgpu", "flash_attention_dq_mgpu", "flash_attention_dkdv_mgpu"):
        assert name in text, name


def test_gpu_path_lowers_inside_shard_map():
    """Inside shard_map the kernels' refs carry the mesh's manual axes: the loops bounded by block
    indices read from them must still trace (the record's step runs attention there)."""
    mesh = jax.make_mesh((jax.device_count(),), ("dp",))
    b, t, h = jax.device_count(), 512, 2
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("dp"))
    x = jax.ShapeDtypeStruct((b, t, h, HEAD_DIM), jnp.bfloat16, sharding=batch)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=batch)

    def fwd_bwd(q, k, v, do, seg):
        o, lse = attention_mgpu.forward(q, k, v, segment_ids=seg, window=128, scale=SCALE)
        return attention_mgpu_bwd.backward(q, k, v, o, lse, do, segment_ids=seg, window=128, scale=SCALE)

    step = jax.shard_map(
        fwd_bwd,
        mesh=mesh,
        in_specs=jax.sharding.PartitionSpec("dp"),
        out_specs=jax.sharding.PartitionSpec("dp"),
    )
    text = jax.jit(step).trace(x, x, x, x, seg).lower(lowering_platforms=("cuda",)).as_text()
    assert "flash_attention_dkdv_mgpu" in text


def _visible_np(first_key: np.ndarray) -> np.ndarray:
    pos = np.arange(first_key.size)
    return (pos[None, :] <= pos[:, None]) & (pos[None, :] >= first_key[:, None])


@pytest.mark.parametrize("window", [None, 0, 40, 64, 100, 1000])
@pytest.mark.parametrize("docs", ["none", "mid_block", "singletons"])
def test_block_ranges_are_tight(window, docs):
    """Visited blocks are exactly those with a visible pair, and unmasked ones are all visible.

    Also checks `visible_bounds` against the pairwise mask of `attention_reference`.
    """
    t, rows, cols = 256, 64, 128
    lengths = {"none": [], "mid_block": [37, 64, 89], "singletons": [1, 1, 2, 1, 3] * 10}[docs]
    seg = jnp.asarray(_ids(lengths, t)[None], jnp.int32)
    first_key, last_query = (np.asarray(x[0]) for x in attention_mgpu.visible_bounds(seg, 1, t, window))
    mask = _visible_np(first_key)
    pos = np.arange(t)
    seg_np = np.asarray(seg[0])
    expected = attn._visible(pos[:, None], pos[None, :], seg_np[:, None], seg_np[None, :], window)
    np.testing.assert_array_equal(mask, np.asarray(expected))
    np.testing.assert_array_equal(
        mask.T, (pos[None, :] >= pos[:, None]) & (pos[None, :] <= last_query[:, None])
    )
    for r, c in ((rows, cols), (cols, rows), (64, 64)):
        for ranges, m in (
            (attention_mgpu.key_block_ranges(jnp.asarray(first_key[None]), r, c), mask),
            (attention_mgpu.query_block_ranges(jnp.asarray(last_query[None]), r, c), mask.T),
        ):
            for i, (a, b, cc, d) in enumerate(np.asarray(ranges[0])):
                tiles = m[i * r : (i + 1) * r].reshape(r, -1, c)
                any_visible, all_visible = tiles.any(axis=(0, 2)), tiles.all(axis=(0, 2))
                np.testing.assert_array_equal(np.flatnonzero(any_visible), np.arange(a, d), f"block {i}")
                np.testing.assert_array_equal(np.flatnonzero(all_visible), np.arange(b, cc), f"block {i}")


def test_gradients_inside_shard_map():
    """The Mosaic forward and backward under `shard_map`, with q, k and v varying over the data
    axis as in the train step: dq, dk and dv vary as their primals do, and on one device the summed
    gradients equal those taken outside (in the simulator)."""
    q, k, v, do = _inputs("shard_map", 1, 128, 2, jnp.bfloat16)

    def grads(q, k, v, do):
        attend = lambda q, k, v: attn.flash_attention(
            q, k, v, scale=SCALE, block_sizes=MOSAIC, interpret=True
        )
        return jax.vjp(attend, q, k, v)[1](do)

    def per_device(q, k, v, do):
        return jax.lax.psum(grads(*jax.lax.pcast((q, k, v, do), ("dp",), to="varying")), "dp")

    mesh = jax.make_mesh((1,), ("dp",))  # the simulator holds one device's barriers at a time
    inside = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P(), out_specs=P()))(q, k, v, do)
    for name, g, g_ref in zip(("dq", "dk", "dv"), inside, grads(q, k, v, do), strict=True):
        chex.assert_trees_all_close(g, g_ref, atol=0, rtol=0, custom_message=name)
