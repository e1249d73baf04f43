"""The fused XLA head + softcap + cross-entropy against plain-jnp autodiff, forward and VJP.

`head_loss.softcap_ce` (what `model.kernels.loss="xla_fused"` runs) must compute
the same loss and gradients as `softcap_ce_reference` (the "xla" path), in float32
and in bf16, and keep only bf16 `[N, V]` logits between the forward and the backward.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrun import model, sharding, train
from jaxrun.config import KernelConfig, MeshConfig, apply_overrides
from jaxrun.model import head_loss

# Errors are divided by max|reference| first, so one tolerance fits every size.
# bf16: XLA may drop the rounding of the logits to bf16 where the plain path upcasts them at once
# (excess precision), and keeps it where the fused path stores them: a bf16 ulp of z apart.
FWD_TOL = {jnp.float32: {"atol": 1e-6, "rtol": 1e-6}, jnp.bfloat16: {"atol": 5e-3, "rtol": 5e-3}}
# bf16: both round dL/dz to bf16, an ulp apart where the float32 values straddle a rounding
# boundary; dW leaves the fused GEMM in float32 instead of through bf16.
VJP_TOL = {jnp.float32: {"atol": 1e-5, "rtol": 1e-5}, jnp.bfloat16: {"atol": 1e-2, "rtol": 1e-2}}
N, D, V = 96, 32, 300


def _inputs(seed, dtype, bias, logit_std=20.0):
    """Raw logits of std `logit_std` (ISRU 15 saturates past ~15); one target in eight ignored."""
    k = jax.random.split(jax.random.key(seed), 6)
    h = jax.random.normal(k[0], (N, D)).astype(dtype)
    w = logit_std / np.sqrt(D) * jax.random.normal(k[1], (D, V))
    b = jax.random.normal(k[2], (V,)) if bias else None
    t = jax.random.randint(k[3], (N,), 0, V)
    t = jnp.where(jax.random.uniform(k[4], (N,)) < 0.125, -1, t)
    g = jax.random.uniform(k[5], (N,), minval=0.5, maxval=1.5)
    return h, w, b, t, g


def _close(name, actual, expected, tol):
    scale = float(jnp.max(jnp.abs(expected.astype(jnp.float32)))) or 1.0
    chex.assert_shape(actual, expected.shape)
    chex.assert_tree_all_finite(actual)
    a, e = (x.astype(jnp.float32) / scale for x in (actual, expected))
    np.testing.assert_allclose(a, e, err_msg=f"{name} (max|ref| {scale:.3g})", **tol)


def _value_and_vjp(fn, h, w, b, t, g, cap):
    losses, vjp = jax.vjp(lambda h, w, b: fn(h, w, t, b, cap=cap, cap_value=15.0), h, w, b)
    return losses, vjp(g)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("cap", ["isru", "tanh"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_reference(dtype, cap, bias):
    seed = 7 + 2 * (cap == "tanh") + bias
    h, w, b, t, g = _inputs(seed, dtype, bias)
    loss, grads = jax.jit(_value_and_vjp, static_argnums=(0, 6))(head_loss.softcap_ce, h, w, b, t, g, cap)
    loss_ref, grads_ref = jax.jit(_value_and_vjp, static_argnums=(0, 6))(
        head_loss.softcap_ce_reference, h, w, b, t, g, cap
    )
    _close("loss", loss, loss_ref, FWD_TOL[dtype])
    assert float(jnp.abs(loss[t < 0]).max()) == 0.0
    for name, a, e in zip(("dh", "dw", "db"), grads, grads_ref):
        if e is None:
            assert a is None
            continue
        assert a.dtype == e.dtype, name
        _close(name, a, e, VJP_TOL[dtype])


def test_ignored_targets_get_no_gradient():
    h, w, b, t, g = _inputs(3, jnp.float32, True)
    t = t.at[:10].set(-1)
    _, (dh, _, _) = _value_and_vjp(head_loss.softcap_ce, h, w, b, t, g, "isru")
    assert float(jnp.abs(dh[:10]).max()) == 0.0
    assert float(jnp.abs(dh[10:]).max()) > 0.0


def _nv_residuals(fn):
    h, w, b, t, _ = _inputs(5, jnp.bfloat16, True)
    _, vjp = jax.vjp(lambda h, w, b: fn(h, w, t, b, cap="isru", cap_value=15.0), h, w, b)
    return sorted(str(x.dtype) for x in jax.tree.leaves(vjp) if x.shape == (N, V))


def test_only_bf16_logits_reach_the_backward():
    """The plain path keeps float32 [N, V] residuals for its backward; the fused one only bf16 logits."""
    assert "float32" in _nv_residuals(head_loss.softcap_ce_reference)
    assert _nv_residuals(head_loss.softcap_ce) == ["bfloat16"]


def test_model_loss_and_grads_match_the_xla_path(tiny_cfg):
    """Through the whole model in bf16 (the sharded-step test below covers float32)."""
    cfg = dataclasses.replace(tiny_cfg.model, compute_dtype="bfloat16", num_layers=1, init="gpt2")
    fused = dataclasses.replace(cfg, kernels=KernelConfig(loss="xla_fused"))
    params = model.init(jax.random.key(1), cfg)
    tokens = jax.random.randint(jax.random.key(2), (2, 33), 0, cfg.vocab_size)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    value_and_grad = jax.jit(jax.value_and_grad(model.loss), static_argnums=2)
    loss, grads = value_and_grad(params, batch, cfg)
    loss_f, grads_f = value_and_grad(params, batch, fused)
    np.testing.assert_allclose(loss_f, loss, rtol=1e-5)
    for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(grads_f), jax.tree.leaves(grads)):
        scale = float(jnp.abs(e).max()) or 1.0
        # the plain path sums the bias gradient in bf16, the fused one in float32
        np.testing.assert_allclose(a / scale, e / scale, atol=4e-2, err_msg=jax.tree_util.keystr(path))


def test_sharded_train_step_runs_fused(tiny_cfg):
    """The custom VJP inside the step's shard_map, on 2 devices: the same losses as the XLA path."""
    cfg = apply_overrides(tiny_cfg, ["train.micro_batch_seqs=2", "model.num_layers=1"])
    losses = {}
    for loss in ("xla", "xla_fused"):
        c = apply_overrides(cfg, [f"model.kernels.loss={loss}"])
        c = dataclasses.replace(c, mesh=MeshConfig(num_devices=2))
        mesh = sharding.make_mesh(c.mesh)
        state, step = train.init_state(c, jax.random.key(0), mesh), train.make_train_step(c, mesh)
        tokens = np.asarray(jax.random.randint(jax.random.key(4), (8, 65), 0, 256))
        local = {"inputs": tokens[:, :-1].reshape(2, 4, 64), "targets": tokens[:, 1:].reshape(2, 4, 64)}
        batch = sharding.global_batch(local, sharding.batch_sharding(mesh))
        out = []
        for _ in range(2):
            state, metrics = step(state, batch)
            out.append(float(metrics["train_loss"]))
        losses[loss] = out
    np.testing.assert_allclose(losses["xla_fused"], losses["xla"], rtol=1e-5)
