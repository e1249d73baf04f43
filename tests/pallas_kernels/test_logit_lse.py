"""logit_lse against its plain-JAX reference and against the head's own XLA forward.

`_LogitLseTest` runs compiled (GPU only, at `simple`'s vocabulary); `TestLogitLseInterpret`
runs the same checks in the Pallas interpreter on CPU at small shapes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxrun.model import head_loss
from pallas_kernels.logit_lse import CAPS, logit_lse, reference
from tests.pallas_kernels.checks import fresh_seed

CAP_VALUE = 15.0
# Absolute, on lse: an error of δ in lse is a relative error of δ in Σ exp(s − c), and that is what
# the loss sees. The kernel and the reference differ in the order of that float32 sum (128-column
# tree sums, then 393 partials, against XLA's own blocking: a few 2^-24 over log2(V) ≈ 16 levels,
# about 1e-6) and, on a GPU, in the last bits of exp, rsqrt and tanh (libdevice against XLA's
# own), which move s by a few ulp of c = 15, about 3e-6. 1e-5 leaves a factor of 3 over both.
LSE_ATOL = 1e-5


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _inputs(seed, n, v, bias):
    """Raw bf16 logits, some beyond the cap, and a float32 bias; on the device, in one program."""
    k = jax.random.split(jax.random.key(seed))
    zraw = (4 * jax.random.normal(k[0], (n, v))).astype(jnp.bfloat16)
    return zraw, (0.5 * jax.random.normal(k[1], (v,)) if bias else None)


@functools.partial(jax.jit, static_argnames=("cap",))
def _max_err(lse, zraw, b, *, cap):
    """Largest |lse − reference|, the reference in one jitted reduction: at `simple`'s [65536,
    50304] its float32 temporaries run eagerly do not fit an 80 GB card."""
    return jnp.max(jnp.abs(lse - reference(zraw, b, cap=cap, cap_value=CAP_VALUE)))


class _LogitLseTest:
    INTERPRET = False
    SHAPES = ((65536, 50304), (4096, 50304), (1000, 1024))  # simple's micro-batch; N not a power of two
    TILES = ()

    @pytest.mark.parametrize("cap", CAPS)
    @pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
    def test_matches_reference(self, cap, bias):
        for n, v in self.SHAPES:
            seed = fresh_seed()
            zraw, b = _inputs(seed, n, v, bias)
            lse = logit_lse(
                zraw, b, cap=cap, cap_value=CAP_VALUE, interpret=self.INTERPRET, **dict(self.TILES)
            )
            assert lse.dtype == jnp.float32 and lse.shape == (n,)
            err = float(_max_err(lse, zraw, b, cap=cap))
            assert err <= LSE_ATOL, f"lse {n}x{v} {cap}: max |error| {err:.2e} (seed {seed})"

    @pytest.mark.parametrize("cap", CAPS)
    def test_reference_is_the_heads_forward(self, cap):
        """The reference equals the lse inside head_loss.softcap_ce (bf16 logits, the bias added in
        bf16): the kernel's target is right. softcap_ce runs op by op here, so its bf16 sum is
        rounded as the reference's is (see logit_lse._biased)."""
        seed = fresh_seed()
        n, v, d = 64, self.SHAPES[-1][1], 32
        k = jax.random.split(jax.random.key(seed), 4)
        h = jax.random.normal(k[0], (n, d), jnp.bfloat16)
        w = (4 * jax.random.normal(k[1], (d, v)) / np.sqrt(d)).astype(jnp.bfloat16)
        b = 0.5 * jax.random.normal(k[2], (v,))
        targets = jax.random.randint(k[3], (n,), 0, v)
        losses = head_loss.softcap_ce(h, w, targets, b, cap=cap, cap_value=CAP_VALUE)
        zraw = h @ w
        z_target = jnp.take_along_axis(zraw + b.astype(zraw.dtype)[None], targets[:, None], 1)[:, 0]
        s_target, _ = head_loss._cap(z_target.astype(jnp.float32), cap, CAP_VALUE)
        lse = losses + s_target  # loss = lse − s_target: recover lse from the loss
        err = float(jnp.max(jnp.abs(reference(zraw, b, cap=cap, cap_value=CAP_VALUE) - lse)))
        assert err <= LSE_ATOL, f"{cap}: max |error| {err:.2e} (seed {seed})"


@pytest.mark.gpu
class TestLogitLse(_LogitLseTest):
    """Compiled Triton kernel."""


class TestLogitLseInterpret(_LogitLseTest):
    """The same kernel in the Pallas interpreter, small enough for CPU CI."""

    INTERPRET = True
    SHAPES = ((64, 512), (40, 256))  # several row blocks and column blocks; N = 8·5
    TILES = (("block_rows", 32), ("block_m", 8))


@pytest.mark.gpu
def test_compiled_inside_shard_map():
    """Rows split over every device, shard_map's varying-axes check on, as the train step runs it."""
    seed = fresh_seed()
    mesh = jax.make_mesh((jax.device_count(),), ("dp",))
    zraw, b = _inputs(seed, 4096 * jax.device_count(), 1024, True)
    sharded = jax.jit(
        jax.shard_map(
            functools.partial(logit_lse, cap="isru", cap_value=CAP_VALUE),
            mesh=mesh,
            in_specs=(P("dp"), P()),
            out_specs=P("dp"),
            check_vma=True,
        )
    )
    lse = sharded(
        jax.device_put(zraw, jax.NamedSharding(mesh, P("dp"))),
        jax.device_put(b, jax.NamedSharding(mesh, P())),
    )
    err = float(_max_err(lse, zraw, b, cap="isru"))
    assert err <= LSE_ATOL, f"max |error| {err:.2e} (seed {seed})"


def test_bad_input_is_refused():
    zraw, b = _inputs(0, 32, 256, True)
    kw = {"cap_value": CAP_VALUE, "interpret": True}
    with pytest.raises(ValueError, match="multiple of block_v"):
        logit_lse(*_inputs(0, 32, 200, True), cap="isru", **kw)
    with pytest.raises(ValueError, match="cap must be one of"):
        logit_lse(zraw, b, cap="sigmoid", **kw)
    with pytest.raises(ValueError, match="bias must have shape"):
        logit_lse(zraw, b[:128], cap="isru", **kw)
    with pytest.raises(ValueError, match="bias must have shape"):
        logit_lse(zraw, b[None], cap="isru", **kw)
    with pytest.raises(ValueError, match="must be \\[N, V\\]"):
        logit_lse(zraw[0], b, cap="isru", **kw)
    with pytest.raises(ValueError, match="powers of two"):
        logit_lse(zraw, b, cap="isru", block_m=24, **kw)
