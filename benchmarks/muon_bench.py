"""Times one jitted Muon update of the `simple` recipe's hidden matrices.

The matrices are 12 layers × (4 × [768, 768] attention, [768, 3072] and
[3072, 768] MLP), stacked as `[12, ...]` per kind, as the model stores them.
Each row is the median wall time of one update plus `apply_updates`, after
warm-up, with `block_until_ready` on every call. For scale, a bf16 matmul
sets the rate at which a plain-JAX fwd+bwd of the 124M model at 64K tokens
(6 · 124M · 65,536 FLOPs, matmuls only) would run.

    python -m benchmarks.muon_bench            # GPU sizes, from the repo root
    python -m benchmarks.muon_bench --small    # CPU-sized smoke run
"""

import argparse
import math
import statistics
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="2 layers at width 128, for CPU")
    parser.add_argument("--iters", type=int, default=None, help="timed runs per row")
    args = parser.parse_args()
    layers, dim, mm_n = (2, 128, 1024) if args.small else (12, 768, 8192)
    iters = args.iters or (5 if args.small else 50)
    warmup = 2 if args.small else 10

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
