"""logit_grad against its plain-JAX reference and against the head's own XLA backward.

`_LogitGradTest` runs compiled (GPU only, at `simple`'s vocabulary); `TestLogitGradInterpret`
runs the same checks in the Pallas interpreter on CPU at small shapes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrun.model import head_loss
from pallas_kernels.logit_grad import logit_grad, reference
from tests.pallas_kernels.checks import errors, fresh_seed

CAP_VALUE = 15.0
# After dividing by max|reference|: one bf16 step of the output. dz is rounded to bf16, and a last
# float32 bit (another exp or tanh, or z = zraw + b rounded to bf16 in one place and not in the
# other) flips the rounding of a few entries.
DZ_TOL = 1e-2
DB_TOL = 1e-2


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _inputs(seed, n, v, bias):
    """Raw bf16 logits, their true log-sum-exp (so p ≤ 1), some ignored rows (target -1); in one
    program on the device: run eagerly, the float32 [N, V] temporaries do not fit an 80 GB card."""
    k = jax.random.split(jax.random.key(seed), 5)
    zraw = (4 * jax.random.normal(k[0], (n, v))).astype(jnp.bfloat16)
    b = 0.5 * jax.random.normal(k[1], (v,)) if bias else None
    targets = jax.random.randint(k[2], (n,), -1, v)
    z = zraw if b is None else zraw + b.astype(zraw.dtype)[None]
    r = jax.lax.rsqrt(jnp.square(z.astype(jnp.float32)) + CAP_VALUE**2)
    lse = jax.nn.logsumexp(CAP_VALUE * z.astype(jnp.float32) * r, axis=1)
    g = jnp.where(targets >= 0, jax.random.uniform(k[3], (n,)), 0.0)
    return zraw, b, targets, lse, g


# Jitted, as the inputs are: eagerly, each float32 [N, V] temporary at `simple`'s shape is 12.3 GiB,
# and a few of them beside the logits and dz run an 80 GB card out of memory.
_reference = jax.jit(reference, static_argnames=("cap", "cap_value"))
_column_sum = jax.jit(lambda dz: jnp.sum(dz.astype(jnp.float32), axis=0))


class _LogitGradTest:
    INTERPRET = False
    SHAPES = ((65536, 50304), (4096, 50304), (1000, 1024))  # simple's micro-batch; N not a power of two
    TILES = ()

    @pytest.mark.parametrize("cap", ["isru", "tanh"])
    @pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
    def test_matches_reference(self, cap, bias):
        for n, v in self.SHAPES:
            seed = fresh_seed()
            zraw, b, targets, lse, g = _inputs(seed, n, v, bias)
            dz, db = logit_grad(
                zraw,
                b,
                targets,
                lse,
                g,
                cap=cap,
                cap_value=CAP_VALUE,
                interpret=self.INTERPRET,
                **dict(self.TILES),
            )
            want_dz, want_db = _reference(zraw, b, targets, lse, g, cap=cap, cap_value=CAP_VALUE)
            assert dz.dtype == zraw.dtype and dz.shape == zraw.shape
            worst, mean = errors(dz, want_dz)
            assert worst <= DZ_TOL, f"dz {n}x{v} {cap} (seed {seed})"
            assert mean <= 1e-4, f"dz {n}x{v} {cap} (seed {seed}): more than a few entries"
            if bias:
                assert db.dtype == jnp.float32
                # the sum of the kernel's own bf16 dz, then against the reference's
                assert errors(db, _column_sum(dz))[0] <= 1e-5, f"seed {seed}"
                assert errors(db, want_db)[0] <= DB_TOL, f"db {n}x{v} {cap} (seed {seed})"
            else:
                assert db is None

    def test_reference_is_the_heads_backward(self):
        """The reference equals head_loss's XLA VJP through the logits: the kernel's target is right."""
        seed = fresh_seed()
        n, v, d = 64, self.SHAPES[-1][1], 32
        k = jax.random.split(jax.random.key(seed), 4)
        h = jax.random.normal(k[0], (n, d), jnp.float32)
        w = jax.random.normal(k[1], (d, v), jnp.float32) / np.sqrt(d)
        b = 0.5 * jax.random.normal(k[2], (v,))
        targets = jax.random.randint(k[3], (n,), -1, v)
        losses, vjp = jax.vjp(
            lambda w, b: head_loss.softcap_ce(h, w, targets, b, cap="isru", cap_value=CAP_VALUE), w, b
        )
        g = jnp.where(targets >= 0, 1.0, 0.0)
        dw, db = vjp(g)
        zraw = h @ w
        lse = (
            losses
            + jnp.take_along_axis(  # loss = lse − s_target: recover lse from the loss
                CAP_VALUE * (zraw + b[None]) * jax.lax.rsqrt(jnp.square(zraw + b[None]) + CAP_VALUE**2),
                jnp.maximum(targets, 0)[:, None],
                1,
            )[:, 0]
        )
        dz, db_ref = reference(zraw, b, targets, lse, g, cap="isru", cap_value=CAP_VALUE)
        assert errors(h.T @ dz, dw)[0] <= 1e-5
        assert errors(db_ref, db)[0] <= 1e-5


@pytest.mark.gpu
class TestLogitGrad(_LogitGradTest):
    """Compiled Triton kernel."""


class TestLogitGradInterpret(_LogitGradTest):
    """The same kernel in the Pallas interpreter, small enough for CPU CI."""

    INTERPRET = True
    SHAPES = ((256, 384), (96, 256))  # several row blocks and column blocks; N = 32·3
    TILES = (("block_rows", 64), ("block_m", 16))


def test_bad_shapes_are_refused():
    zraw, b, targets, lse, g = _inputs(0, 32, 200, True)
    with pytest.raises(ValueError, match="multiple of block_v"):
        logit_grad(zraw, b, targets, lse, g, cap="isru", cap_value=CAP_VALUE, interpret=True)
    zraw, b, targets, lse, g = _inputs(0, 32, 256, True)
    with pytest.raises(ValueError, match="cap must be one of"):
        logit_grad(zraw, b, targets, lse, g, cap="sigmoid", cap_value=CAP_VALUE, interpret=True)
    with pytest.raises(ValueError, match="need targets, lse and g"):
        logit_grad(zraw, b, targets[:16], lse, g, cap="isru", cap_value=CAP_VALUE, interpret=True)
