"""Times record #77's training head (FP8 GEMM, sigmoid cap, multi-token CE) fwd+bwd, per loss path.

Usage (GPU): python3 benchmarks/head_loss_bench.py
             [--n 16384,32768,49152] [--only xla,xla_fused,xla_fused_rows,pallas] [--sweep] [--no-peak]
             python3 benchmarks/head_loss_bench.py --pass-only [--n 49152]

Each variant is `jax.value_and_grad` of `head.token_losses(...).sum()` with respect to the head
weight and the hidden states [1, N, 768], V = 50304, three multi-token weights, in one jit: the
path a record77 training step runs. `xla` is the plain autodiff path, `xla_fused` and `pallas`
the custom VJP of jaxrun/model/head_mtp_loss.py with the XLA pass or the Pallas kernel, and
`xla_fused_rows` the custom VJP a block of 8192 rows at a time. Printed per variant (JSON lines):
the median, min and max ms over batches of back-to-back calls, XLA's compile-time temp bytes,
the device's peak bytes above the inputs (a fresh process per variant), and the largest error of
the loss and of both gradients relative to the `xla` path's largest entry (FP8: expect ~1e-3).

`--pass-only` times the loss-and-gradient pass alone over bf16 logits [N, V] (std 6): XLA's
(`head_mtp_loss.mtp_ce_xla`) and the Pallas kernel at each tiling of PASS_TILINGS, with the share
of e5m2 gradient entries that differ from XLA's.
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys

# the peak-memory children share the card with this process: it must not hold 75% of it
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.mlp_ce_bench import time_it
from configs import record77
from jaxrun.config import KernelConfig
from jaxrun.model import head, head_mtp_loss, kernels
from jaxrun.model.attention import Mode

D, V = 768, 50304
WEIGHTS = (1.0, 0.5, 0.25)  # record #77's first stage
ROW_BLOCK = 8192
SWEEP = [
    {"block_n": 1, "block_v": 2048, "num_warps": 4},
    {"block_n": 2, "block_v": 1024, "num_warps": 4},
    {"block_n": 4, "block_v": 1024, "num_warps": 8},
    {"block_n": 8, "block_v": 512, "num_warps": 8},
    {"block_n": 16, "block_v": 256, "num_warps": 8},
]
PASS_TILINGS = [(1, 2048, 4), (2, 2048, 8), (4, 1024, 4), (8, 512, 8)]  # (block_n, block_v, num_warps)


def inputs(n, seed=0):
    """Unit-RMS hidden states [1, N, D] (the final norm has no gains), a head weight of std 0.05."""
    k = jax.random.split(jax.random.key(seed), 3)
    h = jax.random.normal(k[0], (1, n, D), jnp.bfloat16)
    w = 0.05 * jax.random.normal(k[1], (D, V), jnp.float32)
    t = jax.random.randint(k[2], (1, n), 0, V)
    return {"lm_head": {"w": w}}, h, t


def variant(name: str):
    """`fn(params, h, targets) -> (loss, (dparams, dh))`, jitted."""
    cfg = record77.get_config().model
    weights = jnp.array(WEIGHTS)
    mode = Mode(training=True)
    if name in ("xla", "xla_fused", "pallas"):
        cfg = dataclasses.replace(cfg, kernels=KernelConfig(loss=name))
        loss = lambda p, h, t: head.token_losses(p, h, t, cfg, mode, weights).sum()
    elif name == "xla_fused_rows":
        loss = lambda p, h, t: head_mtp_loss.fp8_mtp_loss(
            h[0],
            p["lm_head"]["w"],
            t[0],
            weights,
            row_len=h.shape[1],
            scales=cfg.head.fp8,
            row_block=ROW_BLOCK,
        ).sum()
    elif name.startswith("pallas_"):  # pallas_<block_n>_<block_v>_<num_warps>
        from pallas_kernels import mtp_ce

        bn, bv, nw = (int(x) for x in name.split("_")[1:])
        bs = mtp_ce.BlockSizes(block_n=bn, block_v=bv, num_warps=nw)
        ce = lambda *a, **kw: mtp_ce.mtp_ce(*a, **kw, block_sizes=bs)
        loss = lambda p, h, t: head_mtp_loss.fp8_mtp_loss(
            h[0], p["lm_head"]["w"], t[0], weights, row_len=h.shape[1], scales=cfg.head.fp8, ce=ce
        ).sum()
    else:
        raise ValueError(f"unknown variant {name!r}")
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def rel_err(a, b) -> float:
    a, b = (np.asarray(jnp.asarray(x, jnp.float32)) for x in (a, b))
    return float(np.abs(a - b).max() / (np.abs(b).max() or 1.0))


def peak_child(name: str, n: int) -> None:
    """One variant in this (fresh) process: the device's peak bytes above the inputs, in GiB."""
    args = inputs(n)
    dev = jax.devices()[0]
    jax.block_until_ready(args)
    base = dev.memory_stats()["bytes_in_use"]
    fn = variant(name).lower(*args).compile()
    after_compile = (dev.memory_stats()["peak_bytes_in_use"] - base) / 2**30
    jax.block_until_ready(fn(*args))
    peak = (dev.memory_stats()["peak_bytes_in_use"] - base) / 2**30
    # GEMM autotuning allocates while compiling: if the peak does not grow when the program runs,
    # the run's own peak is at most the compile-time one.
    print(json.dumps({"peak_gib": peak, "peak_after_compile_gib": after_compile}))


def run_n(n: int, names: list[str], peak: bool) -> None:
    args = inputs(n)
    ref = None
    for name in names:
        row = {"n": n, "variant": name}
        try:
            fn = variant(name)
            compiled = fn.lower(*args).compile()
            row["temp_gib"] = compiled.memory_analysis().temp_size_in_bytes / 2**30
            out = compiled(*args)
            if name == "xla":
                ref = out
            elif ref is not None:
                (loss, (dp, dh)), (loss_r, (dp_r, dh_r)) = out, ref
                row["err"] = {
                    "loss": rel_err(loss, loss_r),
                    "dw": rel_err(dp["lm_head"]["w"], dp_r["lm_head"]["w"]),
                    "dh": rel_err(dh, dh_r),
                }
            row["ms"], row["min_ms"], row["max_ms"] = time_it(compiled, args)
            row["tflops"] = 3 * 2 * n * D * V / row["ms"] / 1e9  # the three GEMMs
            del compiled, out
        except Exception as e:  # noqa: BLE001
            row["error"] = repr(e)[:600]
        if peak and "error" not in row:
            child = [sys.executable, __file__, "--peak-child", f"{name}:{n}"]
            res = subprocess.run(child, check=False, capture_output=True, text=True)
            lines = [x for x in res.stdout.splitlines() if x.startswith("{")]
            row |= json.loads(lines[-1]) if lines else {"peak_error": res.stderr[-400:]}
        print(json.dumps(row), flush=True)


def run_pass(n: int) -> None:
    """The loss-and-gradient pass alone: XLA's, then the Pallas kernel per tiling, over the same logits."""
    from pallas_kernels import mtp_ce

    k = jax.random.split(jax.random.key(0), 2)
    logits = (6.0 * jax.random.normal(k[0], (n, V))).astype(jnp.bfloat16)
    t = jax.random.randint(k[1], (n,), 0, V)
    args = (logits, head_mtp_loss.shifted_targets(t, min(n, 16_384), len(WEIGHTS)), jnp.array(WEIGHTS))
    kw = {"cap_value": 23.0, "grad_scale": record77.get_config().model.head.fp8.grad_scale}
    passes = {"xla": lambda *a: head_mtp_loss.mtp_ce_xla(*a, **kw)}
    for bn, bv, nw in PASS_TILINGS:
        bs = mtp_ce.BlockSizes(block_n=bn, block_v=bv, num_warps=nw)
        passes[f"pallas_{bn}_{bv}_{nw}"] = lambda *a, bs=bs: mtp_ce.mtp_ce(
            *a, **kw, block_sizes=bs, interpret=kernels.interpret()
        )
    g8_xla = None
    for name, fn in passes.items():
        compiled = jax.jit(fn).lower(*args).compile()
        g8 = compiled(*args)[2].astype(jnp.float32)
        g8_xla = g8 if g8_xla is None else g8_xla
        row = {"n": n, "pass": name, "e5m2_differ_from_xla": float(jnp.mean(g8 != g8_xla))}
        row["ms"], row["min_ms"], row["max_ms"] = time_it(compiled, args)
        print(json.dumps(row), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", default="16384,32768,49152", help="tokens per micro-batch, comma-separated")
    p.add_argument("--only", default="xla,xla_fused,xla_fused_rows,pallas")
    p.add_argument("--sweep", action="store_true", help="also Pallas tilings (pallas_<n>_<v>_<warps>)")
    p.add_argument("--no-peak", action="store_true", help="skip the per-variant peak-memory processes")
    p.add_argument(
        "--pass-only", action="store_true", help="time the loss pass alone, XLA and Pallas tilings"
    )
    p.add_argument("--peak-child")
    a = p.parse_args()
    if a.peak_child:
        name, n = a.peak_child.split(":")
        return peak_child(name, int(n))
    if a.pass_only:
        for n in (int(x) for x in a.n.split(",")):
            run_pass(n)
        return None
    names = a.only.split(",")
    if a.sweep:
        names += [f"pallas_{s['block_n']}_{s['block_v']}_{s['num_warps']}" for s in SWEEP]
    print(json.dumps({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "D": D, "V": V}))
    print(json.dumps({"configs/record77.py model.kernels.loss": record77.get_config().model.kernels.loss}))
    for n in (int(x) for x in a.n.split(",")):
        run_n(n, names, not a.no_peak)


if __name__ == "__main__":
    main()
