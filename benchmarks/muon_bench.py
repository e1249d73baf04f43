"""Times one jitted Muon update of the `simple` recipe's hidden matrices.

The matrices are 12 layers × (4 × [768, 768] attention, [768, 3072] and
[3072, 768] MLP), stacked as `[12, ...]` per kind, as the model stores them.
Each row is the median wall time of one update plus `apply_updates`, after
warm-up, with `block_until_ready` on every call. For scale, a bf16 matmul
sets the rate at which a plain-JAX fwd+bwd of the 124M model at 64K tokens
(6 · 124M · 65,536 FLOPs, matmuls only) would run.

    python -m benchmarks.muon_bench            # GPU sizes, from the repo root
    python -m benchmarks.muon_bench --small    # CPU-sized smoke run

`--ns-impls` instead times Polar Express (5 iterations, bf16, as record #77's
NorMuon runs it) with `impl="xla"` and `impl="pallas"` (the symmetric kernels
of `pallas_kernels/symmetric_mm.py`) on record #77's banks: attention
4 × [10, 768, 768], MLP [11, 768, 3072] and [11, 3072, 768], whole on one
device and as one device's share under 8-way ZeRO-1 (2 layers of each bank).
Each implementation runs in its own process, so the device's peak memory is
its own. `--ns-kernels` times each symmetric kernel against the XLA matmul it
replaces, at several tilings.

    python -m benchmarks.muon_bench --ns-impls
    python -m benchmarks.muon_bench --ns-kernels
"""

import argparse
import math
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import optax

from jaxrun import muon as jm

MODEL_PARAMS = 124e6
TOKENS = 65_536


def hidden_params(key: jax.Array, layers: int, dim: int) -> dict:
    shapes = {
        "attn": {name: (layers, dim, dim) for name in ("w_q", "w_k", "w_v", "w_o")},
        "mlp": {"w_fc": (layers, dim, 4 * dim), "w_proj": (layers, 4 * dim, dim)},
    }
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    keys = jax.random.split(key, len(leaves))
    arrays = [0.02 * jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(treedef, arrays)


def ns_flops(params: dict, iterations: int) -> float:
    """Matmul FLOPs of Newton–Schulz: 4 m² n + 2 m³ per iteration, m ≤ n."""
    total = 0.0
    for p in jax.tree.leaves(params):
        *lead, a, b = p.shape
        m, n = min(a, b), max(a, b)
        total += iterations * (4 * m * m * n + 2 * m**3) * math.prod(lead)
    return total


def time_calls(call, warmup: int, iters: int) -> tuple[float, float]:
    """(median ms, min ms) of `call()`, which must block until its work is done."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), 1e3 * min(times)


def time_optimizer(opt: optax.GradientTransformation, params: dict, grads: dict, warmup: int, iters: int):
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    # The train step donates params and optimizer state; CPU cannot.
    donate = () if jax.devices()[0].platform == "cpu" else (0, 1)
    carry = [jax.tree.map(jnp.copy, params), opt.init(params)]
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=donate).lower(*carry, grads).compile()
    compile_s = time.perf_counter() - t0

    def call():
        carry[:] = jax.block_until_ready(compiled(*carry, grads))

    med, best = time_calls(call, warmup, iters)
    return med, best, compile_s


def matmul_tflops(n: int, warmup: int, iters: int) -> tuple[float, float]:
    k1, k2 = jax.random.split(jax.random.key(1))
    a = jax.random.normal(k1, (n, n), jnp.bfloat16)
    b = jax.random.normal(k2, (n, n), jnp.bfloat16)
    mm = jax.jit(jnp.matmul)
    med, _ = time_calls(lambda: jax.block_until_ready(mm(a, b)), warmup, iters)
    return med, 2 * n**3 / (med * 1e-3) / 1e12


# ----------------------------------------------------------------------------
# Polar Express: XLA matmuls against the symmetric Pallas kernels


def record77_banks(key: jax.Array, attn_layers: int, mlp_layers: int, dim: int) -> dict:
    """Record #77's Muon banks, fp32 like the momentum Newton–Schulz reads."""
    shapes = {name: (attn_layers, dim, dim) for name in ("w_q", "w_k", "w_v", "w_o")}
    shapes |= {"w_up": (mlp_layers, dim, 4 * dim), "w_down": (mlp_layers, 4 * dim, dim)}
    keys = jax.random.split(key, len(shapes))
    return {
        name: jax.random.normal(k, s, jnp.float32) for k, (name, s) in zip(keys, shapes.items(), strict=True)
    }


def polar_express(impl: str):
    """Record #77's orthogonalization of every bank: bf16, rounded before the norm, eps 1e-6."""
    coeffs = jm.NS_PRESETS["polar_express"]
    ns = lambda x: jm.newton_schulz(x, coeffs, 1e-6, dtype=jnp.bfloat16, round_first=True, impl=impl)
    return jax.jit(lambda banks: jax.tree.map(ns, banks))


@jax.jit
def polar_express_f32(banks):
    """The same iteration in fp32 at full precision: what both bf16 paths approximate."""
    coeffs = jm.NS_PRESETS["polar_express"]
    return jax.tree.map(
        lambda x: jm.newton_schulz(x, coeffs, 1e-6, dtype=jnp.float32, round_first=True), banks
    )


def _mib(nbytes) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.1f}"


def ns_impl_rows(impl: str, small: bool, warmup: int, iters: int) -> None:
    """Prints one row per case for `impl` (run in a process of its own, for its peak memory)."""
    layers, dim = (3, 128) if small else (11, 768)
    # One device's share under ZeRO-1 on 8: each layer axis (10 and 11) padded to 16, 2 layers each.
    cases = [("8-way ZeRO share", 2, 2), ("whole banks", layers - 1, layers)]
    dev = jax.devices()[0]
    for label, attn_layers, mlp_layers in cases:
        banks = record77_banks(jax.random.key(0), attn_layers, mlp_layers, dim)
        t0 = time.perf_counter()
        compiled = polar_express(impl).lower(banks).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
        med, best = time_calls(lambda c=compiled, b=banks: jax.block_until_ready(c(b)), warmup, iters)
        stats = dev.memory_stats() or {}
        flops = ns_flops(banks, len(jm.NS_PRESETS["polar_express"].coeffs))
        tflops = flops / (med * 1e-3) / 1e12
        print(
            f"{label:18s} {impl:7s} {med:10.3f} {best:8.3f} {tflops:10.1f} {compile_s:9.1f} "
            f"{_mib(temp):>9s} {_mib(stats.get('peak_bytes_in_use')):>9s}",
            flush=True,
        )
        if impl == "pallas":  # after the peak is read: XLA's bf16 result and the fp32 one, to compare
            got, want, exact = compiled(banks), polar_express("xla")(banks), polar_express_f32(banks)
            for name in banks:
                g, w, e = (tree[name].astype(jnp.float32) for tree in (got, want, exact))
                scale = float(jnp.max(jnp.abs(e)))
                print(
                    f"    {name:7s} {tuple(banks[name].shape)}: max|pallas - xla| = {_gap(g, w, scale):.2e}, "
                    f"entries that differ {float(jnp.mean(g != w)):.1%}; from fp32: pallas "
                    f"{_gap(g, e, scale):.2e}, xla {_gap(w, e, scale):.2e} (of max|fp32|)"
                )


def _gap(a: jax.Array, b: jax.Array, scale: float) -> float:
    return float(jnp.max(jnp.abs(a - b))) / scale


def ns_impls(args) -> None:
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}")
    print("Polar Express x5 in bf16 on record #77's banks (attention 4 x [L-1,D,D], MLP [L,D,4D], [L,4D,D])")
    print("TFLOP/s counts full-matmul FLOPs (4m²n + 2m³ per step) for both; peak: this process's device peak")
    print(
        f"{'case':18s} {'impl':7s} {'median ms':>10s} {'min ms':>8s} {'TFLOP/s':>10s} {'compile s':>9s} "
        f"{'temp MiB':>9s} {'peak MiB':>9s}",
        flush=True,
    )
    for impl in ("xla", "pallas"):
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.muon_bench",
            "--ns-impl-child",
            impl,
            "--iters",
            str(args.iters),
        ]
        subprocess.run(cmd + (["--small"] if args.small else []), check=True)


def ns_kernels(args) -> None:
    """Each symmetric kernel against the XLA matmul it replaces, at several tilings."""
    from pallas_kernels import symmetric_mm as smm

    interpret = jax.default_backend() != "gpu"
    layers, dim = (3, 128) if args.small else (11, 768)
    bf16, f32 = jnp.bfloat16, jnp.float32
    b, c = jm.NS_PRESETS["polar_express"].coeffs[1][1:]
    key = jax.random.key(0)
    wide = jax.random.normal(key, (layers, dim, 4 * dim), f32).astype(bf16) / (2 * dim)
    square = jax.random.normal(key, (layers - 1, dim, dim), f32).astype(bf16) / dim
    gram = smm.xxt_reference(square)
    mm = lambda u, v: jnp.matmul(u, v, preferred_element_type=f32)
    t = lambda x: jnp.swapaxes(x, -1, -2)
    cases = [
        ("xxt", wide, lambda x: mm(x, t(x)).astype(bf16), smm.xxt),
        ("xtx", t(wide), lambda x: mm(t(x), x).astype(bf16), smm.xtx),
        ("xxt", square, lambda x: mm(x, t(x)).astype(bf16), smm.xxt),
        ("ba_plus_caa", gram, lambda a: (b * a.astype(f32) + c * mm(a, a)).astype(bf16), None),
    ]
    tilings = [tuple(int(v) for v in spec.split("x")) for spec in args.tilings.split(",")]
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}; bf16 in and out, fp32 sums")
    print(f"{'kernel':12s} {'shape':18s} {'tiling m/k/warps/stages':24s} {'median ms':>10s} {'min ms':>8s}")
    for name, x, xla_fn, kernel in cases:
        shape = str(tuple(x.shape))
        xla_jit = jax.jit(xla_fn)
        med, best = time_calls(lambda f=xla_jit, x=x: jax.block_until_ready(f(x)), args.warmup, args.iters)
        print(f"{name:12s} {shape:18s} {'xla':24s} {med:10.3f} {best:8.3f}")
        for bm, bk, warps, stages in tilings:
            bs = smm.BlockSizes(block_m=bm, block_k=bk, num_warps=warps, num_stages=stages)
            if kernel is None:
                fn = jax.jit(lambda a, bs=bs: smm.ba_plus_caa(a, b, c, block_sizes=bs, interpret=interpret))
            else:
                fn = jax.jit(lambda x, bs=bs, k=kernel: k(x, block_sizes=bs, interpret=interpret))
            try:
                med, best = time_calls(lambda f=fn, x=x: jax.block_until_ready(f(x)), args.warmup, args.iters)
            except (jax.errors.JaxRuntimeError, ValueError) as e:  # a tiling Triton cannot compile
                print(
                    f"{name:12s} {shape:18s} {f'{bm}/{bk}/{warps}/{stages}':24s} failed: {type(e).__name__}"
                )
                continue
            print(f"{name:12s} {shape:18s} {f'{bm}/{bk}/{warps}/{stages}':24s} {med:10.3f} {best:8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="2 layers at width 128, for CPU")
    parser.add_argument("--iters", type=int, default=None, help="timed runs per row")
    parser.add_argument(
        "--ns-impls", action="store_true", help="Polar Express: xla vs pallas, record #77 banks"
    )
    parser.add_argument("--ns-kernels", action="store_true", help="each symmetric kernel vs XLA, per tiling")
    parser.add_argument(
        "--tilings",
        default="128x64x8x4,128x128x8x3,64x64x4x4,64x128x4x3,256x64x8x3",
        help="--ns-kernels tilings: block_m x block_k x num_warps x num_stages, comma-separated",
    )
    parser.add_argument("--ns-impl-child", choices=("xla", "pallas"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    layers, dim, mm_n = (2, 128, 1024) if args.small else (12, 768, 8192)
    iters = args.iters = args.iters or (5 if args.small else 50)
    warmup = args.warmup = 2 if args.small else 10
    if args.ns_impl_child:
        return ns_impl_rows(args.ns_impl_child, args.small, warmup, iters)
    if args.ns_impls:
        return ns_impls(args)
    if args.ns_kernels:
        return ns_kernels(args)

    params = hidden_params(jax.random.key(0), layers, dim)
    grads = jax.tree.map(lambda p: 1e-3 * jnp.cos(p * 997.0), params)
    n_params = sum(p.size for p in jax.tree.leaves(params))
    rows = [
        ("simple: NS (2,-1.5,0.5)x12, shape, wd", "simple", {}),
        ("Polar Express x5, shape, wd", "polar_express", {}),
        (
            "Polar Express x5, NorMuon, cautious wd",
            "polar_express",
            {"scaling": "normuon", "normuon_b2": 0.95, "weight_decay_mode": "cautious"},
        ),
    ]

    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}")
    print(f"hidden matrices: {layers} x (4 x [{dim},{dim}] + [{dim},{4 * dim}] + [{4 * dim},{dim}])")
    print(f"  = {n_params / 1e6:.1f}M params, stacked [{layers}, ...] per kind\n")
    print(
        f"{'Muon update (+ apply_updates)':42s} {'median ms':>10s} {'min ms':>8s} {'NS TFLOP/s':>11s} {'compile s':>10s}"
    )
    results = {}
    for label, ns, kw in rows:
        opt = jm.muon(0.025, weight_decay=0.05, momentum=0.95, ns=ns, **kw)
        med, best, compile_s = time_optimizer(opt, params, grads, warmup, iters)
        flops = ns_flops(params, len(jm.NS_PRESETS[ns].coeffs))
        results[label] = med
        print(f"{label:42s} {med:10.3f} {best:8.3f} {flops / (med * 1e-3) / 1e12:11.1f} {compile_s:10.1f}")

    mm_ms, rate = matmul_tflops(mm_n, warmup, iters)
    fwd_bwd = 6 * MODEL_PARAMS * TOKENS
    est_ms = fwd_bwd / (rate * 1e12) * 1e3
    pe_ms = results[rows[1][0]]
    print(f"\nbf16 matmul {mm_n}^3: {mm_ms:.3f} ms = {rate:.1f} TFLOP/s")
    print(
        f"fwd+bwd estimate, matmuls only: 6 x 124M x {TOKENS} = {fwd_bwd / 1e12:.1f} TFLOP -> {est_ms:.1f} ms"
    )
    print(f"Polar Express Muon update / fwd+bwd estimate: {pe_ms / est_ms:.1%}")
    if args.small:
        print("(--small: reduced matrices; the fwd+bwd estimate still uses the full 124M model)")


if __name__ == "__main__":
    main()
