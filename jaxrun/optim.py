"""Who optimizes what: the param table, the lr schedule and `make_optimizer`.

One table maps param paths to a group. `param_labels` derives every leaf's
group from its path (never from its rank: that would send `embed` and
`lm_head` to Muon) and `make_optimizer` builds one optax transform per group,
joined with `optax.partition`:

  group   | kind="muon_adam"            | kind="adamw"
  embed   | Adam, optim.embed_lr        | AdamW, optim.embed_lr
  head    | Adam, optim.head_lr         | AdamW, optim.head_lr
  scalar  | Adam, optim.scalar_lr       | AdamW, optim.scalar_lr
  gate    | Adam, optim.scalar_lr       | AdamW, optim.scalar_lr
  hidden  | Muon, optim.muon_lr         | AdamW, optim.hidden_lr

Every learning rate follows the same schedule (warmup, constant, then a
linear or cosine cooldown), a function of the optimizer's own step count so
the whole update stays one compiled program.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxrun import model, muon, record_optim
from jaxrun.config import Config, OptimConfig

GROUPS = ("embed", "head", "scalar", "hidden", "gate")

# (path pattern, group), joined from the rows each model component declares for its params.
PARAM_TABLE: tuple[tuple[str, str], ...] = tuple((row.pattern, row.group) for row in model.OPTIM_ROWS)


def path_str(path: tuple[Any, ...]) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def label_of(path: str) -> str:
    """The group of one param path; ValueError unless exactly one table row matches."""
    groups = [group for pattern, group in PARAM_TABLE if re.fullmatch(pattern, path)]
    if len(groups) != 1:
        raise ValueError(f"param {path!r} matches {len(groups)} rows of PARAM_TABLE (needs exactly 1)")
    return groups[0]


def param_labels(params: Any) -> Any:
    """A pytree like `params` holding each leaf's group name."""
    return jax.tree_util.tree_map_with_path(lambda path, _: label_of(path_str(path)), params)


def lr_factor(cfg: OptimConfig, total_steps: int):
    """The schedule eta(step) in [0, 1] that scales every group's learning rate.

    Linear warmup over `warmup_steps` (llm.c), constant, then a decay to
    `final_lr_frac` that starts at max(warmup_steps, (1 - cooldown_frac)·total):
    linear for the speedrun, cosine for llm.c.
    """
    decay_start = max(cfg.warmup_steps, (1 - cfg.cooldown_frac) * total_steps)

    def eta(step):
        step = jnp.asarray(step, jnp.float32)
        warm = jnp.minimum(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        ratio = jnp.clip((step - decay_start) / max(total_steps - decay_start, 1), 0.0, 1.0)
        if cfg.cooldown_shape == "linear":
            keep = 1.0 - ratio
        else:
            keep = 0.5 * (1.0 + jnp.cos(math.pi * ratio))
        return warm * (cfg.final_lr_frac + (1.0 - cfg.final_lr_frac) * keep)

    return eta


def _muon_momentum(cfg: OptimConfig) -> optax.ScalarOrSchedule:
    if cfg.muon_momentum_warmup_from is None:
        return cfg.muon_momentum
    return optax.linear_schedule(
        cfg.muon_momentum_warmup_from, cfg.muon_momentum, cfg.muon_momentum_warmup_steps
    )


def lr_factor_of(cfg: Config):
    """The schedule s(step) of the run's optimizer: the group schedule, or record #77's stages."""
    o = cfg.optim
    if o.kind == "normuon_adam":
        scheduled = cfg.train.steps - o.extension_steps
        return record_optim.lr_schedule(
            scheduled, stage_lr_muls=o.lr_stage_muls, cooldown_frac=o.cooldown_frac, floor=o.final_lr_frac
        )
    return lr_factor(o, cfg.train.steps)


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    """The optimizer for `cfg`: one transform per group, partitioned by param path.

    `kind="normuon_adam"` is record #77's per-param optimizer instead (`jaxrun.record_optim`),
    with each leaf's settings from the model components' rows.

    It works on whole params or on any slice of them (each transform is
    elementwise, or per matrix for Muon), which the sharded step relies on.
    Gradient clipping is the train step's job: see `clip_by_norm`.
    """
    o = cfg.optim
    if o.kind == "normuon_adam":
        return record_optim.make_record_optimizer(o, model.OPTIM_ROWS, cfg.train.steps)
    eta = lr_factor(o, cfg.train.steps)
    group_lr = {
        "embed": o.embed_lr,
        "head": o.head_lr,
        "scalar": o.scalar_lr,
        "gate": o.scalar_lr,
        "hidden": o.hidden_lr,
    }

    def adam(group: str) -> optax.GradientTransformation:
        decay = o.adam_weight_decay if (group != "scalar" or o.adam_decay_vectors) else 0.0
        return optax.adamw(
            lambda step, lr=group_lr[group]: lr * eta(step),
            b1=o.adam_b1,
            b2=o.adam_b2,
            eps=o.adam_eps,
            weight_decay=decay,
        )

    transforms = {group: adam(group) for group in GROUPS}
    if o.kind == "muon_adam":
        transforms["hidden"] = muon.muon(
            lambda step: o.muon_lr * eta(step),
            weight_decay=o.muon_weight_decay,
            weight_decay_mode=o.muon_weight_decay_mode,
            momentum=_muon_momentum(o),
            ns=o.muon_ns,
            scaling=o.muon_scaling,
            normuon_b2=o.muon_normuon_b2,
            ns_dtype=jnp.dtype(o.muon_ns_dtype),
            ns_impl=o.muon_ns_impl,
        )
    return optax.partition(transforms, param_labels)


def clip_by_norm(grads: Any, norm: jax.Array, max_norm: float | None) -> Any:
    """Scale gradients down to `max_norm` when their global `norm` exceeds it (llm.c clips at 1).

    The norm comes in precomputed because under a sharded optimizer no device
    holds every gradient: the train step sums the squares over devices.
    """
    if max_norm is None:
        return grads
    scale = jnp.where(norm > max_norm, max_norm / norm, 1.0)
    return jax.tree.map(lambda g: g * scale, grads)
