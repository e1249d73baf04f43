"""Times causal attention at jaxrun's shapes: the Pallas kernels, cuDNN and plain XLA, fwd and fwd+bwd.

Cases (q, k, v `[B, T, H, 128]` bf16, scale 0.12):
  1. B=24, T=2048, H=6, window 768      2. the same, window 1664      3. the same, plain causal
  4. B=1, T=49,152, H=6, window 768, documents from the val shard (cut at 2048).
  record: record #77's per-device attention, B=1, T = 16K, 32K and 48K tokens, windows 128, 384,
     640, 768 and 1664, documents from the val shard (cut at 896 at 16K, the first stage's
     max_seq_len, else 2048); each also "paired": 3 heads over the doubled sequence of 2T virtual
     positions, every id twice, the same window in virtual positions (what the model's paired
     layers hand the kernel). Pick some with e.g. `--cases r16K,r49K` or `--cases w768`.
cuDNN has no document mask, so on document cases its row (and a `pallas (window only)` row) is
window-only.

Each time is the median over `--samples` samples of `--inner` back-to-back calls, after warm-up.
TFLOP/s counts only visible (query, key) pairs: 4·K flops per pair forward, 14·K forward+backward.

`pallas` is what `flash_attention` runs by default: on Hopper the Mosaic GPU forward without
documents, the Triton kernels otherwise. `--impls pallas-mosaic` adds a row with every Mosaic GPU
kernel on (the forward with documents and the backward are opt-in until timed), `pallas-triton`
one with the portable Triton kernels throughout.

  python benchmarks/attention_bench.py --data .data/val_000000.bin.xz [--sweep] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import lzma
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pallas_kernels import attention as kernels
from pallas_kernels import attention_mgpu, attention_mgpu_bwd
from pallas_kernels.attention import BlockSizes, flash_attention

SCALE = 0.12
BOS = 50256
DOC_CUT = 2048  # documents are cut at the training context


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    b: int
    t: int
    window: int | None
    docs: bool = False
    h: int = 6
    d: int = 128
    paired: bool = False  # t and h are the kernel's: 2x the tokens, half the heads
    doc_cut: int = DOC_CUT

    @property
    def tokens(self) -> int:
        return self.t // 2 if self.paired else self.t


def _record_cases() -> tuple[Case, ...]:
    cases = []
    for tokens in (16384, 32768, 49152):
        for window in (128, 384, 640, 768, 1664):
            for paired in (False, True):
                name = f"r{tokens // 1024}K w{window}" + (" paired" if paired else "")
                t, h = (2 * tokens, 3) if paired else (tokens, 6)
                cut = 896 if tokens == 16384 else DOC_CUT
                cases.append(Case(name, 1, t, window, docs=True, h=h, paired=paired, doc_cut=cut))
    return tuple(cases)


CASES = (
    Case("1: B24 T2048 w768", 24, 2048, 768),
    Case("2: B24 T2048 w1664", 24, 2048, 1664),
    Case("3: B24 T2048 causal", 24, 2048, None),
    Case("4: B1 T49152 w768 docs", 1, 49152, 768, docs=True),
    *_record_cases(),
)

# Candidate tiles and launch settings for --sweep, timed kernel by kernel.
SWEEP = {
    "fwd": [
        {"block_q": bq, "block_k": bk, "num_warps": w, "num_stages": st}
        for bq, bk, w, st in [
            (128, 64, 8, 3),
            (128, 128, 8, 3),
            (64, 64, 4, 3),
            (256, 64, 8, 3),
            (256, 32, 8, 3),
        ]
    ],
    "fwd_mgpu": [
        {"block_k_mgpu": bk, "stages_mgpu": st}
        for bk, st in [
            (128, 2),
            (64, 2),
            (64, 3),
            (64, 4),
        ]
    ],
    "dq_mgpu": [
        {"block_q_dq_mgpu": 64, "block_k_dq_mgpu": bk, "stages_bwd_mgpu": st}
        for bk, st in [(64, 2), (64, 3), (64, 4), (128, 2)]
    ],
    "dkdv_mgpu": [
        {"block_k_dkv_mgpu": 64, "block_q_dkv_mgpu": bq, "stages_bwd_mgpu": st}
        for bq, st in [(64, 2), (64, 3), (128, 2)]
    ],
    "dkdv": [
        {"block_q_dkv": bq, "block_k_dkv": bk, "num_warps_dkv": w, "num_stages_dkv": st}
        for bq, bk, w, st in [
            (64, 64, 4, 2),
            (64, 64, 4, 3),
            (32, 64, 4, 3),
            (32, 64, 4, 4),
            (64, 128, 8, 2),
            (64, 128, 8, 3),
            (32, 128, 8, 3),
            (128, 64, 8, 2),
        ]
    ],
    "dq": [
        {"block_q_dq": bq, "block_k_dq": bk, "num_warps_dq": w, "num_stages_dq": st}
        for bq, bk, w, st in [
            (64, 64, 4, 2),
            (64, 64, 4, 3),
            (128, 64, 8, 2),
            (128, 64, 8, 3),
            (64, 32, 4, 3),
            (128, 32, 8, 3),
            (128, 128, 8, 2),
            (64, 128, 4, 2),
        ]
    ],
}


@functools.lru_cache(maxsize=1)
def _shard_tokens(path: Path) -> np.ndarray:
    raw = lzma.decompress(path.read_bytes())
    header = np.frombuffer(raw[:1024], np.int32)
    return np.frombuffer(raw[1024:], np.uint16, count=int(header[2]))


def load_segment_ids(path: Path, t: int, cut: int = DOC_CUT) -> np.ndarray:
    """Document ids of the first t tokens of an llm.c shard; a new id at each BOS and every `cut`."""
    tokens = _shard_tokens(path)[:t]
    assert tokens.size == t, f"shard has {tokens.size} tokens, need {t}"
    pos = np.arange(t)
    doc_start = np.maximum.accumulate(np.where(tokens == BOS, pos, 0))
    chunk = (pos - doc_start) // cut
    new = np.concatenate([[True], (doc_start[1:] != doc_start[:-1]) | (chunk[1:] != chunk[:-1])])
    return np.cumsum(new).astype(np.int32) - 1


def case_segment_ids(path: Path, case: Case) -> np.ndarray:
    """The case's `[T]` ids; on paired cases each token's id twice, as the model's paired layers pass them."""
    seg = load_segment_ids(path, case.tokens, case.doc_cut)
    return np.repeat(seg, 2) if case.paired else seg


def select_cases(spec: str) -> list[Case]:
    """Cases by number (1-4), 'record' (all record cases), or any text in their names."""
    cases = []
    for item in spec.split(","):
        if item.isdigit():
            found = [CASES[int(item) - 1]]
        elif item == "record":
            found = [c for c in CASES if c.name.startswith("r")]
        else:
            found = [c for c in CASES if item in c.name]
        if not found:
            raise SystemExit(f"no case matches {item!r}; cases: {[c.name for c in CASES]}")
        cases += [c for c in found if c not in cases]
    return cases


def visible_pairs(t: int, window: int | None, seg: np.ndarray | None) -> int:
    """Visible (query, key) pairs of one row and head."""
    pos = np.arange(t, dtype=np.int64)
    lo = np.zeros(t, np.int64) if window is None else np.maximum(pos - window, 0)
    if seg is not None:
        doc_start = np.maximum.accumulate(np.where(np.r_[True, seg[1:] != seg[:-1]], pos, 0))
        lo = np.maximum(lo, doc_start)
    return int((pos - lo + 1).sum())


def xla_attention(q, k, v, *, segment_ids, window, scale):
    """Plain jnp masked softmax: bf16 products with f32 logits and softmax."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    pos = jnp.arange(q.shape[1])
    mask = pos[None, :] <= pos[:, None]
    if window is not None:
        mask &= pos[:, None] - pos[None, :] <= window
    mask = mask[None, None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    p = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v, preferred_element_type=jnp.float32).astype(v.dtype)


def cudnn_attention(q, k, v, *, segment_ids, window, scale):
    assert segment_ids is None, "cuDNN has no document mask here"
    # is_causal=True always goes with a window: jax issue #39576.
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=scale,
        is_causal=True,
        implementation="cudnn",
        local_window_size=None if window is None else (window, 0),
    )


def time_fn(fn, args, samples: int, inner: int) -> float:
    """Median milliseconds per call."""
    jax.block_until_ready(fn(*args))
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        out = None
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner * 1e3)
    return statistics.median(times)


def measure(attn, q, k, v, do, samples, inner) -> tuple[float, float]:
    fwd = jax.jit(attn)
    fwd_bwd = jax.jit(lambda q, k, v, do: jax.vjp(attn, q, k, v)[1](do))
    return time_fn(fwd, (q, k, v), samples, inner), time_fn(fwd_bwd, (q, k, v, do), samples, inner)


def inputs(case: Case, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 4)
    shape = (case.b, case.t, case.h, case.d)
    return [jax.random.normal(kk, shape, jnp.bfloat16) for kk in keys]


def run_case(case: Case, seg_np, impls, samples, inner, block_sizes) -> list[dict]:
    q, k, v, do = inputs(case)
    seg = None if seg_np is None else jnp.asarray(np.broadcast_to(seg_np, (case.b, case.t)))
    rows = []
    variants = []
    for impl in impls:
        if impl == "pallas":
            fn = functools.partial(flash_attention, block_sizes=block_sizes)
            variants.append(("pallas", fn, seg))
            if seg is not None:
                variants.append(("pallas (window only)", fn, None))
        elif impl == "pallas-mosaic":  # every Mosaic GPU kernel, the opt-in ones too
            tiles = dataclasses.replace(block_sizes, mosaic_documents=True, mosaic_backward=True)
            variants.append(("pallas, mosaic", functools.partial(flash_attention, block_sizes=tiles), seg))
        elif impl == "pallas-triton":  # the portable Triton kernels where the Mosaic ones would run
            tiles = dataclasses.replace(block_sizes, mosaic_forward=False, mosaic_backward=False)
            variants.append(("pallas, triton", functools.partial(flash_attention, block_sizes=tiles), seg))
        elif impl == "cudnn":
            variants.append(("cudnn" + (" (window only)" if seg is not None else ""), cudnn_attention, None))
        elif impl == "xla" and case.t <= 8192:  # [B, H, T, T] f32 logits: 58 GB at T = 49,152
            variants.append(("xla", xla_attention, seg))
    results = {}
    for label, fn, s in variants:
        attn = functools.partial(fn, segment_ids=s, window=case.window, scale=SCALE)
        pairs = case.b * case.h * visible_pairs(case.t, case.window, None if s is None else seg_np)
        try:
            f_ms, fb_ms = measure(attn, q, k, v, do, samples, inner)
        except Exception as e:  # noqa: BLE001  (report and go on to the next variant)
            print(f"{case.name} {label}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
            continue
        row = {
            "case": case.name,
            "impl": label,
            "fwd_ms": f_ms,
            "fwd_bwd_ms": fb_ms,
            "fwd_tflops": 4 * case.d * pairs / f_ms / 1e9,
            "fwd_bwd_tflops": 14 * case.d * pairs / fb_ms / 1e9,
        }
        print(
            f"{case.name:26s} {label:22s} fwd {f_ms:7.3f} ms {row['fwd_tflops']:6.1f} TF/s | "
            f"fwd+bwd {fb_ms:7.3f} ms {row['fwd_bwd_tflops']:6.1f} TF/s",
            flush=True,
        )
        rows.append(row)
        results[label] = jax.jit(functools.partial(out_and_grads, attn))(q, k, v, do)
    compare(case, results)
    return rows


def out_and_grads(attn, q, k, v, do):
    o, vjp = jax.vjp(attn, q, k, v)
    return (o, *vjp(do))


def compare(case: Case, results: dict) -> None:
    """||pallas - other|| / ||other|| for the output and dq, dk, dv, between like-masked variants."""
    for ours, theirs in (
        ("pallas", "cudnn"),
        ("pallas (window only)", "cudnn (window only)"),
        ("pallas", "xla"),
        ("pallas", "pallas, triton"),
        ("pallas, mosaic", "pallas, triton"),
    ):
        if ours in results and theirs in results:
            errs = [
                float(jnp.linalg.norm((a.astype(jnp.float32) - b.astype(jnp.float32)).ravel()))
                / float(jnp.linalg.norm(b.astype(jnp.float32).ravel()))
                for a, b in zip(results[ours], results[theirs], strict=True)
            ]
            names = ("out", "dq", "dk", "dv")
            print(
                f"check {case.name:26s} {ours} vs {theirs}: "
                + " ".join(f"{n} {e:.1e}" for n, e in zip(names, errs, strict=True)),
                flush=True,
            )


@functools.lru_cache(maxsize=2)
def _residuals(case: Case, seg_bytes: bytes | None):
    """Inputs, segment ids, the forward residuals (default tiles), delta and the mask bounds of one case."""
    q, k, v, do = inputs(case)
    seg = (
        None if seg_bytes is None else jnp.asarray(np.frombuffer(seg_bytes, np.int32).reshape(case.b, case.t))
    )
    fixed = {"window": case.window, "scale": SCALE, "bs": BlockSizes.get_default(), "interpret": False}
    o, lse = jax.jit(lambda q, k, v, s: kernels._forward(q, k, v, s, **fixed))(q, k, v, seg)
    delta = jnp.einsum("bthk,bthk->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    bounds = attention_mgpu.visible_bounds(seg, case.b, case.t, case.window)
    return q, k, v, do, seg, o, lse, delta, bounds


def kernel_parts(case: Case, seg_np, block_sizes: BlockSizes, names=("fwd", "dq", "dkdv")) -> dict:
    """The Pallas kernels one by one: name -> (jitted fn, args, flops per visible pair per K).

    `*_mgpu` are the Mosaic GPU kernels, the others the Triton ones.
    """
    seg_bytes = (
        None if seg_np is None else np.broadcast_to(seg_np, (case.b, case.t)).astype(np.int32).tobytes()
    )
    q, k, v, do, seg, o, lse, delta, (first_key, last_query) = _residuals(case, seg_bytes)
    every_mosaic = dataclasses.replace(block_sizes, mosaic_documents=True, mosaic_backward=True)
    fixed = {"window": case.window, "scale": SCALE, "bs": every_mosaic, "interpret": False}
    triton = {**fixed, "bs": dataclasses.replace(block_sizes, mosaic_forward=False, mosaic_backward=False)}
    bs, mosaic = block_sizes, {"scale": SCALE, "stages": block_sizes.stages_bwd_mgpu, "interpret": None}
    dq_tiles = {"block_q": bs.block_q_dq_mgpu, "block_k": bs.block_k_dq_mgpu}
    dkdv_tiles = {"block_q": bs.block_q_dkv_mgpu, "block_k": bs.block_k_dkv_mgpu}
    parts = {
        "fwd_mgpu": (lambda: jax.jit(lambda *a: kernels._forward(*a, **fixed)), (q, k, v, seg), 4),
        "fwd": (lambda: jax.jit(lambda *a: kernels._forward(*a, **triton)), (q, k, v, seg), 4),
        "dq_mgpu": (
            lambda: jax.jit(lambda *a: attention_mgpu_bwd._dq(*a, **dq_tiles, **mosaic)),
            (q, k, v, do, lse, delta, first_key),
            6,
        ),
        "dkdv_mgpu": (
            lambda: jax.jit(lambda *a: attention_mgpu_bwd._dkdv(*a, **dkdv_tiles, **mosaic)),
            (q, k, v, do, lse, delta, last_query),
            8,
        ),
        "dq": (lambda: jax.jit(lambda *a: kernels._dq_call(*a, **triton)), (q, k, v, o, do, lse, seg), 6),
        "dkdv": (
            lambda: jax.jit(lambda *a: kernels._dkdv_call(*a, **triton)),
            (q, k, v, do, lse, delta, seg),
            8,
        ),
    }
    return {n: (parts[n][0](), *parts[n][1:]) for n in names}


def breakdown(case: Case, seg_np, block_sizes: BlockSizes, samples: int, inner: int) -> list[dict]:
    """Times the Pallas kernels one by one: forward, dq and dk/dv, Mosaic GPU and Triton."""
    pairs = case.b * case.h * visible_pairs(case.t, case.window, seg_np)
    rows = []
    for name, (fn, args, flops) in kernel_parts(case, seg_np, block_sizes, BREAKDOWN_PARTS).items():
        ms = time_fn(fn, args, samples, inner)
        tflops = flops * case.d * pairs / ms / 1e9
        print(f"breakdown {case.name:26s} {name:9s} {ms:7.3f} ms {tflops:6.1f} TF/s", flush=True)
        rows.append({"case": case.name, "part": name, "ms": ms, "tflops": tflops})
    return rows


BREAKDOWN_PARTS = ("fwd_mgpu", "dq_mgpu", "dkdv_mgpu", "fwd", "dq", "dkdv")


def sweep(parts, cases, segs, samples: int, inner: int) -> tuple[BlockSizes, list[dict]]:
    """For each kernel, the candidate with the least time summed over `cases` (their segment ids
    `segs`, None where a case has no documents)."""
    best, results = BlockSizes.get_default(), []
    for part in parts:
        scored, cands = [], SWEEP[part]
        for cand in cands:
            bs = dataclasses.replace(best, **cand)
            try:
                ms = [
                    time_fn(*kernel_parts(case, seg, bs, (part,))[part][:2], samples, inner)
                    for case, seg in zip(cases, segs, strict=True)
                ]
            except Exception as e:  # noqa: BLE001  (report and go on to the next candidate)
                print(f"sweep {part} {cand}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            print(f"sweep {part} {cand}: " + ", ".join(f"{m:.3f}" for m in ms) + " ms", flush=True)
            results.append({"part": part, "cand": cand, "ms": ms})
            scored.append((sum(ms), cand))
        if scored:
            best = dataclasses.replace(best, **min(scored, key=lambda s: s[0])[1])
    print(f"sweep: best {best}", flush=True)
    return best, results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path(".data/val_000000.bin.xz"))
    parser.add_argument(
        "--cases",
        default="1,2,3,4,record",
        help="comma list: case numbers 1-4, 'record' for all record cases, or text in case names",
    )
    parser.add_argument("--impls", default="pallas,cudnn,xla")
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--sweep", action="store_true", help="pick tiles on --sweep-cases first")
    parser.add_argument("--sweep-cases", default="1,3", help="the cases --sweep times, as --cases takes them")
    parser.add_argument("--sweep-parts", default="fwd,dkdv,dq", help="kernels to sweep")
    parser.add_argument("--breakdown", action="store_true", help="time the Pallas kernels one by one")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    print(jax.devices(), jax.__version__, flush=True)

    cases = select_cases(args.cases)
    block_sizes, sweep_rows = BlockSizes.get_default(), []
    if args.sweep:
        on = select_cases(args.sweep_cases)
        segs = [case_segment_ids(args.data, c) if c.docs else None for c in on]
        block_sizes, sweep_rows = sweep(args.sweep_parts.split(","), on, segs, args.samples // 2, args.inner)
    rows, parts = [], []
    for case in cases:
        seg_np = case_segment_ids(args.data, case) if case.docs else None
        if seg_np is not None:
            print(
                f"{case.name}: {seg_np[-1] + 1} documents, visible pairs {visible_pairs(case.t, case.window, seg_np)}"
                f" vs window-only {visible_pairs(case.t, case.window, None)}",
                flush=True,
            )
        if args.breakdown:
            parts += breakdown(case, seg_np, block_sizes, args.samples, args.inner)
        rows += run_case(case, seg_np, args.impls.split(","), args.samples, args.inner, block_sizes)

    print(f"\n{'case':26s} {'impl':22s} {'fwd ms':>8s} {'TF/s':>6s} {'f+b ms':>8s} {'TF/s':>6s}")
    for r in rows:
        print(
            f"{r['case']:26s} {r['impl']:22s} {r['fwd_ms']:8.3f} {r['fwd_tflops']:6.1f} "
            f"{r['fwd_bwd_ms']:8.3f} {r['fwd_bwd_tflops']:6.1f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "block_sizes": dataclasses.asdict(block_sizes),
                    "rows": rows,
                    "sweep": sweep_rows,
                    "breakdown": parts,
                    "device": str(jax.devices()[0]),
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
