"""No Triton kernel addresses a buffer of 2³¹ entries or more through 32-bit offsets.

jax 0.11.2's Triton lowering (`_compute_offsets_from_indices`) picks 64-bit offsets only for buffers
over 2³² *bytes*, and counts the offsets in *entries*, as signed 32-bit integers. A one-byte buffer
of 2³¹ to 2³² entries is therefore indexed through offsets that wrap negative past entry 2³¹: at
record #77's stage 2 (49,152 × 50,304 tokens × vocabulary) the e5m2 logit gradient's last 6,461 rows
were written outside their buffer, and training went NaN (docs/PERF.md, docs/UPSTREAM.md). The
loss pass now writes the gradient as uint16 pairs, half as many entries.

These tests lower kernels for CUDA (sm_90) on the CPU, read the Triton IR that jax builds, and
follow each pointer argument to its `tt.addptr`s: one with 32-bit offsets into a buffer of 2³¹
entries or more is a write or read past the wrap.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from jax._src.pallas.triton import gpu_info, lowering, pallas_call_registration
from jax.experimental import pallas as pl

from jaxrun.config import FP8HeadConfig
from pallas_kernels import mtp_ce

# Lowering (rather than interpreting) a Triton kernel warns that jax deprecates the backend.
pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
N, V = 49152, 50304  # record #77's stage-2 micro-batch on one GPU, and its vocabulary
_ARG = re.compile(r"%arg(\d+): !tt\.ptr<")
_DEF = re.compile(r"^\s*(%[\w.#]+) = [\w.]+ (.*)$")
_ADDPTR = re.compile(r"^\s*%[\w.#]+ = tt\.addptr (%[\w.#]+), %[\w.#]+ : .*, (?:tensor<.*x)?i(\d+)>?\s*$")


def _lower_for_hopper(monkeypatch, fn, *avals) -> list[tuple[list, str]]:
    """Lower `fn` for CUDA on sm_90 and return each Triton kernel's (buffer avals in argument order,
    its Triton IR)."""
    hopper = gpu_info.GpuInfo(gpu_version=None, arch_name="9.0", compute_capability=90)
    monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info", lambda: hopper)
    kernels = []
    lower = lowering.lower_jaxpr_to_triton_module

    def capture(jaxpr, grid_mapping, *args, **kwargs):
        result = lower(jaxpr, grid_mapping, *args, **kwargs)
        avals = [bm.array_aval for bm in grid_mapping.block_mappings]
        kernels.append((avals, result.module.operation.get_asm(enable_debug_info=False)))
        return result

    monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", capture)
    jax.jit(fn).trace(*avals).lower(lowering_platforms=("cuda",))
    assert kernels, "no Triton kernel was lowered"
    return kernels


def offset_widths(ir: str) -> dict[int, set[int]]:
    """{pointer argument: the bit widths of the offsets its `tt.addptr`s add} in a Triton kernel's IR."""
    lines = ir.splitlines()
    signature = next(line for line in lines if "tt.func" in line)
    root = {f"%arg{k}": int(k) for k in _ARG.findall(signature)}
    widths: dict[int, set[int]] = {}
    for line in lines:
        if (m := _ADDPTR.match(line)) and m.group(1) in root:
            widths.setdefault(root[m.group(1)], set()).add(int(m.group(2)))
        if (m := _DEF.match(line)) and "!tt.ptr" in m.group(2):
            sources = [root[t] for t in re.findall(r"%[\w.#]+", m.group(2)) if t in root]
            if sources:
                root[m.group(1)] = sources[0]
    return widths


def wrapping(avals: list, widths: dict[int, set[int]]) -> dict[int, set[int]]:
    """The arguments of 2³¹ entries or more that some `tt.addptr` offsets by fewer than 64 bits."""
    return {
        k: {w for w in ws if w < 64} for k, ws in widths.items() if avals[k].size >= 2**31 and min(ws) < 64
    }


def _copy_kernel(out_dtype):
    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...].astype(o_ref.dtype)

    def fn(x):
        return pl.pallas_call(
            kernel,
            grid=(N // 64, V // 128),
            in_specs=[pl.BlockSpec((64, 128), lambda i, j: (i, j))],
            out_specs=pl.BlockSpec((64, 128), lambda i, j: (i, j)),
            out_shape=jax.ShapeDtypeStruct((N, V), out_dtype),
        )(x)

    return fn


@pytest.mark.parametrize("out_dtype", [jnp.int8, jnp.float8_e5m2])
def test_one_byte_buffers_past_2_31_entries_get_32_bit_offsets(monkeypatch, out_dtype):
    """The lowering this guards against, still in jax 0.11.2: a copy of bf16 [49,152, 50,304] into a
    one-byte buffer reads the bf16 (over 2³² bytes) with 64-bit offsets and writes the one-byte copy
    (2.47·10⁹ entries, 2.47 GB) with 32-bit ones. When jax fixes it, this test fails: the uint16
    packing in `mtp_ce` can then go."""
    [(avals, ir)] = _lower_for_hopper(
        monkeypatch, _copy_kernel(out_dtype), jax.ShapeDtypeStruct((N, V), jnp.bfloat16)
    )
    widths = offset_widths(ir)
    assert widths == {0: {64}, 1: {32}}
    assert wrapping(avals, widths) == {1: {32}}


def test_two_byte_buffers_past_2_31_entries_get_64_bit_offsets(monkeypatch):
    [(_, ir)] = _lower_for_hopper(
        monkeypatch, _copy_kernel(jnp.uint16), jax.ShapeDtypeStruct((N, V), jnp.bfloat16)
    )
    assert offset_widths(ir) == {0: {64}, 1: {64}}


@pytest.mark.parametrize("logits_dtype", [jnp.bfloat16, jnp.float32])
def test_the_loss_pass_at_record77_stage_2_has_no_wrapping_offsets(monkeypatch, logits_dtype):
    """record #77's multi-token loss pass over its stage-2 logits: float32 from XLA's FP8 GEMM, bf16
    from the Mosaic one (`model.kernels.fp8_logits`)."""
    kw = {"cap_value": 23.0, "grad_scale": FP8HeadConfig().grad_scale}

    def loss_pass(logits, targets, weights):
        return mtp_ce.mtp_ce(logits, targets, weights, **kw)

    kernels = _lower_for_hopper(
        monkeypatch,
        loss_pass,
        jax.ShapeDtypeStruct((N, V), logits_dtype),
        jax.ShapeDtypeStruct((N, 3), jnp.int32),
        jax.ShapeDtypeStruct((3,), jnp.float32),
    )
    [(avals, ir)] = kernels
    widths = offset_widths(ir)
    assert set(widths) == set(range(len(avals)))  # every buffer's addressing was found
    assert widths[0] == {64}  # the logits, 2.47·10⁹ entries
    assert avals[-1].dtype == jnp.uint16 and avals[-1].size < 2**31  # the packed gradient
    assert wrapping(avals, widths) == {}
