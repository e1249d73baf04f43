"""symmetric_mm's kernels against their fp32 references, forward and VJP, and in Newton–Schulz.

`_SymmetricMmTest` holds the checks with `INTERPRET = False` (compiled kernels,
GPU only, at record #77's bank shapes); `TestSymmetricMmInterpret` flips it to
run the same kernels in the Pallas interpreter on CPU, at small sizes that are
not tile multiples.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrun import muon as jm
from pallas_kernels import symmetric_mm as smm
from tests.pallas_kernels.checks import fresh_seed

# Errors are measured after dividing by max|reference|, so one tolerance fits every size.
FWD_TOL = {
    jnp.bfloat16: {"atol": 1e-2, "rtol": 1e-2},  # one bf16 rounding of the output, ~2^-8
    jnp.float32: {"atol": 2e-5, "rtol": 2e-5},
}
VJP_TOL = {
    jnp.bfloat16: {"atol": 2e-2, "rtol": 2e-2},  # the backward also rounds G + Gᵀ to bf16
    jnp.float32: {"atol": 5e-5, "rtol": 5e-5},
}
# A middle Polar Express step: b·A + c·A² with A's eigenvalues in [0, 1].
B_COEF, C_COEF = -2.772484153217685, 0.5060648178503393
PE = jm.NS_PRESETS["polar_express"]


def _assert_close(name, actual, expected, tol, seed):
    scale = float(jnp.max(jnp.abs(expected.astype(jnp.float32)))) or 1.0
    chex.assert_shape(actual, expected.shape)
    chex.assert_tree_all_finite(actual)
    try:
        chex.assert_trees_all_close(
            actual.astype(jnp.float32) / scale, expected.astype(jnp.float32) / scale, **tol
        )
    except AssertionError as e:
        raise AssertionError(f"{name} (seed {seed}, max|ref| {scale:.3g}): {e}") from None


def _unit_spectrum(seed, shape, dtype):
    """Random matrices divided by their Frobenius norm, as Newton–Schulz sees them."""
    x = jax.random.normal(jax.random.key(seed), shape)
    return (x / jnp.sqrt(jnp.sum(x * x, axis=(-2, -1), keepdims=True))).astype(dtype)


def _value_and_grad(f, x, seed):
    """f(x) and the gradient of sum(f(x) · w) for a seeded random w."""
    w = jax.random.normal(jax.random.key(seed + 1), f(x).shape)
    loss = lambda x: jnp.sum(f(x).astype(jnp.float32) * w)
    return f(x), jax.grad(loss)(x)


class _SymmetricMmTest:
    INTERPRET = False
    # (shape, dtype): batched wide, tall and square; the last two are not tile multiples.
    GRAM_SHAPES = ((10, 768, 768), (11, 768, 3072), (11, 3072, 768), (3, 700, 1000))
    SQUARE_SHAPES = ((10, 768, 768), (3, 700, 700))
    NS_SHAPES = ((10, 768, 768), (11, 768, 3072), (11, 3072, 768))
    BLOCK_SIZES = smm.BlockSizes.get_default()

    def _kw(self):
        return {"block_sizes": self.BLOCK_SIZES, "interpret": self.INTERPRET}

    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
    @pytest.mark.parametrize("which", ["xxt", "xtx"])
    def test_gram_matches_reference(self, which, dtype):
        kernel, reference = {"xxt": (smm.xxt, smm.xxt_reference), "xtx": (smm.xtx, smm.xtx_reference)}[which]
        for shape in self.GRAM_SHAPES:
            seed = fresh_seed()
            x = _unit_spectrum(seed, shape, dtype)
            y, dx = _value_and_grad(lambda x: kernel(x, **self._kw()), x, seed)
            y_ref, dx_ref = _value_and_grad(reference, x, seed)
            assert y.dtype == dtype and dx.dtype == dtype
            _assert_close(f"{which}{shape}", y, y_ref, FWD_TOL[dtype], seed)
            _assert_close(f"d{which}{shape}", dx, dx_ref, VJP_TOL[dtype], seed)

    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
    def test_ba_plus_caa_matches_reference(self, dtype):
        for shape in self.SQUARE_SHAPES:
            seed = fresh_seed()
            a = smm.xxt_reference(_unit_spectrum(seed, shape, jnp.float32)).astype(dtype)
            f = lambda a: smm.ba_plus_caa(a, B_COEF, C_COEF, **self._kw())
            y, da = _value_and_grad(f, a, seed)
            y_ref, da_ref = _value_and_grad(lambda a: smm.ba_plus_caa_reference(a, B_COEF, C_COEF), a, seed)
            assert y.dtype == dtype and da.dtype == dtype
            _assert_close(f"ba_plus_caa{shape}", y, y_ref, FWD_TOL[dtype], seed)
            _assert_close(f"d ba_plus_caa{shape}", da, da_ref, VJP_TOL[dtype], seed)

    def test_outputs_are_exactly_symmetric(self):
        """Every off-diagonal tile is stored twice: the output equals its transpose bit for bit."""
        seed = fresh_seed()
        x = _unit_spectrum(seed, self.GRAM_SHAPES[-1], jnp.bfloat16)
        for y in (smm.xxt(x, **self._kw()), smm.xtx(x, **self._kw())):
            y = smm.ba_plus_caa(y, B_COEF, C_COEF, **self._kw())
            chex.assert_trees_all_equal(y, jnp.swapaxes(y, -1, -2))

    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
    def test_newton_schulz_pallas_matches_xla(self, dtype):
        """Polar Express with the kernels gives XLA's result to a couple of bf16 roundings."""
        for shape in self.NS_SHAPES:
            seed = fresh_seed()
            x = jax.random.normal(jax.random.key(seed), shape)
            got, want = (
                jm.newton_schulz(x, PE, 1e-6, dtype=dtype, round_first=True, impl=impl)
                for impl in ("pallas", "xla")
            )
            diff = jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))
            # bf16: a few roundings apart at most, and most entries equal; fp32: summation order only.
            ulps = 4 if dtype == jnp.bfloat16 else 1000
            bound = ulps * float(jnp.finfo(dtype).eps) * float(jnp.max(jnp.abs(want)))
            msg = f"{shape} {jnp.dtype(dtype).name} seed {seed}"
            assert float(jnp.max(diff)) <= bound, msg
            assert float(jnp.mean(diff)) <= bound / 8, msg


@pytest.mark.gpu
class TestSymmetricMm(_SymmetricMmTest):
    """Compiled Triton kernels at record #77's bank shapes."""


class TestSymmetricMmInterpret(_SymmetricMmTest):
    """The same kernels in the Pallas interpreter, small enough for CPU CI."""

    INTERPRET = True
    GRAM_SHAPES = ((2, 3, 40, 72), (3, 72, 40), (2, 48, 48))
    SQUARE_SHAPES = ((3, 40, 40), (2, 48, 48))
    # newton_schulz uses the default 128-wide tiles: 160 is two tiles a side, the second padded.
    NS_SHAPES = ((2, 160, 200), (2, 200, 160), (1, 160, 160))
    BLOCK_SIZES = smm.BlockSizes(block_m=16, block_k=16)


@pytest.mark.parametrize("tiles", [1, 2, 5, 12])
def test_upper_tiles_are_each_visited_once(tiles):
    pairs = [
        tuple(int(v) for v in smm._upper_tile(jnp.int32(t), tiles)) for t in range(tiles * (tiles + 1) // 2)
    ]
    assert sorted(pairs) == [(i, j) for i in range(tiles) for j in range(i, tiles)]


def test_block_k_smaller_than_block_m():
    seed = fresh_seed()
    x = _unit_spectrum(seed, (2, 72, 40), jnp.float32)
    bs = smm.BlockSizes(block_m=32, block_k=16)
    for kernel, reference in ((smm.xxt, smm.xxt_reference), (smm.xtx, smm.xtx_reference)):
        _assert_close(
            kernel.__name__,
            kernel(x, block_sizes=bs, interpret=True),
            reference(x),
            FWD_TOL[jnp.float32],
            seed,
        )
    a = smm.xtx_reference(x)
    y = smm.ba_plus_caa(a, B_COEF, C_COEF, block_sizes=bs, interpret=True)
    _assert_close("ba_plus_caa", y, smm.ba_plus_caa_reference(a, B_COEF, C_COEF), FWD_TOL[jnp.float32], seed)


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="square"):
        smm.ba_plus_caa(jnp.zeros((2, 3, 4)), 1.0, 1.0, interpret=True)
    with pytest.raises(ValueError, match="powers of two"):
        smm.xxt(jnp.zeros((3, 4)), block_sizes=smm.BlockSizes(block_m=48), interpret=True)
    with pytest.raises(ValueError, match="impl"):
        jm.newton_schulz(jnp.zeros((3, 4)), PE, impl="triton")
    with pytest.raises(ValueError, match="ns_impl"):
        jm.scale_by_muon(ns_impl="triton")


def _check_sharded_pallas_update(mesh: jax.sharding.Mesh, check_vma: bool):
    """NorMuon with ns_impl="pallas" on one slice of the stacked axis per device (as ZeRO-1 runs
    it, inside shard_map) matches the unsharded XLA update."""
    rng = np.random.default_rng(11)
    shapes = {"wide": (8, 24, 40), "tall": (8, 40, 24)}
    params = {k: jnp.asarray(rng.standard_normal(s) * 0.1, jnp.float32) for k, s in shapes.items()}
    grads = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
    # fp32 Newton–Schulz, so the two implementations agree to fp32 summation order.
    kw = {"scaling": "normuon", "ns": "polar_express", "ns_dtype": jnp.float32, "ns_round_first": True}
    xla = jm.scale_by_muon(**kw)
    pallas = jm.scale_by_muon(ns_impl="pallas", **kw)
    state = xla.init(params)
    stacked = P("dp")
    state_specs = jax.tree.map(lambda a: stacked if a.ndim else P(), state)
    sharded = jax.jit(
        jax.shard_map(
            pallas.update,
            mesh=mesh,
            in_specs=(stacked, state_specs, stacked),
            out_specs=(stacked, state_specs),
            check_vma=check_vma,
        )
    )

    def place(tree, specs):
        shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
        return jax.device_put(tree, shardings)

    for _ in range(2):
        want, state_want = xla.update(grads, state, params)
        got, state_got = sharded(place(grads, stacked), place(state, state_specs), place(params, stacked))
        # Entries up to ~0.5 differ by fp32 summation order, amplified by Polar Express's first step.
        chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)
        chex.assert_trees_all_close(state_got, state_want, rtol=1e-4, atol=1e-6)
        state = state_want
        params = optax.apply_updates(params, want)


def test_sharded_pallas_update_matches_unsharded_xla():
    # The Pallas interpreter's block slicing fails shard_map's varying-axes check (as for the
    # model's kernels, see train._check_kernels_can_train), so on CPU the check is off.
    _check_sharded_pallas_update(jax.make_mesh((8,), ("dp",)), check_vma=False)


@pytest.mark.gpu
def test_sharded_pallas_update_compiled():
    """The compiled kernels inside shard_map with its varying-axes check on, as the train step runs them."""
    _check_sharded_pallas_update(jax.make_mesh((jax.device_count(),), ("dp",)), check_vma=True)
