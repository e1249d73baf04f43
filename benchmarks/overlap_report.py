"""Do the train step's collectives overlap compute? Read it off the scheduled HLO.

    python -m benchmarks.overlap_report                      # `simple` at full size (GPU)
    python -m benchmarks.overlap_report --small              # CPU-sized smoke run
    python -m benchmarks.overlap_report --config record77    # record #77's first-stage step
    # two processes sharing one GPU, to compile (never run) the step for a 2-GPU mesh:
    for i in 0 1; do XLA_PYTHON_CLIENT_PREALLOCATE=false JAXRUN_COORDINATOR=localhost:12355 \\
        JAXRUN_NUM_PROCESSES=2 JAXRUN_PROCESS_ID=$i python -m benchmarks.overlap_report \\
        --out hlo_$i.txt --plot schedule_$i.png --json overlap_$i.json & done; wait

The step is lowered from abstract inputs only (ShapeDtypeStructs with the
shardings `train.init_state` gives) and compiled for the first stage's batch
shape with `sharding.set_xla_gpu_flags`. As it makes no arrays, processes
joined by `sharding.initialize_distributed` can share one GPU to compile the
multi-GPU step (NCCL is only needed to run it): JAXRUN_NUM_PROCESSES=8 with
eight such processes compiles the step of an 8-GPU mesh.

A scheduled module lists each computation's instructions in execution order.
An async collective is a start/done pair (`all-gather-start`/`-done`, ...,
`async-start`/`-done` around a wrapped collective), matched through the done's
operand. Compute: every instruction but bookkeeping (`BOOKKEEPING`), collectives
and async ops (copy-start too); a fusion, custom-call, dot, copy, while or call
counts as one. Synchronous collectives are counted apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import sys
import time
from collections import Counter, namedtuple
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import launch
from benchmarks.checkpoint_bench import SMALL
from jaxrun import optim, sharding, train
from jaxrun.config import apply_overrides

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
COLLECTIVES += ("ragged-all-to-all", "collective-broadcast")
BOOKKEEPING = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "domain"}
BOOKKEEPING |= {"add-dependency", "opt-barrier", "partition-id", "replica-id", "send", "recv"}
BOOKKEEPING |= {"send-done", "recv-done"}
_NOT_COMPUTE, _ASYNC = BOOKKEEPING.union(COLLECTIVES), ("-start", "-update", "-done")
_HEADER = re.compile(r"(?:ENTRY\s+)?%?([\w.\-]+)\b.*\{\s*$")
_INSTR = re.compile(r"\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][a-z0-9\-]*)\((.*)$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
Instr = namedtuple("Instr", "name opcode operands attrs")  # attrs: all after the operand list


@dataclasses.dataclass(frozen=True)
class Pair:
    kind: str  # the collective, e.g. "reduce-scatter"
    computation: str
    start: int  # positions in the computation's schedule
    done: int
    name: str  # the start's name
    compute_between: int
    marked_sync: bool  # XLA decided to run it synchronously


@dataclasses.dataclass
class Report:
    schedules: dict[str, list[Instr]]  # computation -> instructions in execution order
    entry: str
    pairs: list[Pair]
    sync_collectives: Counter
    unmatched: int  # starts without a done, or dones without a start

    def summary(self) -> dict:
        by_kind = {}
        for kind in sorted({p.kind for p in self.pairs} | set(self.sync_collectives)):
            ops = [p.compute_between for p in self.pairs if p.kind == kind]
            by_kind[kind] = {
                "async_pairs": len(ops),
                "overlapped": sum(n > 0 for n in ops),
                "median_ops_between": statistics.median(ops) if ops else 0,
                "max_ops_between": max(ops, default=0),
                "marked_sync": sum(p.marked_sync for p in self.pairs if p.kind == kind),
                "sync_collectives": self.sync_collectives[kind],
            }
        return {
            "async_pairs": len(self.pairs),
            "overlapped_pairs": sum(p.compute_between > 0 for p in self.pairs),
            "sync_collectives": sum(self.sync_collectives.values()),
            "unmatched": self.unmatched,
            "pairs_per_computation": dict(Counter(p.computation for p in self.pairs)),
            "by_kind": by_kind,
        }

    def table(self) -> str:
        head = "| collective | async pairs | with compute between | median ops | max ops | marked is_sync |"
        rows = [f"{head} sync ops |", "|---|---:|---:|---:|---:|---:|---:|"]
        for kind, s in self.summary()["by_kind"].items():  # its values in the columns' order
            rows.append(f"| {kind} | " + " | ".join(f"{v:g}" for v in s.values()) + " |")
        return "\n".join(rows)

    def excerpts(self, count: int = 3, lines: int = 12) -> str:
        """The schedule around the first `count` overlapped pairs, `lines` instructions each at most."""
        out = []
        for p in [p for p in self.pairs if p.compute_between][:count]:
            out.append(f"{p.kind} `{p.name}` in `{p.computation}`: {p.compute_between} compute ops between")
            sched = self.schedules[p.computation]
            window = list(range(max(p.start - 1, 0), min(p.done + 2, len(sched))))
            if len(window) > lines:
                window = window[: lines // 2] + [-1] + window[-(lines - lines // 2 - 1) :]
            for i in window:
                out.append(f"  {i:5d}  {sched[i].name[:40]:40s} {sched[i].opcode}" if i >= 0 else "    ...")
        return "\n".join(out)


def _operands(text: str) -> tuple[tuple[str, ...], str]:
    """The operand names in `text` (what follows `opcode(`), and the attributes after them."""
    depth = 0
    for i, ch in enumerate(text):
        depth += (ch in "([{") - (ch in ")]}")
        if depth < 0:
            return tuple(re.findall(r"%([\w.\-]+)", text[:i])), text[i + 1 :]
    return (), text


def _computations(hlo: str) -> tuple[dict[str, list[Instr]], str]:
    comps, entry, current = {}, "", None
    for line in hlo.splitlines():
        if current is None:
            if (head := _HEADER.match(line)) and not line.startswith("HloModule"):
                current = comps.setdefault(head.group(1), [])
                entry = head.group(1) if line.startswith("ENTRY") else entry
        elif line.startswith("}"):
            current = None
        elif m := _INSTR.match(line):
            operands, attrs = _operands(m.group(3))
            current.append(Instr(m.group(1), m.group(2), operands, attrs))
    return comps, entry


def _async_role(ins: Instr, comps: dict[str, list[Instr]]) -> tuple[str, str | None] | None:
    """("start" | "update" | "done", the collective or None) for async ops, None for others."""
    base, _, role = ins.opcode.rpartition("-")
    if role not in ("start", "update", "done") or base not in (*COLLECTIVES, "async"):
        return None
    if base != "async":
        return role, base
    wrapped = _CALLS.search(ins.attrs) if role == "start" else None
    ops = [i.opcode for i in comps.get(wrapped.group(1), [])] if wrapped else []
    return role, next((op for op in ops if op in COLLECTIVES), None)


def is_compute(ins: Instr) -> bool:
    return ins.opcode not in _NOT_COMPUTE and not ins.opcode.endswith(_ASYNC)


def parse_schedule(hlo: str) -> Report:
    """The async collective pairs and sync collectives of a scheduled module's text."""
    comps, entry = _computations(hlo)
    starts = [i for instrs in comps.values() for i in instrs if i.opcode == "async-start"]
    wrappers = {m.group(1) for i in starts if (m := _CALLS.search(i.attrs))}
    pairs, sync, unmatched = [], Counter(), 0
    for comp, instrs in comps.items():
        if comp in wrappers:  # the body of an async-start, not scheduled on its own
            continue
        in_flight = {}  # name of a start (or update) -> (kind, start position, marked sync)
        for i, ins in enumerate(instrs):
            if ins.opcode in COLLECTIVES:
                sync[ins.opcode] += 1
            elif (role := _async_role(ins, comps)) is None:
                continue
            elif role[0] == "start":
                if role[1] is not None:
                    in_flight[ins.name] = (role[1], i, re.search(r'"is_sync":\s*true', ins.attrs) is not None)
            elif (source := next((o for o in ins.operands if o in in_flight), None)) is None:
                unmatched += role[1] is not None  # a collective's done without its start
            elif role[0] == "update":
                in_flight[ins.name] = in_flight.pop(source)
            else:
                kind, start, marked = in_flight.pop(source)
                between = sum(is_compute(x) for x in instrs[start + 1 : i])
                pairs.append(Pair(kind, comp, start, i, instrs[start].name, between, marked))
        unmatched += len(in_flight)
    schedules = {c: instrs for c, instrs in comps.items() if c not in wrappers}
    pairs.sort(key=lambda p: (list(schedules).index(p.computation), p.start))  # in schedule order
    return Report(schedules, entry, pairs, sync, unmatched)


def plot_schedule(report: Report, path: str, title: str) -> None:
    """One bar per async pair from start to done over the busiest computation; compute ops as ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = Counter(p.computation for p in report.pairs)
    comp = counts.most_common(1)[0][0] if counts else report.entry
    sched, pairs = report.schedules.get(comp, []), [p for p in report.pairs if p.computation == comp]
    colors = {k: plt.cm.tab10(i) for i, k in enumerate(COLLECTIVES)}
    fig, ax = plt.subplots(figsize=(12, 2 + 0.12 * len(pairs)))
    for row, p in enumerate(pairs):  # one legend entry per kind
        label = None if any(q.kind == p.kind for q in pairs[:row]) else f"async {p.kind}"
        ax.barh(row, max(p.done - p.start, 0.5), left=p.start, height=0.8, color=colors[p.kind], label=label)
    compute = [i for i, ins in enumerate(sched) if is_compute(ins)]
    ax.plot(compute, [-1.5] * len(compute), "|", color="0.3", markersize=8, label="compute op")
    synced = [i for i, ins in enumerate(sched) if ins.opcode in COLLECTIVES]
    ax.plot(synced, [-2.5] * len(synced), "v", color="red", markersize=5, label="sync collective")
    ax.set_xlim(-1, max(len(sched), 1))
    ax.set_ylim(-3.5, max(len(pairs), 1))
    ax.set_yticks([])
    ax.set_xlabel(f"position in the schedule of `{comp[:60]}`")
    ax.set_ylabel("async pairs")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8, ncols=3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def abstract_state(cfg, mesh) -> train.TrainState:
    """The train state as ShapeDtypeStructs, each with the sharding `train.init_state` gives it."""
    shapes = jax.eval_shape(lambda: train.init_state(cfg, jax.random.key(cfg.train.seed), mesh))
    opt_specs = train._opt_state_specs(cfg, mesh, optim.make_optimizer(cfg))
    replicated = jax.tree.map(lambda _: P(), (shapes.params, shapes.fp8))
    held = jax.tree.map(lambda _: P(mesh.axis_names[0]), shapes.held)  # one part per device
    specs = train.TrainState(P(), replicated[0], opt_specs, replicated[1], held)
    return jax.tree.map(
        lambda x, spec: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec)),
        shapes,
        specs,
    )


# record77 at CPU size: width 96, windows in blocks of 8 tokens, short rows per stage
SMALL_RECORD = [
    "model.head_dim=16",
    "model.model_dim=96",
    "model.attn.windows.block=8",
    "data.seq_len=64",
    "data.max_doc_len=32",
    "data.stages=((483,8,128,64),(967,8,192,64))",
]


def compile_step(cfg, mesh):
    """The train step compiled as step 1 runs it (the first stage; an Adam step where Adam updates
    every other step, so its collectives are in), from abstract inputs only."""
    keys = ("inputs", "targets") if cfg.data.mode == "contiguous" else ("inputs", "targets", "segment_ids")
    mode, shape, adam_step = train.variant_key(cfg, mesh.size, 1)
    batch = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding.batch_sharding(mesh))
    step = train.make_train_step(cfg, mesh, mode, adam_step=adam_step)
    return step.lower(abstract_state(cfg, mesh), dict.fromkeys(keys, batch)).compile(), shape


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", default="simple", help="config name in configs/ or a path (default: simple)"
    )
    parser.add_argument("--small", action="store_true", help="the config at CPU size")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--out", help="write the optimized HLO here (e.g. docs/OVERLAP_hlo.txt)")
    parser.add_argument("--plot", help="write the schedule plot here (e.g. docs/img/overlap_schedule.png)")
    parser.add_argument("--json", help="write the summary here as JSON")
    args = parser.parse_args(argv)

    sharding.set_xla_gpu_flags()  # before jax starts its backend, as launch.py trains
    sharding.initialize_distributed()
    cfg = launch.load_config(args.config)
    small = (SMALL_RECORD if cfg.data.mode == "record" else SMALL) if args.small else []
    cfg = apply_overrides(cfg, [*small, *args.set])
    mesh, kind = sharding.make_mesh(cfg.mesh), jax.devices()[0].device_kind
    flags = {k: os.environ.get(k, "") for k in ("XLA_FLAGS", "NCCL_NVLS_ENABLE")}
    counts = (
        f"{jax.device_count()} devices ({jax.local_device_count()} local), {jax.process_count()} processes"
    )
    print(f"{kind}: {counts}\n" + "\n".join(f"  {k}={v}" for k, v in flags.items()))
    t0 = time.perf_counter()
    compiled, shape = compile_step(cfg, mesh)
    compile_s, hlo = time.perf_counter() - t0, compiled.as_text()
    print(f"{cfg.name}{' (small)' if args.small else ''}: batch {shape}, compiled in {compile_s:.1f}s")
    if args.out:
        _write(args.out, hlo)
        print(f"optimized HLO ({len(hlo.splitlines())} lines) in {args.out}")

    report = parse_schedule(hlo)
    s = report.summary()
    print(
        f"\n{s['async_pairs']} async collective pairs, {s['overlapped_pairs']} with compute between start "
        f"and done; {s['sync_collectives']} synchronous collectives; {s['unmatched']} unmatched\n"
    )
    print(report.table())
    if excerpts := report.excerpts():
        print("\n" + excerpts)
    if args.plot:
        title = f"{kind} x {mesh.size}: {s['async_pairs']} async collectives, {s['overlapped_pairs']} overlap"
        plot_schedule(report, args.plot, title + " compute")
        print(f"schedule plot in {args.plot}")
    result = {"config": cfg.name, "small": args.small, "device_kind": kind, "devices": jax.device_count()}
    result |= {"processes": jax.process_count(), "flags": flags, "batch_shape": list(shape)}
    result |= {"compile_s": compile_s, **s}
    if args.json:
        _write(args.json, json.dumps(result, indent=2))
    return result


def _write(path: str, text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


if __name__ == "__main__":
    main(sys.argv[1:])
