"""jaxrun: the NanoGPT speedrun in JAX/XLA.

Importing the package loads nothing heavy and touches no device or
`jax.config`; `jaxrun.load_checkpoint(path) -> (cfg, params)` imports orbax
on first use.
"""

from typing import Any

__all__ = ["load_checkpoint"]


def __getattr__(name: str) -> Any:
    if name == "load_checkpoint":
        from jaxrun.checkpoint import load_checkpoint

        return load_checkpoint
    raise AttributeError(f"module 'jaxrun' has no attribute {name!r}")
