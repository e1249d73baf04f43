"""Record #77's Adam on several devices: its gradients wait on each device between its updates.

Record #77's Adam updates every `optim.adam_every` steps (every other step) on the gradients
summed since its last update. On several devices the record neither reduces nor gathers
Adam's params on the steps in between: each rank adds its gradients locally, and Adam's
step reduce-scatters the sum. jaxrun's step does the same where `holds_adam_grads`: each
device keeps its unreduced sum of each Adam leaf's gradient in `TrainState.held` (flat, one
part per device), and the step comes in two compiled variants, `adam_step=True` (reduce the
sums, update, gather) and `adam_step=False` (add to the sums; no collective on an Adam leaf).
On one device there is nothing to skip: the optimizer's `apply_every_summed` holds the sum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrun import model, record_optim, sharding
from jaxrun.config import Config


def holds_adam_grads(cfg: Config, num_devices: int) -> bool:
    """Whether Adam's leaves skip their collectives between its updates (see the module doc)."""
    o = cfg.optim  # a per-step "mean" would divide two steps' sum by one step's token count
    return o.kind == "normuon_adam" and o.adam_every > 1 and o.loss_reduction != "mean" and num_devices > 1


def adam_step_of(cfg: Config, num_devices: int, step: int) -> bool | None:
    """The `adam_step` variant that runs `step`: whether Adam updates on it; None with one variant."""
    if not holds_adam_grads(cfg, num_devices):
        return None
    return step % cfg.optim.adam_every == cfg.optim.adam_every - 1  # as `apply_every_summed` counts


def _adam_paths(params: model.Params) -> list[str]:
    kinds = record_optim.param_kinds(model.OPTIM_ROWS, params)
    return [
        record_optim.path_of(p) for p, kind in jax.tree_util.tree_leaves_with_path(kinds) if kind == "adam"
    ]


def held_state(cfg: Config, params: model.Params, num_devices: int) -> dict:
    """`TrainState.held` at step 0: zeros, one flat copy of each Adam leaf per device (else empty)."""
    if not holds_adam_grads(cfg, num_devices):
        return {}
    leaves = {record_optim.path_of(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
    return {k: jnp.zeros(num_devices * leaves[k].size, leaves[k].dtype) for k in _adam_paths(params)}


def waiting_leaves(
    grads: model.Params, held: dict, adam_step: bool | None, tied: bool = False
) -> model.Params:
    """True for each leaf that moves nothing between devices this step and keeps its param: Adam's,
    between its updates, and the token embedding while it is tied to the head (its gradient is
    zero, the tie overwrites it after the update, and the untie gives it the head's moments)."""
    waiting = set(held) if adam_step is False else set()
    waiting |= {record_optim.EMBEDDING} if tied else set()
    return jax.tree_util.tree_map_with_path(lambda p, _: record_optim.path_of(p) in waiting, grads)


def hold_grads(grads: model.Params, held: dict, adam_step: bool | None):
    """(gradients to reduce, the new `held`): Adam's leaves add this step's local gradient to their
    sum; on Adam's step the sum goes on to be reduced and `held` starts again from zero."""
    if not held:
        return grads, held

    def add(path, g):
        name = record_optim.path_of(path)
        return g + held[name].reshape(g.shape) if name in held else g

    grads = jax.tree_util.tree_map_with_path(add, grads)
    leaves = {record_optim.path_of(p): g for p, g in jax.tree_util.tree_leaves_with_path(grads)}
    if adam_step:
        return grads, {k: jnp.zeros_like(v) for k, v in held.items()}
    return grads, {k: leaves[k].reshape(-1) for k in held}


def owned_zeros(g: jax.Array, layout: sharding.Layout, axis: str) -> jax.Array:
    """Zeros shaped like this device's part of a reduced gradient, with no collective."""
    return jnp.zeros_like(sharding.owned_part(g, layout, axis))
