"""Run logs: metrics that survive a kill and a resume, TensorBoard and wandb, plain progress lines."""

import dataclasses
import json
import struct
import sys
import types

import jax
import jax.numpy as jnp
import pytest

import launch
from jaxrun.config import (
    AttentionConfig,
    Config,
    DataConfig,
    KernelConfig,
    MLPConfig,
    ModelConfig,
    RopeConfig,
    TrainConfig,
)
from jaxrun.model import kernels
from jaxrun.runlog import RunLog


def _cfg(tmp_path, **train) -> Config:
    return Config(
        name="t",
        data=DataConfig(seq_len=64, batch_seqs=8),
        train=TrainConfig(steps=40, out_dir=str(tmp_path), progress=False, **train),
    )


def _lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _log_steps(log: RunLog, steps: range, val_every: int = 3) -> None:
    for step in steps:
        if step % val_every == 0:
            log.val(step, 5.0 - step / 10, 10.0 * step, 10.0)
        log.train_metrics(step + 1, {"train_loss": 6.0 - step / 10, "lr_factor": 1.0})


def test_metrics_reach_the_file_as_they_are_logged(tmp_path):
    """A process killed with -9 never closes its files: each record must be in the file already."""
    log = RunLog(_cfg(tmp_path))
    _log_steps(log, range(4))
    assert [r["step"] for r in _lines(log.run_dir)] == [0, 1, 2, 3, 3, 4]


def test_a_resume_drops_the_records_past_its_step(tmp_path):
    log = RunLog(_cfg(tmp_path))
    _log_steps(log, range(8))  # train 1..8, val at 0, 3, 6
    log.close()
    (log.run_dir / "metrics.jsonl").open("a").write('{"step": 9, "train_lo')  # torn by a kill
    resumed = RunLog(_cfg(tmp_path), run_dir=log.run_dir)
    resumed.rewind(6)  # the checkpoint of step 6: val at 6 runs again, train 7.. follow
    _log_steps(resumed, range(6, 9))
    resumed.close()
    records = _lines(log.run_dir)
    train = [r["step"] for r in records if "train_loss" in r]
    val = [r["step"] for r in records if "val_loss" in r]
    assert train == list(range(1, 10)) and val == [0, 3, 6]  # each once: the loss plot cannot zig-zag
    assert [r["step"] for r in resumed.history] == [r["step"] for r in records]


def _events(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Scalars from the TensorBoard event files, read through their TFRecord framing."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in sorted((run_dir / "tensorboard").iterdir()):
        raw, at = path.read_bytes(), 0
        while at < len(raw):
            (length,) = struct.unpack("<Q", raw[at : at + 8])
            event = event_pb2.Event.FromString(raw[at + 12 : at + 12 + length])
            at += 16 + length
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_gets_losses_lr_and_throughput(tmp_path):
    log = RunLog(_cfg(tmp_path))
    _log_steps(log, range(7))
    log.close()
    scalars = _events(log.run_dir)
    assert [s for s, _ in scalars["loss/train"]] == list(range(1, 8))
    assert [(s, round(v, 4)) for s, v in scalars["loss/val"]] == [(0, 5.0), (3, 4.7), (6, 4.4)]
    assert scalars["train/lr_factor"][0] == (1, 1.0)
    tokens_per_s = 3 * 512 / 0.03  # 3 steps of 8 x 64 tokens in 30 ms
    assert [s for s, _ in scalars["perf/tokens_per_s"]] == [3, 6]
    assert abs(scalars["perf/tokens_per_s"][0][1] - tokens_per_s) < 1


def test_wandb_logs_offline_when_on(tmp_path, monkeypatch):
    calls = []
    run = types.SimpleNamespace(log=lambda values, step: calls.append((step, values)), finish=lambda: None)
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(kwargs) or run
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = RunLog(_cfg(tmp_path, wandb=True))
    _log_steps(log, range(2))
    log.close()
    init = calls[0]
    assert init["mode"] == "offline" and init["dir"] == str(log.run_dir) and init["config"]["name"] == "t"
    assert calls[1:] == [
        (0, {"loss/val": 5.0, "perf/train_time_ms": 0.0}),
        (1, {"loss/train": 6.0, "train/lr_factor": 1.0}),
        (2, {"loss/train": 5.9, "train/lr_factor": 1.0}),
    ]

    monkeypatch.setitem(sys.modules, "wandb", None)  # on, but not installed: one line, no error
    log = RunLog(_cfg(tmp_path / "b", wandb=True))
    _log_steps(log, range(1))
    log.close()
    assert "wandb is not installed" in (log.run_dir / "log.txt").read_text()


def test_plain_progress_lines_carry_throughput_and_eta(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    log = RunLog(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progress=True)))
    progress = log.progress(40)  # not a terminal under pytest: a line every 2 steps
    for step in range(1, 41):
        progress.update(step)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step:")]
    assert len(lines) == 20 and lines[-1].startswith("step:40/40 train_loss:nan tok/s:")
    assert " eta:" in lines[0] and lines[-1].endswith(" eta:0s")


def test_the_last_line_reports_every_time(tmp_path, capsys):
    log = RunLog(_cfg(tmp_path))
    result = {
        "val_loss": 4.0,
        "unigram_val_loss": 7.0,
        "step_avg_ms": 10.0,
        "tokens_per_s": 1000.0,
        "train_time_ms": 400.0,
        "compile_s": 2.0,
        "eval_s": 0.5,
        "sample_s": 0.3,
        "wall_s": 9.0,
    }
    log.finish(result)
    last = capsys.readouterr().out.splitlines()[-2]
    assert last == "time: train 0.4s · compile 2.0s · eval 0.5s · sample 0.3s · total 9.0s wall"


def test_the_header_names_each_kernel_as_resolved_here(tmp_path, monkeypatch):
    """`auto` choices are logged as what runs on this backend: XLA attention on the CPU."""
    cfg = _cfg(tmp_path)
    log = RunLog(cfg)
    log.header(jax.make_mesh((1,), ("dp",)))
    assert (
        "kernels: attention xla · mlp xla · loss xla · norm xla · logit_lse xla · logit_grad xla · qkv xla"
        in (log.run_dir / "log.txt").read_text()
    )
    monkeypatch.setattr(kernels.jax, "default_backend", lambda: "gpu")
    assert kernels.resolved(cfg.model, documents=False)["attention"] == "cudnn"
    assert kernels.resolved(cfg.model, documents=True)["attention"] == "pallas"


@pytest.mark.parametrize("loss, want", [("xla_fused", "pallas"), ("xla", "xla")])
def test_auto_norm_and_logit_pass_resolve_per_backend_and_fit(loss, want, monkeypatch):
    """`auto` is the Pallas pass on a GPU wherever it applies and XLA on the CPU: the logit pass
    needs the fused XLA loss, the norm kernel RMSNorm over a width that is a multiple of 16."""
    m = ModelConfig(kernels=KernelConfig(loss=loss, norm="auto", logit_lse="auto", logit_grad="auto"))
    impls = (kernels.norm_impl, kernels.logit_lse_impl, kernels.logit_grad_impl)
    assert [impl(m) for impl in impls] == ["xla"] * 3
    monkeypatch.setattr(kernels.jax, "default_backend", lambda: "gpu")
    assert [impl(m) for impl in impls] == ["pallas", want, want]
    layer_norm = dataclasses.replace(m, norm="layernorm")
    assert kernels.norm_impl(layer_norm) == "xla"


def test_auto_qkv_pass_resolves_per_backend_and_fit(monkeypatch):
    """`auto` runs the projections' one-pass backward on a GPU where the model has QK-norm and
    'halves' RoPE over power-of-two heads; XLA on the CPU and for record #77's interleaved RoPE."""
    m = ModelConfig(kernels=KernelConfig(qkv="auto"))
    assert kernels.qkv_impl(m) == "xla"
    monkeypatch.setattr(kernels.jax, "default_backend", lambda: "gpu")
    assert kernels.qkv_impl(m) == "pallas"
    interleaved = dataclasses.replace(m, attn=AttentionConfig(rope=RopeConfig(pairing="interleaved")))
    no_qk_norm = dataclasses.replace(m, attn=AttentionConfig(qk_norm=False))
    assert kernels.qkv_impl(interleaved) == kernels.qkv_impl(no_qk_norm) == "xla"


def _fake_gpu(monkeypatch, capability):
    gpu = types.SimpleNamespace(platform="gpu", compute_capability=capability)
    monkeypatch.setattr(kernels.jax, "devices", lambda: [gpu])
    monkeypatch.setattr(kernels.jax, "default_backend", lambda: "gpu")


@pytest.mark.parametrize("field", ["attention", "mlp"])
def test_mosaic_choices_stop_on_a_gpu_before_hopper(field, monkeypatch):
    """Asked for by name, a Mosaic kernel on an A100 stops with the choice to make (in a notebook as
    in training), rather than running another kernel or failing in the compiler."""
    cfg = ModelConfig(head_dim=128, compute_dtype="bfloat16", kernels=KernelConfig(**{field: "mosaic"}))
    _fake_gpu(monkeypatch, "8.0")
    x = jnp.zeros((1, 128, 1, 128), jnp.bfloat16)
    call = {
        "attention": lambda: kernels.attention(cfg)(x, x, x, scale=0.12),
        "mlp": lambda: kernels.relu2_mlp(cfg)(x[0, :, 0], jnp.zeros((128, 512)), jnp.zeros((512, 128))),
    }[field]
    with pytest.raises(
        ValueError, match=f"kernels.{field}='mosaic' runs Hopper .sm_90. kernels, not this GPU"
    ):
        call()


@pytest.mark.parametrize("capability, want", [("9.0", "mosaic"), ("8.0", "xla"), ("10.0", "xla")])
def test_auto_mlp_takes_the_mosaic_gemms_on_hopper_only(capability, want, monkeypatch):
    """`auto` runs the Mosaic wgmma GEMMs on a Hopper GPU for a bf16 ReLU² MLP without FP8 whose
    widths they tile; XLA on the CPU, on other GPUs, and for the other MLPs."""
    m = ModelConfig(kernels=KernelConfig(mlp="auto"))
    assert kernels.mlp_impl(m) == "xla"
    _fake_gpu(monkeypatch, capability)
    assert kernels.mlp_impl(m) == want
    gelu = dataclasses.replace(m, mlp=MLPConfig(activation="gelu"))
    fp8 = dataclasses.replace(m, mlp=MLPConfig(fp8_up=True))
    f32 = dataclasses.replace(m, compute_dtype="float32")
    narrow = dataclasses.replace(m, model_dim=96, head_dim=32)
    assert {kernels.mlp_impl(c) for c in (gelu, fp8, f32, narrow)} == {"xla"}


def test_simple_runs_its_pallas_passes_on_a_gpu_only(monkeypatch):
    """`simple`'s GPU default is the fast path; on the CPU the same config runs XLA."""
    simple = launch.load_config("simple").model
    on_cpu = kernels.resolved(simple, documents=False)
    assert set(on_cpu.values()) == {"xla", "xla_fused"} and on_cpu["loss"] == "xla_fused"
    _fake_gpu(monkeypatch, "9.0")
    assert kernels.resolved(simple, documents=False) == {
        "attention": "cudnn",
        "mlp": "mosaic",
        "loss": "xla_fused",
        "norm": "pallas",
        "logit_lse": "pallas",
        "logit_grad": "pallas",
        "qkv": "pallas",
        "fp8_logits": "xla",
    }


@pytest.mark.parametrize(
    "capability, attention, mlp", [("9.0", "mosaic", "mosaic"), ("8.0", "pallas", "xla")]
)
def test_record77_runs_its_mosaic_kernels_on_hopper_only(capability, attention, mlp, monkeypatch):
    """record77's documents rule out cuDNN: on Hopper `auto` runs every attention pass and the MLP's
    GEMMs in Mosaic GPU, on an older GPU the Triton attention and the XLA MLP, and on any GPU the
    Pallas loss pass; the CPU runs XLA."""
    record77 = launch.load_config("record77").model
    on_cpu = kernels.resolved(record77, documents=True)
    assert on_cpu["attention"] == on_cpu["mlp"] == on_cpu["norm"] == "xla"
    assert on_cpu["loss"] == "xla_fused"
    _fake_gpu(monkeypatch, capability)
    assert kernels.resolved(record77, documents=True) == {
        "attention": attention,
        "mlp": mlp,
        "loss": "pallas",
        "norm": "pallas",
        "logit_lse": "xla",  # record77's FP8 head: the logit passes do not apply
        "logit_grad": "xla",
        "qkv": "xla",  # interleaved RoPE
        "fp8_logits": "xla",
    }
