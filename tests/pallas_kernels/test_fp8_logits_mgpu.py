"""The Mosaic GPU FP8 logits GEMM (`fp8_logits_mgpu.fp8_logits`) against a float32 reference.

The reference sums the e4m3 products in float32, multiplies by the float32 scale and rounds to bf16
once: `torch._scaled_mm(..., out_dtype=bf16)`, record #77's forward head, without its fast
accumulation. On a GPU the kernel's sums are the tensor core's (fast accumulation): within the
tolerance, but not the exactly rounded sums (the GPU class's expected failure says by how much). On CPU the kernel runs in
the Mosaic GPU simulator (five CTAs, each walking several tiles); the `gpu`-marked class compiles it
for Hopper at record #77's stage-2 micro-batch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxrun.config import FP8HeadConfig
from pallas_kernels import fp8_logits_mgpu
from pallas_kernels.gemm_mgpu import Tiles
from tests.pallas_kernels.checks import errors, fresh_seed

SCALES = FP8HeadConfig()
SCALE = SCALES.x_scale * SCALES.w_scale
# After dividing by max|reference|: one bf16 rounding of the same float32 sums (2^-8); sums taken in
# another order can round to the neighbouring bf16 value now and then.
TOL = 8e-3
FLIP_FRAC = 1e-3


def _operands(seed, n, k, v):
    """e4m3 copies of a unit-RMS hidden state and a head weight, at the record's static scales."""
    kx, kw = jax.random.split(jax.random.key(seed))
    x8 = (jax.random.normal(kx, (n, k)) / SCALES.x_scale).astype(jnp.float8_e4m3fn)
    w8 = (0.02 * jax.random.normal(kw, (v, k)) / SCALES.w_scale).astype(jnp.float8_e4m3fn)
    return x8, w8


def _reference(x8, w8, scale):
    sums = jnp.dot(x8.astype(jnp.float32), w8.astype(jnp.float32).T, precision="highest")
    return (sums * jnp.float32(scale)).astype(jnp.bfloat16)


def _differ(a, b) -> float:
    return float(jnp.mean(a != b))


class _Fp8LogitsTest:
    INTERPRET = False
    SHAPE = (49152, 768, 50304)  # record #77's stage-2 micro-batch on one GPU
    TILINGS = (fp8_logits_mgpu.TILES,)

    def _run(self, tiles):
        seed = fresh_seed()
        x8, w8 = _operands(seed, *self.SHAPE)
        sim = plgpu.InterpretGPUParams() if self.INTERPRET else None
        out = fp8_logits_mgpu.fp8_logits(x8, w8, scale=SCALE, tiles=tiles, interpret=sim)
        assert out.dtype == jnp.bfloat16 and out.shape == (self.SHAPE[0], self.SHAPE[2])
        return seed, out, _reference(x8, w8, SCALE)

    def test_matches_reference(self):
        for tiles in self.TILINGS:
            seed, out, want = self._run(tiles)
            worst, _ = errors(out, want)
            assert worst <= TOL, f"{tiles} (seed {seed}): {float(worst):.2e}"

    def test_rounds_the_exact_float32_sums(self):
        for tiles in self.TILINGS:
            seed, out, want = self._run(tiles)
            assert _differ(out, want) <= FLIP_FRAC, f"{tiles} (seed {seed})"


@pytest.mark.gpu
class TestFp8LogitsMgpu(_Fp8LogitsTest):
    """Compiled for Hopper at record #77's stage-2 shape."""

    @pytest.mark.xfail(
        strict=True,
        reason="on an H100 (2026-12-07) 11.6% of the logits rounded to a neighbouring bf16: FP8 wgmma "
        "sums K in the tensor core at reduced precision, as the record's fast-accumulating forward "
        "`_scaled_mm` does, not in float32 (the simulator's sums are exact)",
    )
    def test_rounds_the_exact_float32_sums(self):
        super().test_rounds_the_exact_float32_sums()


class TestFp8LogitsMgpuInterpret(_Fp8LogitsTest):
    """In the Mosaic GPU simulator: 4 × 2 tiles of 128 × 192 on 5 CTAs, K in two slices."""

    INTERPRET = True
    SHAPE = (512, 256, 384)


def test_the_scale_is_applied_in_float32_before_the_rounding():
    """A bf16-rounded scale (what a bf16-dequantizing XLA GEMM applies) moves many logits; the
    kernel's must not."""
    seed = fresh_seed()
    x8, w8 = _operands(seed, 512, 256, 384)
    out = fp8_logits_mgpu.fp8_logits(x8, w8, scale=SCALE, interpret=plgpu.InterpretGPUParams())
    exact = _reference(x8, w8, SCALE)
    bf16_scale = _reference(x8, w8, float(jnp.bfloat16(SCALE)))
    assert _differ(bf16_scale, exact) > 0.01, f"seed {seed}: the test would not tell the two apart"
    assert _differ(out, exact) <= FLIP_FRAC, f"seed {seed}"


def test_bad_inputs_are_named():
    x8, w8 = _operands(0, 512, 256, 384)
    with pytest.raises(ValueError, match="N = 500 a multiple of 128"):
        fp8_logits_mgpu.fp8_logits(x8[:500], w8, scale=SCALE)
    with pytest.raises(ValueError, match="must be float8"):
        fp8_logits_mgpu.fp8_logits(x8.astype(jnp.bfloat16), w8, scale=SCALE)
    with pytest.raises(ValueError, match="share K"):
        fp8_logits_mgpu.fp8_logits(x8, w8[:, :128], scale=SCALE)
    with pytest.raises(ValueError, match="tile_k must be a multiple of 128"):
        fp8_logits_mgpu.fp8_logits(x8, w8, scale=SCALE, tiles=Tiles(tile_k=64))
    with pytest.raises(ValueError, match="needs 256 KB of shared memory, over Hopper's 227 KB"):
        fp8_logits_mgpu.fp8_logits(
            x8, w8, scale=SCALE, tiles=Tiles(tile_m=128, tile_n=128, tile_k=128, stages=4)
        )


@pytest.mark.parametrize("tiles", [fp8_logits_mgpu.TILES, Tiles(tile_m=128, tile_n=128, tile_k=128, stages=3)])
def test_lowers_for_hopper(tiles):
    """The compiled path (wgmma on K-major FP8 operands, the bf16 epilogue's TMA store) lowers to
    Mosaic GPU for CUDA at record #77's stage-2 shape, without a GPU: the simulator skips lowering."""
    x = jax.ShapeDtypeStruct((49152, 768), jnp.float8_e4m3fn)
    w = jax.ShapeDtypeStruct((50304, 768), jnp.float8_e4m3fn)
    logits = jax.jit(lambda x8, w8: fp8_logits_mgpu.fp8_logits(x8, w8, scale=SCALE, tiles=tiles))
    assert "fp8_logits_mgpu" in logits.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()


def test_the_default_tiling_fits_shared_memory():
    """The simulator does not bound shared memory; a Hopper GPU does (227 KB a CTA)."""
    assert fp8_logits_mgpu.smem_bytes(fp8_logits_mgpu.TILES) == 208 * 1024 <= fp8_logits_mgpu.SMEM_BYTES


def test_operands_are_in_e4m3_range():
    """The test's operands are what the head quantizes: finite, and not all in one binade."""
    x8, w8 = _operands(1, 512, 256, 384)
    for a in (x8, w8):
        f = np.asarray(a.astype(jnp.float32))
        assert np.isfinite(f).all() and len(np.unique(np.abs(f))) > 50
