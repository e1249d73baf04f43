"""Where a train step's device time goes: kernel time per step by category, from a jax.profiler trace.

Runs a few steps of the config's compiled train step (random tokens) under
`jax.profiler.trace`, reads the Chrome-format trace it writes
(`*.trace.json.gz`, plain gzip JSON: no TensorBoard needed), and sums each
kernel's duration into a category: matmul, attention, reductions,
elementwise, pallas (jaxrun's own fused kernels, attention aside),
collectives, copies, other. A kernel is classified by the HLO
instruction it runs, looked up in the step's compiled HLO (a fusion holding
a dot is a matmul, one holding a reduce a reduction, and so on), or by its
name when the trace names a library kernel (cuBLAS, cuDNN, NCCL). On a GPU
the kernels are the events of the device's stream lines; on the CPU they are
the XLA ops that the CPU client's threads execute, so CI can test it.

Usage:
  python launch.py profile --config simple --steps 3 [--set ...] [--out DIR] [--against OLD.json]
  python benchmarks/profile_step.py --config simple --steps 3
Writes profile_step.json (ms per step per category, and the top ops),
profile_step.png (a bar chart) and step_hlo.txt.gz (the compiled step's HLO, where each op the
table names can be looked up) to --out. `--against` takes an earlier run's
profile_step.json and prints and plots each category before and now.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

DOC_TOKENS = 1000  # mean document length of the synthetic segment ids (FineWeb's is about 1,000)
CATEGORIES = ("matmul", "attention", "reductions", "elementwise", "pallas", "collectives", "copies", "other")
# Pallas kernels reach the HLO as custom calls to these targets (Triton, Mosaic GPU); the ones for
# attention count as attention, the rest (jaxrun's fused passes) as "pallas".
_PALLAS_TARGETS = re.compile(r"xla\.gpu\.triton|mosaic_gpu", re.IGNORECASE)
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute", "nccl")
# Library kernels, by name, when the trace event names no HLO instruction we know.
_NAME_RULES = (
    (
        "collectives",
        re.compile(
            r"nccl|all[-_]?reduce|all[-_]?gather|reduce[-_]?scatter|all[-_]?to[-_]?all", re.IGNORECASE
        ),
    ),
    ("attention", re.compile(r"fmha|flash|sdpa|attention|cudnn", re.IGNORECASE)),
    # a Mosaic GPU kernel's events carry "<its name>_mosaic_gpu_kernel", not its HLO instruction's
    ("pallas", re.compile(r"mosaic_gpu_kernel", re.IGNORECASE)),
    ("matmul", re.compile(r"gemm|cublas|nvjet|xmma|cutlass|matmul|\bdot\b|wgmma|sm90_", re.IGNORECASE)),
    ("copies", re.compile(r"memcpy|memset|copy|transpose", re.IGNORECASE)),
    ("reductions", re.compile(r"reduce", re.IGNORECASE)),
    ("elementwise", re.compile(r"fusion|loop_|elementwise", re.IGNORECASE)),
)
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([\w\-]+)\((.*)$")
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) ")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_KERNEL_NAME = re.compile(r', name = "([\w.\-]+)"')


def _computations(hlo: str) -> dict[str, list[tuple[str, str, str]]]:
    """Each computation's instructions as (name, opcode, rest of the line)."""
    comps: dict[str, list[tuple[str, str, str]]] = {}
    current = None
    for line in hlo.splitlines():
        if current is None:
            head = _HEADER.match(line)
            if head and line.rstrip().endswith("{") and not line.startswith("HloModule"):
                current = comps.setdefault(head.group(1), [])
        elif line.startswith("}"):
            current = None
        elif m := _INSTR.match(line):
            current.append(m.groups())
    return comps


def _classify_instr(opcode: str, rest: str, comps: dict) -> str:
    """The category of one top-level HLO instruction (a fusion by what its body holds)."""
    if any(opcode.startswith(c) for c in _COLLECTIVES):
        return "collectives"
    if opcode == "custom-call":
        target = (_TARGET.search(rest) or [None, ""])[1]
        rule = next((cat for cat, pattern in _NAME_RULES if pattern.search(target + " " + rest[:400])), None)
        if rule in ("attention", "matmul", "collectives"):
            return rule
        return "pallas" if _PALLAS_TARGETS.search(target) else "other"
    if opcode in ("dot", "convolution"):
        return "matmul"
    if opcode in (
        "copy",
        "transpose",
        "dynamic-update-slice",
        "dynamic-slice",
        "slice",
        "concatenate",
        "pad",
    ):
        return "copies"
    if opcode in ("reduce", "reduce-window", "scatter", "sort"):
        return "reductions"
    if opcode == "fusion":
        body = comps.get((_CALLS.search(rest) or [None, ""])[1], [])
        ops = {op for _, op, _ in body}
        if ops & {"dot", "convolution"} or "gemm" in rest or "__cublas" in rest:
            return "matmul"
        if any(op.startswith(c) for op in ops for c in _COLLECTIVES):
            return "collectives"
        if ops & {"reduce", "reduce-window", "scatter"}:
            return "reductions"
        if ops and ops <= {
            "parameter",
            "copy",
            "transpose",
            "bitcast",
            "dynamic-update-slice",
            "slice",
            "tuple",
        }:
            return "copies"
        return "elementwise"
    return "elementwise"


def hlo_categories(hlo: str) -> dict[str, str]:
    """Instruction name -> category, for every instruction outside fusion bodies."""
    comps = _computations(hlo)
    fused = {
        m.group(1) for line in hlo.splitlines() if " fusion(" in line for m in [_CALLS.search(line)] if m
    }
    out = {}
    for comp, instrs in comps.items():
        if comp in fused:
            continue
        for name, opcode, rest in instrs:
            out[name] = _classify_instr(opcode, rest, comps)
            if kernel := _KERNEL_NAME.search(rest) if opcode == "custom-call" else None:
                out[kernel.group(1)] = out[name]  # a Triton kernel's events carry its own name
    return out


def _norm(name: str) -> str:
    return name.replace("_", ".").replace("-", ".").lower()


def classify(name: str, args: dict, by_instr: dict[str, str]) -> str:
    """An event's category: its HLO instruction's (names as `_norm` makes them), else a rule on its name.

    GPU kernels are named after their fusion with "_" where the HLO has ".", or carry it as `hlo_op`.
    """
    for key in (args.get("hlo_op"), args.get("long_name"), name):
        if key and (cat := by_instr.get(_norm(str(key).split(" ")[0]))):
            return cat
    return next((cat for cat, pattern in _NAME_RULES if pattern.search(name)), "other")


def kernel_events(trace: dict) -> tuple[list[dict], str]:
    """The device's kernel events (GPU stream lines), or the CPU client's XLA op events; and the source."""
    events = trace["traceEvents"]
    procs = {
        e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    gpu = [
        e
        for e in complete
        if "/device:GPU" in procs.get(e["pid"], "")
        and "stream" in threads.get((e["pid"], e.get("tid")), "").lower()
    ]
    if gpu:
        return gpu, "gpu streams"
    cpu = [
        e
        for e in complete
        if any(t in threads.get((e["pid"], e.get("tid")), "") for t in ("XLAPjRtCpuClient", "XLAEigen"))
        and not e["name"].startswith(("end:", "ThreadpoolListener", "ThunkExecutor"))
    ]
    return cpu, "cpu client threads"


def breakdown(trace: dict, hlo: str, steps: int) -> dict:
    """ms per step per category, and the costliest ops."""
    events, source = kernel_events(trace)
    by_instr = {_norm(k): v for k, v in hlo_categories(hlo).items()}
    per_cat: collections.Counter = collections.Counter()
    per_op: collections.Counter = collections.Counter()
    cats = {}
    for e in events:
        cat = classify(e["name"], e.get("args", {}), by_instr)
        per_cat[cat] += e["dur"] / 1000 / steps
        per_op[e["name"]] += e["dur"] / 1000 / steps
        cats[e["name"]] = cat
    top = [{"op": op, "category": cats[op], "ms_per_step": ms} for op, ms in per_op.most_common(25)]
    return {
        "source": source,
        "steps": steps,
        "ms_per_step": {c: per_cat.get(c, 0.0) for c in CATEGORIES},
        "total_ms_per_step": sum(per_cat.values()),
        "top_ops": top,
    }


def plot(result: dict, path: Path, title: str, before: dict | None = None) -> None:
    """A bar per category; with `before` (an earlier result), its bar beside each."""
    import numpy as np

    from jaxrun.runlog import loss_axes

    fig, ax = loss_axes((7, 3.5))
    cats = list(result["ms_per_step"])[::-1]
    rows, height = np.arange(len(cats)), 0.4 if before else 0.8
    now = [result["ms_per_step"][c] for c in cats]
    if before:
        then = [before["ms_per_step"].get(c, 0.0) for c in cats]
        ax.barh(
            rows + height / 2,
            then,
            height,
            color="tab:gray",
            label=f"before: {before['total_ms_per_step']:.1f} ms",
        )
        ax.barh(
            rows - height / 2,
            now,
            height,
            color="tab:blue",
            label=f"now: {result['total_ms_per_step']:.1f} ms",
        )
        ax.legend(loc="lower right")
    else:
        ax.barh(rows, now, height, color="tab:blue")
    ax.set_yticks(rows, cats)
    ax.set_xlabel("kernel time per step (ms)")
    ax.set_ylabel("")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def profile(cfg, steps: int, out: Path, at_step: int = 0) -> dict:
    """Compile `cfg`'s step as the schedule runs it at `at_step` (mode and batch shape), run 2 warm-up
    steps, trace `steps` more, and break the trace down."""
    import jax
    import jax.numpy as jnp

    from jaxrun import data, schedule, sharding, train

    mesh = sharding.make_mesh(cfg.mesh)
    state = train.init_state(cfg, jax.random.key(cfg.train.seed), mesh)
    stage = data.stage_at(at_step, train.data_stages(cfg))
    accum = train.grad_accum_steps(cfg, mesh.size, stage.batch_seqs)
    shape = (accum, stage.batch_seqs // accum, stage.seq_len)
    spec = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding.batch_sharding(mesh))
    keys = ("inputs", "targets") if cfg.data.mode == "contiguous" else ("inputs", "targets", "segment_ids")
    compiled = train.make_train_step(cfg, mesh, schedule.train_mode(cfg, at_step)).lower(
        state, dict.fromkeys(keys, spec)
    )
    compiled = compiled.compile()
    hlo = compiled.as_text()
    with gzip.open(out / "step_hlo.txt.gz", "wt") as f:
        f.write(hlo)
    tokens = jax.random.randint(jax.random.key(1), shape, 0, cfg.model.vocab_size, jnp.int32)
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=-1)}
    if "segment_ids" in keys:  # documents of DOC_TOKENS tokens on average
        starts = jax.random.bernoulli(jax.random.key(2), 1 / DOC_TOKENS, shape)
        batch["segment_ids"] = jnp.cumsum(starts, axis=-1, dtype=jnp.int32)
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    for _ in range(2):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    trace_dir = out / "trace"
    with jax.profiler.trace(str(trace_dir)):
        for _ in range(steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
    files = sorted(glob.glob(str(trace_dir / "**" / "*.trace.json.gz"), recursive=True))
    with gzip.open(files[-1]) as f:
        trace = json.load(f)
    result = breakdown(trace, hlo, steps)
    result["device"] = jax.devices()[0].device_kind
    result["config"] = cfg.name
    result["at_step"] = at_step
    return result


def table(result: dict, before: dict | None = None) -> list[str]:
    """Markdown-style rows: ms/step and share per category, with `before`'s ms and the change."""
    total = result["total_ms_per_step"]
    share = lambda ms: f"{ms / total:.1%}" if total else "-"
    if before is None:
        rows = ["category | ms/step | share"]
        rows += [f"{cat} | {ms:.2f} | {share(ms)}" for cat, ms in result["ms_per_step"].items()]
        return [*rows, f"total | {total:.2f} |"]
    rows = [f"category | before ({before.get('device', '?')}) | now | change | share now"]
    for cat, ms in result["ms_per_step"].items():
        then = before["ms_per_step"].get(cat, 0.0)
        rows.append(f"{cat} | {then:.2f} | {ms:.2f} | {ms - then:+.2f} | {share(ms)}")
    then = before["total_ms_per_step"]
    return [*rows, f"total | {then:.2f} | {total:.2f} | {total - then:+.2f} |"]


def main(argv: list[str] | None = None, load_config: Callable | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="simple")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--steps", type=int, default=3, help="steps traced (after 2 untraced warm-up steps)")
    p.add_argument(
        "--at-step", type=int, default=0, help="profile the step the schedule runs here (mode, batch shape)"
    )
    p.add_argument("--out", default=os.environ.get("OUT") or tempfile.mkdtemp(prefix="profile_step-"))
    p.add_argument("--against", type=Path, help="an earlier profile_step.json, shown beside this one")
    a = p.parse_args(argv)
    if a.against and not a.against.is_file():
        p.error(f"--against {a.against}: no such file (give an earlier run's profile_step.json)")
    before = json.loads(a.against.read_text()) if a.against else None
    if load_config is None:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
        from launch import load_config
    from jaxrun.config import apply_overrides

    cfg = apply_overrides(load_config(a.config), a.set)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = profile(cfg, a.steps, out, a.at_step)
    (out / "profile_step.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "profile_step.png", f"{cfg.name} on {result['device']}: kernel time per step", before)
    print(
        f"{cfg.name} on {result['device']} ({result['source']}), {a.steps} steps traced, "
        f"as at step {a.at_step}"
    )
    print("\n".join(table(result, before)))
    print(
        "top ops: "
        + "; ".join(f"{t['op']} ({t['category']}) {t['ms_per_step']:.2f}" for t in result["top_ops"][:8])
    )
    print(f"wrote {out / 'profile_step.json'}, {out / 'profile_step.png'} and {out / 'step_hlo.txt.gz'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
