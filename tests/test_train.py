"""The train step and loop: golden loss, accumulation, sharding, and a whole run."""

import dataclasses
import json
import re
import types
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

import launch
from jaxrun import data, sharding, train
from jaxrun.config import ConfigError, MeshConfig, apply_overrides

# The loss after one update of `tiny_cfg` from seed 0 on `_batch(0)`. If you changed the
# init, the model or the optimizer on purpose, rerun and paste the new value here.
GOLDEN_SECOND_STEP_LOSS = 5.4060


def _batch(seed, cfg, accum=1):
    B, T, V = cfg.data.batch_seqs, cfg.data.seq_len, cfg.model.vocab_size
    tokens = jax.random.randint(jax.random.key(seed), (B, T + 1), 0, V)
    local = {"inputs": np.asarray(tokens[:, :-1]), "targets": np.asarray(tokens[:, 1:])}
    return {k: v.reshape(accum, B // accum, T) for k, v in local.items()}


def _steps(cfg, batches, num_devices=1):
    cfg = dataclasses.replace(cfg, mesh=MeshConfig(num_devices=num_devices))
    mesh = sharding.make_mesh(cfg.mesh)
    state = train.init_state(cfg, jax.random.key(0), mesh)
    step = train.make_train_step(cfg, mesh)
    losses = []
    for b in batches:
        state, metrics = step(state, sharding.global_batch(b, sharding.batch_sharding(mesh)))
        losses.append(float(metrics["train_loss"]))
    return state, losses


def test_golden_loss(tiny_cfg):
    _, losses = _steps(tiny_cfg, [_batch(0, tiny_cfg)] * 2)
    assert losses[0] == pytest.approx(np.log(256), abs=1e-5)  # zero-init head
    assert losses[1] == pytest.approx(GOLDEN_SECOND_STEP_LOSS, abs=1e-3), (
        f"second-step loss {losses[1]:.4f} moved from the golden {GOLDEN_SECOND_STEP_LOSS}; "
        "update GOLDEN_SECOND_STEP_LOSS if the change was intended"
    )


def test_loss_falls_on_a_repeated_batch(tiny_cfg):
    _, losses = _steps(tiny_cfg, [_batch(0, tiny_cfg)] * 8)
    assert losses[-1] < losses[0] - 0.5


@pytest.fixture
def exact_cfg(tiny_cfg):
    """Newton-Schulz in float32, so equivalent computations agree to float32 rounding."""
    return apply_overrides(tiny_cfg, ["optim.muon_ns_dtype=float32", "model.init=gpt2"])


def _grads(cfg, batch, num_devices):
    mesh = sharding.make_mesh(MeshConfig(num_devices=num_devices))
    params = train.init_state(cfg, jax.random.key(0), mesh).params
    grads_fn = jax.jit(sharding.data_parallel(mesh, train._local_grads(cfg, mesh.axis_names)))
    return grads_fn(params, sharding.global_batch(batch, sharding.batch_sharding(mesh)))


def _hidden(params):
    """The Muon-owned matrices. Adam leaves are left out of param comparisons: Adam's first
    steps, lr·g/(|g|+eps), are nearly a sign function, so leaves with near-zero gradients
    (biases under QK-norm, rare embedding rows) flip on summation-order rounding."""
    return params["blocks"]["attn"] | params["blocks"]["mlp"]


@pytest.mark.parametrize("devices, micro", [(1, 2), (8, 1)], ids=["accumulate4", "devices8"])
def test_split_batches_match_one_pass(exact_cfg, devices, micro):
    split = apply_overrides(exact_cfg, [f"train.micro_batch_seqs={micro}"])
    accum = exact_cfg.data.batch_seqs // (micro * devices)
    g1, loss1, n1, _ = _grads(exact_cfg, _batch(0, exact_cfg), 1)
    g2, loss2, n2, _ = _grads(split, _batch(0, exact_cfg, accum=accum), devices)
    assert int(n1) == int(n2)
    np.testing.assert_allclose(loss1, loss2, rtol=1e-5)
    chex.assert_trees_all_close(g1, g2, rtol=1e-4, atol=1e-4)

    s1, l1 = _steps(exact_cfg, [_batch(0, exact_cfg), _batch(1, exact_cfg)])
    s2, l2 = _steps(split, [_batch(0, exact_cfg, accum), _batch(1, exact_cfg, accum)], num_devices=devices)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    chex.assert_trees_all_close(_hidden(s1.params), _hidden(s2.params), rtol=1e-4, atol=1e-5)


def test_batch_not_divisible_names_the_fields(tiny_cfg):
    cfg = apply_overrides(tiny_cfg, ["train.micro_batch_seqs=3"])
    with pytest.raises(ValueError, match="data.batch_seqs=8 is not a multiple of train.micro_batch_seqs=3"):
        train.grad_accum_steps(cfg, 1)


def _shards(tmp_path, vocab=256, n=40_000):
    rng = np.random.default_rng(0)
    tokens = (np.arange(n) % (vocab - 1) + 1).astype(np.uint16)  # learnable: counting, with 5% noise
    noise = rng.random(n) < 0.05
    tokens[noise] = rng.integers(1, vocab, noise.sum())
    data.write_shard(tmp_path / "train_000.bin", tokens)
    data.write_shard(tmp_path / "val_000.bin", tokens[:5000])
    return str(tmp_path / "train_*.bin"), str(tmp_path / "val_*.bin")


def test_run_end_to_end(tiny_cfg, tmp_path, capsys):
    train_files, val_files = _shards(tmp_path)
    cfg = apply_overrides(
        tiny_cfg,
        [
            f"data.train_files={train_files}",
            f"data.val_files={val_files}",
            f"train.out_dir={tmp_path / 'runs'}",
            "train.steps=6",
            "train.val_every=3",
            "train.sample_tokens=5",
            "train.micro_batch_seqs=1",
        ],
    )
    result = train.run(cfg)
    out = capsys.readouterr().out
    assert "step:0/6 val_loss:" in out and "step:6/6 val_loss:" in out and "sample:" in out
    assert "train_time:" in out and "step_avg:" in out
    assert result["val_loss"] < result["unigram_val_loss"]
    assert result["peak_device_gib"] is None  # the CPU backend keeps no count; a GPU reports its peak
    run_dir = result["run_dir"]
    records = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 3, 6]
    for name in ("log.txt", "config.json", "result.json", "loss.png"):
        assert Path(run_dir, name).stat().st_size > 0


def test_launch_reports_bad_override():
    with pytest.raises(SystemExit, match="no field 'muon_lrr'"):
        launch.main(["--config", "simple", "--set", "optim.muon_lrr=1"])


def test_launch_reports_missing_shards(tmp_path):
    with pytest.raises(SystemExit, match="no shard"):
        launch.main(
            [
                "--config",
                "simple",
                "--set",
                f"data.train_files={tmp_path}/nothing_*.bin",
                "--set",
                f"train.out_dir={tmp_path}",
                "--compile-cache",
                "",
            ]
        )


def test_print_config(capsys):
    assert launch.main(["--config", "gpt2_llmc", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["embed"]["learned_positions"] is True


def _staged_documents_cfg(tiny_cfg, tmp_path):
    """Documents mode with a batch-size stage at step 2 (two step variants), on a written shard."""
    rng = np.random.default_rng(1)
    docs = [np.concatenate([[data.BOS], rng.integers(1, 256, rng.integers(5, 120))]) for _ in range(600)]
    data.write_shard(tmp_path / "train_000.bin", np.concatenate(docs).astype(np.uint16))
    data.write_shard(tmp_path / "val_000.bin", np.concatenate(docs[:40]).astype(np.uint16))
    cfg = apply_overrides(
        tiny_cfg,
        [
            f"data.train_files={tmp_path}/train_*.bin",
            f"data.val_files={tmp_path}/val_*.bin",
            f"train.out_dir={tmp_path / 'runs'}",
            "model.vocab_size=50304",
            "data.mode=documents",
            "data.max_doc_len=48",
            "train.micro_batch_seqs=1",
            "train.steps=4",
            "train.val_every=0",
        ],
    )
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, stages=((2, 16, 64, 32),)))


def test_run_documents_mode_with_stages(tiny_cfg, tmp_path, capsys):
    """BOS-aligned rows with segment ids, and a batch-size stage: one compile per shape."""
    cfg = _staged_documents_cfg(tiny_cfg, tmp_path)
    result = train.run(cfg)
    out = capsys.readouterr().out
    assert "for 2 step variant(s)" in out and "step:4/4 val_loss:" in out
    assert np.isfinite(result["val_loss"])
    assert train.tokens_trained(cfg, 4) == 2 * 8 * 64 + 2 * 16 * 64


def test_variants_compile_side_by_side_as_one_at_a_time(tiny_cfg, tmp_path):
    """Threads compile the same programs as one thread does, one per (mode, batch shape)."""
    cfg = _staged_documents_cfg(tiny_cfg, tmp_path)
    mesh = sharding.make_mesh(cfg.mesh)
    state = train.init_state(cfg, jax.random.key(0), mesh)
    serial = train._compile_stages(state, cfg, mesh)  # the default: one thread
    threaded = train._compile_stages(state, apply_overrides(cfg, ["train.compile_threads=0"]), mesh)
    assert list(threaded) == list(serial) and len(serial) == 2
    for key, program in serial.items():
        assert _computations(threaded[key].as_text()) == _computations(program.as_text())


def _computations(hlo: str) -> str:
    """The module's computations, without the source locations (they name the caller's lines)."""
    return re.sub(r", metadata=\{[^}]*\}", "", hlo[hlo.index("\n%") :])


def test_documents_mode_refuses_cudnn(tiny_cfg):
    with pytest.raises(ValueError, match="needs a document mask"):
        apply_overrides(tiny_cfg, ["data.mode=documents", "model.kernels.attention=cudnn"])


def test_pallas_kernels_refused_off_gpu(tiny_cfg):
    cfg = apply_overrides(tiny_cfg, ["model.kernels.attention=pallas", "model.kernels.loss=pallas"])
    mesh = sharding.make_mesh(cfg.mesh)
    with pytest.raises(
        ConfigError, match="model.kernels.attention='pallas', model.kernels.loss='pallas' train on GPUs only"
    ):
        train.make_train_step(cfg, mesh)


@pytest.mark.parametrize("kernel", ["mlp", "attention"])
def test_mosaic_kernels_refused_off_hopper(tiny_cfg, kernel):
    """Off a GPU the Mosaic simulator cannot run in shard_map; on a GPU before Hopper, sm_90
    kernels cannot compile. Both stop before tracing, and `auto` trains on either."""
    shape = ["model.model_dim=256", "model.head_dim=128", "model.compute_dtype=bfloat16"]
    cfg = apply_overrides(tiny_cfg, [*shape, f"model.kernels.{kernel}=mosaic"])
    with pytest.raises(
        ConfigError, match=f"model.kernels.{kernel}='mosaic' train on GPUs only, but the mesh is on cpu"
    ):
        train.make_train_step(cfg, sharding.make_mesh(cfg.mesh))
    ampere = types.SimpleNamespace(platform="gpu", compute_capability="8.0", device_kind="NVIDIA A100")
    mesh = types.SimpleNamespace(devices=np.array([ampere]))
    with pytest.raises(
        ConfigError,
        match=f"kernels.{kernel}='mosaic' runs Hopper .sm_90. kernels, but the mesh's GPUs are NVIDIA A100",
    ):
        train._check_kernels_can_train(cfg, mesh)
    train._check_kernels_can_train(apply_overrides(cfg, [f"model.kernels.{kernel}=auto"]), mesh)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["pallas", "mosaic"])
def test_pallas_kernels_in_the_sharded_step(tiny_cfg, impl):
    """All three kernels inside the shard_map step follow the XLA path (bf16, 128-wide heads), with
    attention and the MLP's GEMMs in Triton (attention's forward in Mosaic) or all in Mosaic GPU."""
    shape = ["model.model_dim=256", "model.head_dim=128", "model.max_seq_len=128", "data.seq_len=128"]
    cfg = apply_overrides(tiny_cfg, [*shape, "model.compute_dtype=bfloat16", "optim.muon_ns_dtype=float32"])
    kernels = [f"model.kernels.attention={impl}", f"model.kernels.mlp={impl}", "model.kernels.loss=pallas"]
    batches = [_batch(s, cfg) for s in range(3)]
    _, losses_xla = _steps(cfg, batches)
    _, losses_pallas = _steps(apply_overrides(cfg, kernels), batches)
    np.testing.assert_allclose(losses_pallas, losses_xla, rtol=2e-2)
