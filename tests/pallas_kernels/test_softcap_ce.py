"""softcap_ce against its fp32 reference: per-token loss and every gradient.

`_SoftcapCeTest` holds the checks with `INTERPRET = False` (compiled kernels,
GPU only); `TestSoftcapCeInterpret` flips it to run the same kernels in the
Pallas interpreter on CPU, with a small vocabulary.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.softcap_ce import BlockSizes, softcap_ce, softcap_ce_reference
from tests.pallas_kernels.checks import fresh_seed

# Errors are measured after dividing by max|reference|, so one tolerance fits every size.
FWD_TOL = {jnp.bfloat16: {"atol": 1e-4, "rtol": 1e-4}}  # fp32 logits from bf16 operands
VJP_TOL = {jnp.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}  # bf16 dlogits feed the dx/dw GEMMs
SAVED_FWD_TOL = {jnp.bfloat16: {"atol": 5e-3, "rtol": 5e-3}}  # loss from bf16-rounded logits
CAPS = [("isru", 15.0), ("sigmoid", 23.0)]
GRAD_NAMES = ("dx", "dw", "db")


def _assert_close(name, actual, expected, tol, seed):
    scale = float(jnp.max(jnp.abs(expected))) or 1.0
    chex.assert_shape(actual, expected.shape)
    chex.assert_tree_all_finite(actual)
    try:
        chex.assert_trees_all_close(actual.astype(jnp.float32) / scale, expected / scale, **tol)
    except AssertionError as e:
        raise AssertionError(f"{name} (seed {seed}, max|ref| {scale:.3g}): {e}") from None


def _inputs(seed, lead, d, v, logit_std, bias, dtype=jnp.bfloat16):
    """Raw logits of std `logit_std`; about one target in eight is ignored (-1)."""
    k = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(k[0], (*lead, d)).astype(dtype)
    w = (logit_std / np.sqrt(d) * jax.random.normal(k[1], (d, v))).astype(dtype)
    t = jax.random.randint(k[2], lead, 0, v)
    t = jnp.where(jax.random.uniform(k[3], lead) < 0.125, -1, t)
    b = jax.random.normal(k[4], (v,)).astype(dtype) if bias else None
    g = jax.random.uniform(k[5], lead, minval=0.5, maxval=1.5)
    return x, w, t, b, g


class _SoftcapCeTest:
    INTERPRET = False
    LEAD = (3, 333)  # 999 tokens: not a multiple of block_m
    D, V = 768, 50304
    BLOCK_SIZES = BlockSizes.get_default()
    CHUNK = 256  # several backward chunks at LEAD's size

    def _run(self, x, w, t, b, g, cap, cap_value, block_sizes, save_logits=False):
        kw = {"cap": cap, "cap_value": cap_value}
        ce = lambda *a: softcap_ce(
            a[0],
            a[1],
            t,
            *a[2:],
            **kw,
            block_sizes=block_sizes,
            save_logits=save_logits,
            interpret=self.INTERPRET,
        )
        ref = lambda *a: softcap_ce_reference(a[0], a[1], t, *a[2:], **kw)
        args = (x, w) if b is None else (x, w, b)
        loss, vjp = jax.vjp(ce, *args)
        loss_ref, vjp_ref = jax.vjp(ref, *args)
        return (loss, vjp(g)), (loss_ref, vjp_ref(g))

    def _check(self, seed, outs, refs, fwd_tol=FWD_TOL):
        (loss, grads), (loss_ref, grads_ref) = outs, refs
        assert loss.dtype == jnp.float32
        _assert_close("loss", loss, loss_ref, fwd_tol[jnp.bfloat16], seed)
        for name, g, g_ref in zip(GRAD_NAMES, grads, grads_ref):
            _assert_close(name, g, g_ref, VJP_TOL[jnp.bfloat16], seed)

    @pytest.mark.parametrize("bias", [False, True])
    @pytest.mark.parametrize("cap,cap_value", CAPS)
    def test_matches_reference(self, cap, cap_value, bias):
        seed = fresh_seed()
        x, w, t, b, g = _inputs(seed, self.LEAD, self.D, self.V, logit_std=3.0, bias=bias)
        outs, refs = self._run(x, w, t, b, g, cap, cap_value, self.BLOCK_SIZES)
        self._check(seed, outs, refs)

    @pytest.mark.parametrize("cap,cap_value", CAPS)
    def test_saturated_caps_and_chunked_backward(self, cap, cap_value):
        """Raw logits in the hundreds sit on the cap's flat tails; the backward runs in chunks."""
        seed = fresh_seed()
        x, w, t, b, g = _inputs(seed, self.LEAD, self.D, self.V, logit_std=300.0, bias=True)
        bs = dataclasses.replace(self.BLOCK_SIZES, bwd_chunk=self.CHUNK)
        outs, refs = self._run(x, w, t, b, g, cap, cap_value, bs)
        self._check(seed, outs, refs)

    @pytest.mark.parametrize("cap,cap_value", CAPS)
    def test_saved_logits(self, cap, cap_value):
        """save_logits=True: bf16 logits kept for the backward instead of recomputed."""
        seed = fresh_seed()
        x, w, t, b, g = _inputs(seed, self.LEAD, self.D, self.V, logit_std=30.0, bias=True)
        bs = dataclasses.replace(self.BLOCK_SIZES, bwd_chunk=self.CHUNK)
        outs, refs = self._run(x, w, t, b, g, cap, cap_value, bs, save_logits=True)
        self._check(seed, outs, refs, fwd_tol=SAVED_FWD_TOL)

    def test_ignored_targets(self):
        """Negative targets give loss 0 and no gradient, also when every target is ignored."""
        seed = fresh_seed()
        x, w, t, b, g = _inputs(seed, self.LEAD, self.D, self.V, logit_std=3.0, bias=True)
        t = t.at[0].set(-1)
        f = lambda x, w, b: softcap_ce(x, w, t, b, block_sizes=self.BLOCK_SIZES, interpret=self.INTERPRET)
        loss, vjp = jax.vjp(f, x, w, b)
        dx, _dw, _db = vjp(g)
        ignored = np.asarray(t < 0)
        assert np.all(np.asarray(loss)[ignored] == 0.0) and np.all(np.asarray(loss)[~ignored] > 0.0)
        chex.assert_trees_all_equal(dx[ignored], jnp.zeros_like(dx[ignored]))
        dead = lambda x, w, b: softcap_ce(
            x, w, jnp.full_like(t, -1), b, block_sizes=self.BLOCK_SIZES, interpret=self.INTERPRET
        )
        loss, vjp = jax.vjp(dead, x, w, b)
        chex.assert_trees_all_equal((loss, *vjp(g)), jax.tree.map(jnp.zeros_like, (loss, x, w, b)))


@pytest.mark.gpu
class TestSoftcapCe(_SoftcapCeTest):
    """Compiled Triton kernels with the GPT-2 vocabulary."""


class TestSoftcapCeInterpret(_SoftcapCeTest):
    """The same kernels in the Pallas interpreter, small enough for CPU CI."""

    INTERPRET = True
    LEAD = (2, 100)
    D, V = 64, 500  # V not a multiple of block_v: exercises vocab padding
    BLOCK_SIZES = BlockSizes(block_m=64, block_v=128, block_k=32, group_m=2, bwd_chunk=0)
    CHUNK = 64
