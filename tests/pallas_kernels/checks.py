"""What the kernel tests share: a fresh seed per test, and errors measured on the device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def fresh_seed() -> int:
    """A new seed each run (printed in every failure message, so a failure can be rerun)."""
    return int(np.random.SeedSequence().entropy % 2**31)


@jax.jit
def errors(actual: jax.Array, expected: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(max, mean) |actual - expected| over max |expected|, in one jitted reduction on the device:
    at `simple`'s [65536, 50304] logits, host copies or eager float32 temporaries of both arrays
    do not fit an 80 GB card. A NaN or infinity in either (memory a kernel never wrote, say) makes
    both infinite: a max over XLA's CPU reduction can pass over a NaN."""
    diff = jnp.abs(actual.astype(jnp.float32) - expected.astype(jnp.float32))
    scale = jnp.maximum(jnp.max(jnp.abs(expected.astype(jnp.float32))), 1e-30)
    bad = ~jnp.all(jnp.isfinite(diff))
    return (jnp.where(bad, jnp.inf, jnp.max(diff) / scale), jnp.where(bad, jnp.inf, jnp.mean(diff) / scale))
