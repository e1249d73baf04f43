"""The profile command: HLO-based kernel categories, trace parsing, and a whole run on the CPU."""

import gzip
import json

import jax
import jax.numpy as jnp
import pytest

from benchmarks import profile_step


def _hlo():
    def f(a, b):
        y = jnp.tanh(a @ b)
        return y.sum(axis=0), (y * 2.0).T

    a = jax.random.normal(jax.random.key(0), (64, 32))
    b = jax.random.normal(jax.random.key(1), (32, 48))
    return jax.jit(f).lower(a, b).compile().as_text()


def test_hlo_categories_name_matmul_and_reductions():
    cats = profile_step.hlo_categories(_hlo())
    assert "matmul" in cats.values()
    assert "reductions" in cats.values()
    assert set(cats.values()) <= set(profile_step.CATEGORIES)


@pytest.mark.parametrize(
    "name, category",
    [
        ("nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNT", "matmul"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
        ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "collectives"),
        ("MemcpyDtoD", "copies"),
        ("input_reduce_fusion_7", "reductions"),
        ("loop_multiply_fusion_3", "elementwise"),
        ("relu2_dpre_mgpu_mosaic_gpu_kernel", "pallas"),
        ("attention_mgpu_fwd_mosaic_gpu_kernel", "attention"),
        ("some_unknown_kernel", "other"),
    ],
)
def test_library_kernels_by_name(name, category):
    assert profile_step.classify(name, {}, {}) == category


@pytest.mark.parametrize(
    "rest, category",
    [
        ('f32[8]{0} %p), custom_call_target="__gpu$xla.gpu.triton", name="rms_norm_bwd"', "pallas"),
        ('f32[8]{0} %p), custom_call_target="mosaic_gpu_v2", name="flash_attention_fwd"', "attention"),
        ('f32[8]{0} %p), custom_call_target="__cublas$lt$matmul"', "matmul"),
        ('f32[8]{0} %p), custom_call_target="SomethingElse"', "other"),
    ],
)
def test_custom_calls_by_target(rest, category):
    """Pallas kernels are a category of their own, unless they are attention kernels."""
    assert profile_step._classify_instr("custom-call", rest, {}) == category


def test_triton_kernels_are_found_by_their_kernel_name():
    """A Pallas Triton kernel's trace events carry the kernel's name, not its HLO instruction's:
    the name in the custom call's backend config maps to the instruction's category."""
    hlo = (
        "ENTRY %main (p: f32[8]) -> f32[8] {\n"
        '  %pallas_call.7 = f32[8]{0} custom-call(%p), custom_call_target="__gpu$xla.gpu.triton", '
        'backend_config={debug = false, grid_x = 4 : i32, name = "qkv_grad", num_warps = 4 : i32}\n'
        "}\n"
    )
    by_instr = {profile_step._norm(k): v for k, v in profile_step.hlo_categories(hlo).items()}
    assert profile_step.classify("qkv_grad", {}, by_instr) == "pallas"


def test_breakdown_of_a_gpu_trace_sums_stream_kernels_per_step():
    """Events on the device's stream lines count, by their HLO op; host lines and other device lines do not."""
    hlo_cats = {profile_step._norm("fusion.1"): "reductions"}
    meta = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #7(Compute)"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8, "args": {"name": "XLA Ops"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 1, "args": {"name": "python"}},
    ]
    kernels = [
        {"ph": "X", "pid": 1, "tid": 7, "name": "nvjet_gemm", "dur": 3000.0},
        {
            "ph": "X",
            "pid": 1,
            "tid": 7,
            "name": "input_fusion",
            "dur": 1000.0,
            "args": {"hlo_op": "fusion.1"},
        },
        {"ph": "X", "pid": 1, "tid": 8, "name": "fusion.1", "dur": 1000.0},  # the derived op line
        {"ph": "X", "pid": 2, "tid": 1, "name": "PjitFunction(step)", "dur": 9000.0},
    ]
    events, source = profile_step.kernel_events({"traceEvents": meta + kernels})
    assert source == "gpu streams" and len(events) == 2
    assert profile_step.classify("input_fusion", {"hlo_op": "fusion.1"}, hlo_cats) == "reductions"


def test_profile_command_on_cpu(tmp_path):
    """`launch.py profile` on a one-layer model: a JSON whose categories hold the traced time, and a PNG."""
    import launch

    tiny = [
        "model.num_layers=1", "model.head_dim=16", "model.model_dim=64", "model.vocab_size=256",
        "model.max_seq_len=64", "data.seq_len=64", "data.batch_seqs=8", "train.micro_batch_seqs=8",
        "mesh.num_devices=1",
    ]  # fmt: skip
    argv = ["profile", "--config", "simple", "--steps", "2", "--out", str(tmp_path)]
    assert launch.main(argv + [a for t in tiny for a in ("--set", t)]) == 0
    result = json.loads((tmp_path / "profile_step.json").read_text())
    assert result["source"] == "cpu client threads"
    assert result["ms_per_step"]["matmul"] > 0
    assert result["total_ms_per_step"] == pytest.approx(sum(result["ms_per_step"].values()))
    assert (tmp_path / "profile_step.png").stat().st_size > 0
    with gzip.open(tmp_path / "step_hlo.txt.gz", "rt") as f:
        hlo = f.read()
    matmuls = [op["op"] for op in result["top_ops"] if op["category"] == "matmul"]
    assert "ENTRY" in hlo and matmuls and all(op in hlo for op in matmuls)  # the table's ops, to look up


def test_against_an_earlier_profile(tmp_path, capsys):
    """`--against OLD.json`: each category before and now with the change, two bars per category;
    a missing file stops with a message before anything compiles."""
    cats = dict.fromkeys(profile_step.CATEGORIES, 0.0)
    before = {
        "device": "H100",
        "ms_per_step": cats | {"matmul": 538.9, "reductions": 92.9},
        "total_ms_per_step": 631.8,
    }
    now = {"ms_per_step": cats | {"matmul": 484.8, "pallas": 118.7}, "total_ms_per_step": 603.5}
    rows = profile_step.table(now, before)
    assert rows[0].startswith("category | before (H100) | now | change")
    assert "matmul | 538.90 | 484.80 | -54.10 | 80.3%" in rows
    assert "pallas | 0.00 | 118.70 | +118.70 | 19.7%" in rows
    assert rows[-1] == "total | 631.80 | 603.50 | -28.30 |"
    profile_step.plot(now, tmp_path / "both.png", "before and now", before)
    assert (tmp_path / "both.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        profile_step.main(["--against", str(tmp_path / "missing.json")], load_config=lambda name: None)
    assert "missing.json: no such file" in capsys.readouterr().err
