"""Which arrays of a given shape a compiled XLA program writes to memory.

An instruction inside a fusion lives in registers; one at the top level of a
computation that is not a fusion body (the entry, a while body, a called
computation) writes its result to device memory. Counting those results by
dtype for the `[N, V]` logits shape says how many passes over the logits a
head and loss make, without a GPU: run it on `jax.jit(f).lower(...).compile()`
on the device you care about (the CPU backend normalizes bf16 arithmetic to
float32, so its counts overstate the float32 buffers a GPU would write).

Usage: python benchmarks/hlo_buffers.py [--n 512]  (both loss paths of the `simple` head)
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys

_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) ")
_RESULT = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (\w+)\[([\d,]*)\]\{?[\d,]*\}? ([\w\-]+)\(")
_NESTED = re.compile(r"(?:calls|to_apply|called_computations)=\{?%?([\w.\-]+)")
_FREE = {"bitcast", "parameter", "get-tuple-element", "tuple", "constant", "copy-start", "copy-done"}


def materialized(hlo: str, shape: tuple[int, ...]) -> collections.Counter:
    """dtype -> count of top-level results of `shape` (leading 1s ignored) outside fusion bodies."""
    nested = {
        m.group(1) for m in _NESTED.finditer(hlo) if "fusion" in hlo[max(0, m.start() - 400) : m.start()]
    }
    counts: collections.Counter = collections.Counter()
    current = None
    for line in hlo.splitlines():
        if current is None:
            head = _HEADER.match(line)
            if head and line.rstrip().endswith("{") and not line.startswith("HloModule"):
                current = head.group(1)
            continue
        if line.startswith("}"):
            current = None
            continue
        m = _RESULT.match(line)
        if m is None or current in nested or m.group(3) in _FREE:
            continue
        dims = tuple(int(d) for d in m.group(2).split(",") if d)
        while dims and dims[0] == 1 and len(dims) > len(shape):
            dims = dims[1:]
        if dims == shape:
            counts[m.group(1)] += 1
    return counts


def _main() -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import dataclasses

    import jax
    import jax.numpy as jnp

    from configs.simple import get_config
    from jaxrun.config import KernelConfig
    from jaxrun.model import head

    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=512, help="tokens (a micro-batch of `simple` has 65,536)")
    a = p.parse_args()
    cfg = get_config().model
    D, V = cfg.model_dim, cfg.vocab_size
    k = jax.random.split(jax.random.key(0), 3)
    params = {"lm_head": {"w": 0.02 * jax.random.normal(k[0], (D, V)), "b": jnp.zeros((V,))}}
    h = jax.random.normal(k[1], (1, a.n, D), jnp.bfloat16)
    t = jax.random.randint(k[2], (1, a.n), 0, V)
    print(f"device: {jax.devices()[0].device_kind}; [N, V] = [{a.n}, {V}]")
    for loss in ("xla", "xla_fused"):
        mcfg = dataclasses.replace(cfg, kernels=KernelConfig(loss=loss))
        f = jax.jit(jax.value_and_grad(lambda p, h: head.token_losses(p, h, t, mcfg).sum(), argnums=(0, 1)))
        compiled = f.lower(params, h).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        counts = dict(materialized(compiled.as_text(), (a.n, V)))
        print(f"loss={loss:10s} [N, V] buffers written: {counts}  temp {temp / 2**20:.0f} MiB")


if __name__ == "__main__":
    _main()
