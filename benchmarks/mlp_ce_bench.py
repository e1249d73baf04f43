"""Times the fused ReLU² MLP and softcapped CE kernels against plain jit'd JAX.

Usage (GPU): python3 benchmarks/mlp_ce_bench.py [--sweep] [--only mlp,ce,parts,peak] [--out DIR]

Every variant is timed fwd+bwd (one `jax.vjp` and its pullback in one jit) as
the median over batches of back-to-back calls; memory is XLA's compile-time
temp allocation and (`peak`) the device's peak bytes above the inputs, in a
fresh process per variant (run it with XLA_PYTHON_CLIENT_PREALLOCATE=false).
`parts` times forward pieces alone; `--sweep` adds alternative tilings.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.hlo_buffers import materialized
from jaxrun.model import head_loss
from pallas_kernels import relu2_mlp as mlp_lib
from pallas_kernels import softcap_ce as ce_lib

D, F, V = 768, 3072, 50304
MLP_SWEEP = [
    mlp_lib.BlockSizes(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3),
    mlp_lib.BlockSizes(block_m=128, block_n=128, block_k=64, num_warps=4, num_stages=3),
    mlp_lib.BlockSizes(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
    mlp_lib.BlockSizes(block_m=256, block_n=128, block_k=64, num_warps=8, num_stages=4),
]
CE_SWEEP = [
    ce_lib.BlockSizes(block_m=128, block_v=256, block_k=64, num_warps=8, num_stages=3),
    ce_lib.BlockSizes(block_m=256, block_v=128, block_k=64, num_warps=8, num_stages=3),
    ce_lib.BlockSizes(block_m=128, block_v=128, block_k=64, num_warps=4, num_stages=3),
    ce_lib.BlockSizes(block_m=128, block_v=256, block_k=64, num_warps=8, num_stages=4),
]
# (tiling, save_logits): the default, a chunked backward (less memory), saved bf16 logits (one GEMM fewer).
CE_CONFIGS = [
    (ce_lib.BlockSizes(), False),
    (ce_lib.BlockSizes(bwd_chunk=16384), False),
    (ce_lib.BlockSizes(), True),
    (ce_lib.BlockSizes(bwd_chunk=16384), True),
]


def mlp_xla(x, w1, w2, b1=None, b2=None):
    """What a model would write: bf16 GEMMs (fp32 accumulation), XLA fuses the rest."""
    h = x @ w1 if b1 is None else x @ w1 + b1[None, :]
    y = jnp.square(jax.nn.relu(h)) @ w2
    return y if b2 is None else y + b2[None, :]


def ce_xla(x, w, t, *, logits_dtype, cap="isru", cap_value=15.0):
    """Per-token softcapped CE, logits from one GEMM in `logits_dtype`, math in fp32."""
    s = jnp.dot(x, w, preferred_element_type=logits_dtype).astype(jnp.float32)
    if cap == "isru":
        z = cap_value * s * jax.lax.rsqrt(s * s + cap_value**2)
    else:
        z = cap_value * jax.nn.sigmoid((s + 5.0) / 7.5)
    zt = jnp.take_along_axis(z, jnp.maximum(t, 0)[:, None], axis=1)[:, 0]
    return jnp.where(t >= 0, jax.nn.logsumexp(z, axis=1) - zt, 0.0)


def fwd_bwd(f, n_diff):
    """jit of f's value and its pullback of a given cotangent for the first n_diff args."""

    def run(*args):
        diff, rest, ct = args[:n_diff], args[n_diff:-1], args[-1]
        y, vjp = jax.vjp(lambda *d: f(*d, *rest), *diff)
        return y, vjp(ct)

    return jax.jit(run)


def time_it(fn, args, batches=15, per_batch=5):
    """Median ms per call over batches of back-to-back calls (one sync per batch)."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(per_batch):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / per_batch * 1e3)
    return float(np.median(times)), float(np.min(times)), float(np.max(times))


def mlp_inputs(n, bias, seed=0):
    k = jax.random.split(jax.random.key(seed), 6)
    bf = jnp.bfloat16
    x = jax.random.normal(k[0], (n, D), bf)
    w1 = (jax.random.normal(k[1], (D, F)) / np.sqrt(D)).astype(bf)
    w2 = (jax.random.normal(k[2], (F, D)) / np.sqrt(F)).astype(bf)
    dy = jax.random.normal(k[5], (n, D), bf)
    if not bias:
        return (x, w1, w2, dy), 3
    b1 = (0.1 * jax.random.normal(k[3], (F,))).astype(bf)
    b2 = (0.1 * jax.random.normal(k[4], (D,))).astype(bf)
    return (x, w1, w2, b1, b2, dy), 5


def ce_inputs(n, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(k[0], (n, D), jnp.bfloat16)
    w = (3.0 / np.sqrt(D) * jax.random.normal(k[1], (D, V))).astype(jnp.bfloat16)
    t = jax.random.randint(k[2], (n,), 0, V)
    g = jnp.full((n,), 1.0 / n, jnp.float32)
    return (x, w, t, g), 2


def mlp_variants(bias, tilings):
    out = {"xla": mlp_xla}
    for i, bs in enumerate(tilings):
        out[f"pallas_{i}"] = lambda *a, bs=bs: mlp_lib.relu2_mlp(*a, block_sizes=bs)
    out["mosaic"] = lambda *a: mlp_lib.relu2_mlp(*a, gemms="mosaic")  # Hopper wgmma epilogue GEMMs
    return out


def ce_variants(cap, cap_value, tilings, xla=("bf16", "f32")):
    kw = {"cap": cap, "cap_value": cap_value}
    dt = {"bf16": jnp.bfloat16, "f32": jnp.float32}
    out = {f"xla_{k}_logits": lambda x, w, t, k=k: ce_xla(x, w, t, logits_dtype=dt[k], **kw) for k in xla}
    if cap in head_loss.CAPS:  # jaxrun's model.kernels.loss="xla_fused": one custom VJP, bf16 logits saved
        out["xla_fused"] = lambda x, w, t: head_loss.softcap_ce(x, w, t, **kw)
    for i, (bs, save) in enumerate(tilings):
        out[f"pallas_{i}"] = lambda x, w, t, bs=bs, save=save: ce_lib.softcap_ce(
            x, w, t, **kw, block_sizes=bs, save_logits=save
        )
    return out


def best(rows, tilings):
    """The fastest tiling among the pallas rows."""
    by_name = {str(bs): bs for bs in tilings}
    return by_name[min((r for r in rows if r["tiling"] in by_name), key=lambda r: r["ms"])["tiling"]]


def rel_err(a, b):
    a, b = (jnp.asarray(v, jnp.float32) for v in (a, b))
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def run_case(name, variants, args, n_diff, flops, log, tilings=None):
    """Times each variant; checks each against the first one's outputs."""
    rows, ref = [], None
    tilings = {f"pallas_{i}": bs for i, bs in enumerate(tilings or [])}
    for vname, f in variants.items():
        try:
            t0 = time.perf_counter()
            fn = fwd_bwd(f, n_diff).lower(*args).compile()
            compile_s = time.perf_counter() - t0
            tmp = fn.memory_analysis().temp_size_in_bytes
            nv = dict(materialized(fn.as_text(), (args[0].shape[0], V))) if name.startswith("ce") else {}
            out = jax.block_until_ready(fn(*args))
            med, lo, hi = time_it(fn, args)
        except Exception as e:  # noqa: BLE001 (keep the rest of the table when one tiling fails to build)
            log({"case": name, "variant": vname, "error": repr(e)[:400]})
            continue
        leaves = jax.tree.leaves(out)
        ref = ref or leaves
        errs = [rel_err(a, b) for a, b in zip(leaves, ref)]
        row = {
            "case": name,
            "variant": vname,
            "tiling": str(tilings.get(vname, "")),
            "ms": med,
            "ms_min": lo,
            "ms_max": hi,
            "tflops": flops / med / 1e9,
            "temp_gib": tmp / 2**30,
            "max_rel_err_vs_first": max(errs),
            "nv_buffers": nv,  # [N, V] arrays written to memory, by dtype (benchmarks/hlo_buffers.py)
            "compile_s": compile_s,
        }
        log(row)
        rows.append(row)
    return rows


def run_parts(log):
    """Forward-only pieces, to split the fwd+bwd gap into kernels versus cuBLAS GEMMs."""
    bf = jnp.bfloat16
    (x, w1, w2, _), _ = mlp_inputs(49152, bias=False)
    (xc, w, t, _), _ = ce_inputs(49152)
    bs = mlp_lib._fit(mlp_lib.BlockSizes.get_default(), 49152, D, F, 2)
    cst = ce_lib._Static("isru", 15.0, V, ce_lib._fit(ce_lib.BlockSizes.get_default(), 49152, D, V, 2), False, False)
    parts = {
        "mlp gemm x@w1 (cuBLAS, bf16 out)": (lambda x, w1: x @ w1, (x, w1), 2 * 49152 * D * F),
        "mlp xla fwd": (mlp_xla, (x, w1, w2), 4 * 49152 * D * F),
        "mlp pallas up kernel": (
            lambda x, w1: mlp_lib._up_projection(x, w1, None, bs, False),
            (x, w1),
            2 * 49152 * D * F,
        ),
        "mlp pallas fwd": (mlp_lib.relu2_mlp, (x, w1, w2), 4 * 49152 * D * F),
        "ce gemm x@w (cuBLAS, bf16 out)": (lambda x, w: x @ w, (xc, w), 2 * 49152 * D * V),
        "ce xla fwd (bf16 logits)": (
            lambda x, w, t: ce_xla(x, w, t, logits_dtype=bf),
            (xc, w, t),
            2 * 49152 * D * V,
        ),
        "ce pallas fwd kernel (default tiles)": (
            lambda x, w: ce_lib._lse(x, w, None, cst),
            (xc, w),
            2 * 49152 * D * V,
        ),
    }
    for name, (f, args, flops) in parts.items():
        try:
            ms = time_it(jax.jit(f), args)[0]
            log({"part": name, "ms": ms, "tflops": flops / ms / 1e9})
        except Exception as e:  # noqa: BLE001
            log({"part": name, "error": repr(e)[:400]})


def peak_child(spec):
    """One variant in this (fresh) process: device peak bytes above the inputs."""
    kind, vname, n, cap = spec.split(":")
    n = int(n)
    if kind == "mlp":
        args, n_diff = mlp_inputs(n, bias=False)
        f = mlp_variants(False, [mlp_lib.BlockSizes.get_default()])[vname]
    else:
        args, n_diff = ce_inputs(n)
        f = ce_variants(cap, 15.0 if cap == "isru" else 23.0, CE_CONFIGS)[vname]
    dev = jax.devices()[0]
    jax.block_until_ready(args)
    gib = lambda key: (dev.memory_stats()[key] - base) / 2**30
    base = dev.memory_stats()["bytes_in_use"]
    fn = fwd_bwd(f, n_diff).lower(*args).compile()
    # GEMM autotuning allocates while compiling: if the peak does not grow when
    # the program runs, the run's own peak is at most the compile-time one.
    after_compile = gib("peak_bytes_in_use")
    jax.block_until_ready(fn(*args))
    print(
        json.dumps(
            {"spec": spec, "peak_gib": gib("peak_bytes_in_use"), "peak_after_compile_gib": after_compile}
        )
    )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--peak-child")
    p.add_argument("--only", default="mlp,ce,parts,peak")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    a = p.parse_args()
    if a.peak_child:
        return peak_child(a.peak_child)
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}, jax {jax.__version__}", flush=True)
    log_path = os.path.join(a.out, "mlp_ce_bench.jsonl")
    rows = []

    def log(row):
        print(json.dumps(row), flush=True)
        with open(log_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    if "mlp" in a.only:
        tilings = [mlp_lib.BlockSizes.get_default()] + (MLP_SWEEP if a.sweep else [])
        args, n_diff = mlp_inputs(49152, False)
        case = run_case(
            "mlp N=49152", mlp_variants(False, tilings), args, n_diff, 6 * 2 * 49152 * D * F, log, tilings
        )
        rows += case
        top = [best(case, tilings)]
        for n, bias in ((65536, False), (49152, True), (65536, True)):  # the last: simple's MLP
            args, n_diff = mlp_inputs(n, bias)
            rows += run_case(
                f"mlp N={n}{' +bias' if bias else ''}",
                mlp_variants(bias, top),
                args,
                n_diff,
                6 * 2 * n * D * F,
                log,
                top,
            )
    if "ce" in a.only:
        args, n_diff = ce_inputs(49152)
        flops = 3 * 2 * 49152 * D * V  # the XLA version's GEMMs; the recomputing kernel does one more
        configs = CE_CONFIGS + ([(bs, False) for bs in CE_SWEEP] if a.sweep else [])
        rows += run_case(
            "ce isru N=49152", ce_variants("isru", 15.0, configs), args, n_diff, flops, log, configs
        )
        configs = [CE_CONFIGS[0], CE_CONFIGS[2]]
        rows += run_case(
            "ce sigmoid N=49152",
            ce_variants("sigmoid", 23.0, configs, xla=("bf16",)),
            args,
            n_diff,
            flops,
            log,
            configs,
        )
    if "parts" in a.only:
        run_parts(log)
    if "peak" in a.only:
        specs = [f"mlp:{v}:49152:-" for v in ("xla", "pallas_0")]
        specs += [
            f"ce:{v}:49152:isru"
            for v in ("xla_bf16_logits", "xla_f32_logits", "xla_fused", "pallas_0", "pallas_1", "pallas_2")
        ]
        for spec in specs:
            r = subprocess.run(
                [sys.executable, __file__, "--peak-child", spec], check=False, capture_output=True, text=True
            )
            line = (r.stdout.strip().splitlines() or [r.stderr[-300:]])[-1]
            log({"peak": line})

    print(
        "\ncase | variant | ms (median) | min-max | TFLOP/s | temp GiB | rel err vs first | [N,V] bufs | tiling"
    )
    for r in rows:
        short = r["tiling"].replace("BlockSizes", "").replace("block_", "").replace("num_", "")
        print(
            f"{r['case']} | {r['variant']} | {r['ms']:.3f} | {r['ms_min']:.3f}-{r['ms_max']:.3f} | "
            f"{r['tflops']:.0f} | {r['temp_gib']:.2f} | {r['max_rel_err_vs_first']:.1e} | {r['nv_buffers']} | {short}"
        )


if __name__ == "__main__":
    main()
