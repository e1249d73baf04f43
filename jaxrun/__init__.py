"""jaxrun: the NanoGPT speedrun in JAX/XLA.

Importing the package loads nothing heavy and touches no device or
`jax.config`. For notebooks: `cfg, params = jaxrun.load_checkpoint(run_dir)`,
then `jaxrun.generate(params, cfg, prompt)`; both import JAX on first use.
"""

from typing import Any

__all__ = ["generate", "load_checkpoint"]


def __getattr__(name: str) -> Any:
    if name == "load_checkpoint":
        from jaxrun.checkpoint import load_checkpoint

        return load_checkpoint
    if name == "generate":
        from jaxrun.sample import generate

        return generate
    raise AttributeError(f"module 'jaxrun' has no attribute {name!r}")
