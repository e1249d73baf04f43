"""The sharded (ZeRO-1) step: same maths as one device, state split across devices."""

import dataclasses
from collections import Counter

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core

from jaxrun import adam_hold, model, schedule, sharding, train
from jaxrun.config import MeshConfig, apply_overrides

from .test_train import _batch, _hidden, _steps


@pytest.fixture
def cfg(tiny_cfg):
    # 3 layers: not a multiple of 2, 4 or 8, so the layer padding is exercised
    return apply_overrides(tiny_cfg, ["optim.muon_ns_dtype=float32", "model.init=gpt2", "model.num_layers=3"])


def _per_device_bytes(tree):
    per_device = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return per_device


def test_layer_and_flat_round_trip():
    """owned_part then gather_param rebuilds each leaf, for both layouts and odd sizes."""
    mesh = sharding.make_mesh(MeshConfig(num_devices=8))
    x = np.arange(3 * 5 * 7, dtype=np.float32).reshape(3, 5, 7)

    for layout in (sharding.Layout.LAYERS, sharding.Layout.FLAT):

        def roundtrip(x, layout=layout):
            part = sharding.owned_part(x, layout, "dp")
            return sharding.gather_param(part, layout, "dp", x.shape)

        f = jax.shard_map(roundtrip, mesh=mesh, in_specs=jax.P(), out_specs=jax.P())
        np.testing.assert_array_equal(jax.jit(f)(x), x)


def test_reduce_scatter_sums_each_owned_part():
    mesh = sharding.make_mesh(MeshConfig(num_devices=8))
    per_device = np.random.default_rng(0).normal(size=(8, 3, 4)).astype(np.float32)

    def body(g):  # g: this device's [1, 3, 4] contribution
        summed = sharding.reduce_grad(g[0], sharding.Layout.LAYERS, "dp")  # [1, 4]: layer padded to 8
        return summed

    x = jax.device_put(per_device, jax.NamedSharding(mesh, jax.P("dp")))
    out = np.asarray(jax.jit(jax.shard_map(body, mesh=mesh, in_specs=jax.P("dp"), out_specs=jax.P("dp")))(x))
    np.testing.assert_allclose(out[:3], per_device.sum(0), rtol=1e-5)
    np.testing.assert_array_equal(out[3:], 0.0)


def test_sharded_optimizer_matches_replicated(cfg):
    replicated = apply_overrides(cfg, ["mesh.shard_optimizer=false", "train.micro_batch_seqs=1"])
    sharded = apply_overrides(cfg, ["train.micro_batch_seqs=1"])
    batches = [_batch(i, cfg) for i in range(3)]
    s_rep, l_rep = _steps(replicated, batches, num_devices=8)
    s_sh, l_sh = _steps(sharded, batches, num_devices=8)
    np.testing.assert_allclose(l_rep, l_sh, rtol=1e-5)
    chex.assert_trees_all_close(_hidden(s_rep.params), _hidden(s_sh.params), rtol=1e-4, atol=1e-5)


def test_optimizer_state_is_split_across_devices(cfg):
    cfg = apply_overrides(cfg, ["model.num_layers=8"])  # whole layers per device, no padding
    mesh8 = sharding.make_mesh(MeshConfig(num_devices=8))
    full = train.init_state(apply_overrides(cfg, ["mesh.shard_optimizer=false"]), jax.random.key(0), mesh8)
    split = train.init_state(cfg, jax.random.key(0), mesh8)
    full_bytes, split_bytes = _per_device_bytes(full.opt_state), _per_device_bytes(split.opt_state)
    assert len(split_bytes) == 8
    for device, nbytes in split_bytes.items():
        # 1/8 of the state, plus the flat slices' padding and the replicated step counts
        assert nbytes < 0.13 * full_bytes[device], (device, nbytes, full_bytes[device])


@pytest.mark.parametrize("devices", [1, 2, 4, 8])
def test_device_counts_agree_after_three_steps(cfg, devices):
    """The recipe's maths is fixed by batch_seqs: fewer devices accumulate more micro-batches
    (8, 4, 2, 1 of one sequence each), as the reference does with 8 // world_size."""
    s1, l1 = _steps(cfg, [_batch(i, cfg) for i in range(3)], num_devices=1)
    accum = cfg.data.batch_seqs // devices
    batches = [_batch(i, cfg, accum=accum) for i in range(3)]
    s_n, l_n = _steps(apply_overrides(cfg, ["train.micro_batch_seqs=1"]), batches, num_devices=devices)
    np.testing.assert_allclose(l1, l_n, rtol=1e-5)
    chex.assert_trees_all_close(_hidden(s1.params), _hidden(s_n.params), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """2 processes × 4 CPU devices through jax.distributed on localhost = 1 process × 8 devices."""
    import json
    import os
    import socket
    import subprocess
    import sys

    def run(env_extra, devices):
        env = {k: v for k, v in os.environ.items() if not k.startswith("JAXRUN_")}
        env |= {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **env_extra}
        return subprocess.Popen(
            [sys.executable, "-m", "tests.distributed_worker"], env=env, stdout=subprocess.PIPE, text=True
        )

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    coord = {"JAXRUN_COORDINATOR": f"127.0.0.1:{port}", "JAXRUN_NUM_PROCESSES": "2"}
    workers = [run(coord | {"JAXRUN_PROCESS_ID": str(i)}, 4) for i in range(2)]
    single = run({}, 8)
    outs = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in [*workers, single]]
    assert all(p.returncode == 0 for p in [*workers, single])
    assert [o["devices"] for o in outs] == [8, 8, 8]
    for o in outs[:2]:
        np.testing.assert_allclose(o["losses"], outs[2]["losses"], rtol=1e-5)
        np.testing.assert_allclose(o["w_up_sum"], outs[2]["w_up_sum"], rtol=1e-5)


def _tiny_record77():
    """record77 at test size: vocab 256, width 96, 32-token rows, windows in blocks of 8, float32."""
    import launch

    r = dataclasses.replace
    cfg = launch.load_config("record77")
    m = r(
        cfg.model,
        vocab_size=256,
        model_dim=96,
        head_dim=16,
        compute_dtype="float32",
        attn=r(cfg.model.attn, windows=r(cfg.model.attn.windows, block=8)),
    )
    return r(
        cfg,
        model=m,
        optim=r(cfg.optim, muon_ns_dtype="float32"),
        data=r(cfg.data, seq_len=32, max_doc_len=16),
        train=r(cfg.train, progress=False),
    )


def _collectives(jaxpr) -> Counter:
    """Collective primitives in a jaxpr and every jaxpr inside it (shard_map, scan, cond)."""
    found = Counter()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("reduce_scatter", "all_gather_invariant"):  # psum_scatter, all_gather
            found[eqn.primitive.name] += 1
        if eqn.primitive.name in ("psum", "psum_invariant"):  # all-reduces, by what they carry
            found.update(f"psum {v.aval.dtype}" for v in eqn.invars)
        for v in eqn.params.values():
            for x in v if isinstance(v, (tuple, list)) else (v,):
                if isinstance(x, (jax_core.ClosedJaxpr, jax_core.Jaxpr)):
                    found += _collectives(getattr(x, "jaxpr", x))
    return found


def test_record77_state_has_no_weak_types():
    """Every leaf of the fresh state is strongly typed, as the step's outputs are: a weakly typed
    init would make the jitted step compile again after its first update."""
    cfg = _tiny_record77()
    mesh = sharding.make_mesh(MeshConfig(num_devices=8))
    state = train.init_state(cfg, jax.random.key(0), mesh)
    weak = [
        jax.tree_util.keystr(p)
        for p, x in jax.tree_util.tree_leaves_with_path(state)
        if jax.typeof(x).weak_type
    ]
    assert weak == []


def test_record77_moves_adam_leaves_only_on_adam_steps():
    """On 8 devices the step between Adam's updates reduce-scatters and all-gathers NorMuon's
    leaves only; Adam's step moves Adam's leaves too, one reduce-scatter and one gather each, but
    for the token embedding while it is tied to the head. Every all-reduce carries float32."""
    from jaxrun import record_optim

    cfg = _tiny_record77()
    mesh = sharding.make_mesh(MeshConfig(num_devices=8))
    state = train.init_state(cfg, jax.random.key(0), mesh)
    spec = jax.ShapeDtypeStruct((1, 8, 32), jnp.int32, sharding=sharding.batch_sharding(mesh))
    batch = dict.fromkeys(("inputs", "targets", "segment_ids"), spec)
    kinds = jax.tree.leaves(record_optim.param_kinds(model.OPTIM_ROWS, state.params))
    assert sorted(state.held) and len(state.held) == kinds.count("adam")
    untied = schedule.split_step(cfg) + 1
    assert schedule.train_mode(cfg, 0).tied and not schedule.train_mode(cfg, untied).tied
    for at_step, still in ((0, 1), (untied, 0)):  # the tied embedding moves nothing, Adam's step or not
        counts = {}
        for adam_step in (False, True):
            step = train.make_train_step(cfg, mesh, schedule.train_mode(cfg, at_step), adam_step)
            counts[adam_step] = _collectives(jax.make_jaxpr(step)(state, batch).jaxpr)
        for name in ("reduce_scatter", "all_gather_invariant"):
            assert counts[True][name] - counts[False][name] == kinds.count("adam") - still, (name, counts)
            assert counts[False][name] == kinds.count("normuon"), (name, counts)
        # the token count goes as float32 beside the loss sum and the gradient norm, so XLA makes
        # them one all-reduce, not a second small collective for an integer
        for c in counts.values():
            assert {k for k in c if k.startswith("psum")} == {"psum float32"}, c
    with pytest.raises(ValueError, match="adam_step=None"):
        train.make_train_step(cfg, mesh, schedule.train_mode(cfg, 0))


@pytest.mark.slow
def test_record77_on_8_devices_matches_one():
    """record77's step (NorMuon on layer-split banks, Adam on flat slices every other step, the
    rank-mean loss, the tied embedding) gives one device's losses and params on 8 devices, where
    Adam's gradients wait unreduced on each device between its updates."""
    r, cfg = dataclasses.replace, _tiny_record77()
    rng = np.random.default_rng(7)
    batches = []
    for _ in range(4):  # even steps (NorMuon only) and odd ones (Adam too, on two steps' gradients)
        tokens = rng.integers(0, 256, (8, 33))
        segments = np.cumsum(rng.random((8, 32)) < 0.1, axis=1)
        batches.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments})
    results = {}
    for n in (1, 8):
        mesh = sharding.make_mesh(MeshConfig(num_devices=n))
        state = train.init_state(r(cfg, mesh=MeshConfig(num_devices=n)), jax.random.key(0), mesh)
        assert bool(state.held) == (n == 8)  # 8 devices hold Adam's gradients between its updates
        variants = [adam_hold.adam_step_of(cfg, n, k) for k in range(len(batches))]
        assert variants == ([None] * 4 if n == 1 else [False, True, False, True])
        step_fns = {
            a: train.make_train_step(cfg, mesh, schedule.train_mode(cfg, 0), a) for a in set(variants)
        }
        losses = []
        for local, adam_step in zip(batches, variants, strict=True):
            accum = 8 // n
            batch = {k: v.reshape(accum, 8 // accum, 32).astype(np.int32) for k, v in local.items()}
            state, metrics = step_fns[adam_step](
                state, sharding.global_batch(batch, sharding.batch_sharding(mesh))
            )
            losses.append(float(metrics["train_loss"]))
            if adam_step is not None:  # the sums wait until Adam's step, which starts them again
                assert any(np.any(x) for x in jax.device_get(state.held).values()) != adam_step
        results[n] = (losses, jax.device_get(state.params))
    np.testing.assert_allclose(results[8][0], results[1][0], rtol=1e-5)
    # Leaf by leaf, relative to the leaf's norm: Adam's first step is ±lr wherever a gradient is
    # nonzero, so an entry whose gradient is at rounding level may step either way.
    for path, one in jax.tree_util.tree_leaves_with_path(results[1][1]):
        eight = _leaf(results[8][1], path)
        assert np.linalg.norm(eight - one) <= 1e-4 * max(np.linalg.norm(one), 1e-12), jax.tree_util.keystr(
            path
        )


def _leaf(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree
