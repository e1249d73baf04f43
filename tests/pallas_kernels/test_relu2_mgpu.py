"""The Mosaic GPU epilogue GEMMs (`relu2_mgpu.up_relu2`, `relu2_mgpu.d_pre`) against float32 references.

On CPU they run in the Mosaic GPU simulator, where five CTAs walk the tiles, so each takes several
and one takes fewer (the persistent loop, the ring running on across tiles, the consumers' turns
at the column sums); the `gpu`-marked class compiles them for Hopper at `simple`'s widths, at every
tiling the bench sweeps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from benchmarks.relu2_mgpu_bench import TILINGS
from pallas_kernels import relu2_mgpu
from tests.pallas_kernels.checks import errors, fresh_seed

# After dividing by max|reference|: the kernels round their float32 result to bf16 once (2^-8),
# and their bf16 inputs are the reference's.
TOL = 8e-3
SUM_TOL = 1e-5  # the column sums stay float32


def _inputs(seed, n, d, f):
    k = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(k[0], (n, d), jnp.bfloat16)
    w1 = (jax.random.normal(k[1], (d, f)) / np.sqrt(d)).astype(jnp.bfloat16)
    b1 = 0.1 * jax.random.normal(k[2], (f,))
    dy = jax.random.normal(k[3], (n, d), jnp.bfloat16)
    w2 = (jax.random.normal(k[4], (f, d)) / np.sqrt(f)).astype(jnp.bfloat16)
    return x, w1, b1, dy, w2


def _up_reference(x, w1, b1):
    pre = jnp.dot(x.astype(jnp.float32), w1.astype(jnp.float32), precision="highest")
    return jnp.square(jax.nn.relu(pre if b1 is None else pre + b1[None, :]))


def _d_pre_reference(dy, w2, post):
    d_post = jnp.dot(dy.astype(jnp.float32), w2.astype(jnp.float32).T, precision="highest")
    return 2.0 * jnp.sqrt(post.astype(jnp.float32)) * d_post


class _Relu2MgpuTest:
    INTERPRET = False
    SHAPE = (65536, 768, 3072)  # simple's micro-batch
    TILINGS = TILINGS[:1]

    def _sim(self):
        return plgpu.InterpretGPUParams() if self.INTERPRET else None

    @pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
    def test_up_matches_reference(self, bias):
        for tm, tn, tk, stages in self.TILINGS:
            tiles = relu2_mgpu.Tiles(tile_m=tm, tile_n=tn, tile_k=tk, stages=stages)
            seed = fresh_seed()
            x, w1, b1, _, _ = _inputs(seed, *self.SHAPE)
            b1 = b1 if bias else None
            post = relu2_mgpu.up_relu2(x, w1, b1, tiles=tiles, interpret=self._sim())
            assert post.dtype == jnp.bfloat16 and post.shape == (self.SHAPE[0], self.SHAPE[2])
            worst, _ = errors(post, _up_reference(x, w1, b1))
            assert worst <= TOL, f"{tiles} (seed {seed}): {float(worst):.2e}"

    @pytest.mark.parametrize("column_sum", [True, False])
    def test_d_pre_matches_reference(self, column_sum):
        for tm, tn, tk, stages in self.TILINGS:
            tiles = relu2_mgpu.Tiles(tile_m=tm, tile_n=tn, tile_k=tk, stages=stages)
            seed = fresh_seed()
            x, w1, b1, dy, w2 = _inputs(seed, *self.SHAPE)
            post = _up_reference(x, w1, b1).astype(jnp.bfloat16)
            grad, sums = relu2_mgpu.d_pre(
                dy, w2, post, column_sum=column_sum, tiles=tiles, interpret=self._sim()
            )
            want = _d_pre_reference(dy, w2, post)
            assert grad.dtype == jnp.bfloat16
            worst, _ = errors(grad, want)
            assert worst <= TOL, f"{tiles} (seed {seed}): {float(worst):.2e}"
            if column_sum:
                n, f = post.shape
                assert sums.shape == (n // tm, f) and sums.dtype == jnp.float32
                per_tile = want.reshape(n // tm, tm, f).sum(axis=1)
                assert errors(sums, per_tile)[0] <= TOL, f"{tiles} (seed {seed})"
                # each row sums that tile's float32 gradient: its total is the bias gradient
                assert errors(sums.sum(axis=0), want.sum(axis=0))[0] <= TOL, f"{tiles} (seed {seed})"
            else:
                assert sums is None


@pytest.mark.gpu
class TestRelu2Mgpu(_Relu2MgpuTest):
    """Compiled for Hopper at `simple`'s widths, every swept tiling."""

    TILINGS = TILINGS


class TestRelu2MgpuInterpret(_Relu2MgpuTest):
    """In the Mosaic GPU simulator: 2 × 6 tiles at the default tiling on 5 CTAs; the default tiling
    and the one of another shape on both axes (the GPU class takes every tiling)."""

    INTERPRET = True
    SHAPE = (512, 128, 768)
    TILINGS = (TILINGS[0], (64, 256, 64, 3))


def test_bad_shapes_and_dtypes_are_named():
    x, w1, b1, dy, w2 = _inputs(0, 512, 128, 256)
    with pytest.raises(ValueError, match="N = 500 a multiple of 256"):
        relu2_mgpu.up_relu2(x[:500], w1, b1)
    with pytest.raises(ValueError, match="take bf16 activations, got float32"):
        relu2_mgpu.up_relu2(x.astype(jnp.float32), w1, b1)
    with pytest.raises(ValueError, match="post must be"):
        relu2_mgpu.d_pre(dy, w2, jnp.zeros((512, 128), jnp.bfloat16), column_sum=True)
    with pytest.raises(ValueError, match="tile_n = 96 must be a multiple of 64"):
        relu2_mgpu.up_relu2(x, w1, b1, tiles=relu2_mgpu.Tiles(tile_n=96))


@pytest.mark.parametrize("tiling", TILINGS)
def test_lowers_for_hopper(tiling):
    """The compiled path (wgmma, TMA, the epilogues in the WGMMA layout) lowers to Mosaic GPU for
    CUDA at every tiling the bench sweeps, without a GPU: the simulator skips lowering."""
    tm, tn, tk, stages = tiling
    tiles = relu2_mgpu.Tiles(tile_m=tm, tile_n=tn, tile_k=tk, stages=stages)
    n, d, f = 49152, 768, 3072  # record #77's stage-2 micro-batch
    bf16 = jnp.bfloat16

    def up_and_d_pre(x, w1, b1, dy, w2):
        post = relu2_mgpu.up_relu2(x, w1, b1, tiles=tiles)
        return relu2_mgpu.d_pre(dy, w2, post, column_sum=True, tiles=tiles)

    shapes = [(n, d, bf16), (d, f, bf16), (f, jnp.float32), (n, d, bf16), (f, d, bf16)]
    args = [jax.ShapeDtypeStruct(s[:-1], s[-1]) for s in shapes]
    text = jax.jit(up_and_d_pre).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "relu2_up_mgpu" in text and "relu2_dpre_mgpu" in text
