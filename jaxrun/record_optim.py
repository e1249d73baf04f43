"""Record #77's optimizer: NorMuon on the matrix banks, Adam every other step on the rest.

A table of `OptimRow`s (path regex -> optimizer kind, lr and decay multipliers,
Adam betas, NorMuon shape factor) decides every leaf; `make_record_optimizer`
joins the two kinds with `partition_in_order`, Adam's updates first. Both follow one lr schedule
`s(step)` (stages with their own multipliers, then a linear cooldown to a
floor) and couple their cautious weight decay to it, so decay scales as s².
Adam updates only on every `adam_every`-th step, on the gradients summed since
its last update. Step counts live in the optimizer state: the whole update is
one compiled program. Every piece is per matrix (NorMuon) or elementwise
(Adam), so it runs unchanged on the owned slice of each leaf under ZeRO-1.

The embedding is tied to the head until the split step: the forward then reads
``lm_head/w.T``, `embed/tokens` gets zero gradients (its Adam update is then
exactly zero), and `untie` hands it the head's weights and Adam moments.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxrun import muon
from jaxrun.config import ConfigError, OptimConfig
from jaxrun.param_table import OptimRow

Schedule = Callable[[jax.Array], jax.Array]

# modded-nanogpt's polar_express adds 1e-6 to 1.02·‖X‖_F.
_NS_EPS = 1e-6


def path_of(key_path: Any) -> str:
    return jax.tree_util.keystr(key_path, simple=True, separator="/")


def row_of(rows: Sequence[OptimRow], path: str) -> OptimRow:
    """The one row whose pattern fully matches `path`; ConfigError otherwise."""
    hits = [row for row in rows if re.fullmatch(row.pattern, path)]
    if len(hits) != 1:
        raise ConfigError(f"param {path!r} matches {len(hits)} optimizer rows (needs exactly 1)")
    if hits[0].kind == "adam" and hits[0].betas is None:
        raise ConfigError(f"param {path!r}: its row {hits[0].pattern!r} gives no Adam betas")
    return hits[0]


def param_kinds(rows: Sequence[OptimRow], params: Any) -> Any:
    """A tree like `params` holding each leaf's optimizer kind, "normuon" or "adam"."""
    return jax.tree_util.tree_map_with_path(lambda path, _: row_of(rows, path_of(path)).kind, params)


# ----------------------------------------------------------------------------
# Schedules


def stage_starts(scheduled_steps: int, num_stages: int) -> tuple[int, ...]:
    """First step of each of `num_stages` equal stages, rounded as the source rounds them."""
    # Python's round of the accumulated float durations: 483 and 967 for S=1450.
    ends = accumulate([1 / num_stages] * (num_stages - 1))
    return (0, *(round(c * scheduled_steps) for c in ends))


def split_step(scheduled_steps: int, num_stages: int = 3, stage: int = 2) -> int:
    """The untie step: the first step of `stage`, made odd so Adam updates there (967 for S=1450)."""
    return stage_starts(scheduled_steps, num_stages)[stage] | 1


def lr_schedule(
    scheduled_steps: int, *, stage_lr_muls: Sequence[float], cooldown_frac: float, floor: float
) -> Schedule:
    """s(step): the stage's multiplier, then a linear cooldown to `floor` over the last
    `cooldown_frac` of the scheduled steps; `floor` from then on (the extension steps).

    Record #77: stage_lr_muls (1.0, 1.52, 1.73), cooldown_frac 0.6, floor 0.15.
    """
    if not stage_lr_muls or not 0 < cooldown_frac <= 1:
        raise ConfigError(
            f"the lr schedule needs optim.lr_stage_muls={tuple(stage_lr_muls)} non-empty and "
            f"optim.cooldown_frac={cooldown_frac} in (0, 1]"
        )
    starts = jnp.asarray(stage_starts(scheduled_steps, len(stage_lr_muls))[1:], jnp.int32)
    muls = jnp.asarray(stage_lr_muls, jnp.float32)
    cd_start = int(scheduled_steps * (1 - cooldown_frac))

    def s(step):
        step = jnp.asarray(step, jnp.int32)
        mul = muls[jnp.sum(step >= starts)]
        t = jnp.clip((step - cd_start).astype(jnp.float32) / (scheduled_steps - cd_start), 0.0, 1.0)
        return mul * (1 - t) + floor * t

    return s


def momentum_schedule(
    total_steps: int, *, low: float, high: float, warmup_steps: int, cooldown_steps: int
) -> Schedule:
    """μ(step): `low` -> `high` over `warmup_steps`, then back toward `low` over the last `cooldown_steps`."""
    cd_start = total_steps - cooldown_steps

    def mu(step):
        step = jnp.asarray(step, jnp.float32)
        warm = low + step / max(warmup_steps, 1) * (high - low)
        cool = high - (step - cd_start) / max(cooldown_steps, 1) * (high - low)
        return jnp.where(step < warmup_steps, warm, jnp.where(step > cd_start, cool, high))

    return mu


# ----------------------------------------------------------------------------
# NorMuon: the learning rate and cautious decay after `muon.scale_by_muon`


def _normuon_step(
    rows: Sequence[OptimRow], *, base_lr: float, weight_decay: float, lr: Schedule, ns_dtype: jnp.dtype
) -> optax.GradientTransformation:
    """``-(η X' + mask ⊙ W · λ·η_M·s·wd_mul · η)``, ``η = η_M·s·lr_mul·shape_mult``, ``mask = X' ⊙ W >= 0``."""

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("the NorMuon step needs params")
        s = lr(state.count)

        def leaf(path, o, p):
            row = row_of(rows, path_of(path))
            lr_eff = base_lr * s * row.lr_mul * row.shape_mult
            wd_eff = row.wd_mul * weight_decay * base_lr * s
            o = o.astype(ns_dtype).astype(jnp.float32)  # the source's X' is bf16
            decay = p * (o * p >= 0) * wd_eff * lr_eff
            return -(decay + o * lr_eff)

        new = jax.tree_util.tree_map_with_path(leaf, updates, params)
        return new, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(
        lambda params: optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32)), update_fn
    )


# ----------------------------------------------------------------------------
# Adam with per-row betas, and its every-n-steps wrapper


class RecordAdamState(NamedTuple):
    count: jax.Array  # int32: Adam updates done
    mu: optax.Updates
    nu: optax.Updates


def scale_by_record_adam(
    rows: Sequence[OptimRow], *, base_lr: float, weight_decay: float, eps: float, lr_of_count: Schedule
) -> optax.GradientTransformation:
    """Adam as record #77 runs it, returning the negated step.

    With ``t`` this update's number (from 1) and ``lr = base_lr · lr_of_count(t) · lr_mul``:
    ``u = lr·sqrt(1-β2^t)/(1-β1^t) · m / (sqrt(v) + eps)`` (the bias correction
    folded into the step size, eps on the uncorrected ``sqrt(v)``), then
    ``u += (u ⊙ p > 0) ⊙ p · lr²·weight_decay·wd_mul`` and the update is ``-u``.
    Elementwise, so any slice of a leaf gives the same result.
    """

    def init_fn(params):
        return RecordAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, jnp.float32),
            nu=optax.tree.zeros_like(params, jnp.float32),
        )

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_record_adam needs params")
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        s = lr_of_count(count)

        def leaf(path, g, m, v, p):
            row = row_of(rows, path)
            b1, b2 = row.betas
            lr = base_lr * s * row.lr_mul
            g = g.astype(jnp.float32)
            m = m * b1 + g * (1 - b1)
            v = v * b2 + (1 - b2) * g * g
            step_size = lr * jnp.sqrt(1 - b2**t) / (1 - b1**t)
            u = m / (jnp.sqrt(v) + eps) * step_size
            u = u + p * (u * p > 0) * (lr * lr * weight_decay * row.wd_mul)
            return -u.astype(p.dtype), m, v

        with_paths, treedef = jax.tree_util.tree_flatten_with_path(updates)
        if not with_paths:
            return updates, state._replace(count=count)
        rest = (treedef.flatten_up_to(tree) for tree in (state.mu, state.nu, params))
        out = [leaf(path_of(path), g, *mvp) for (path, g), *mvp in zip(with_paths, *rest, strict=True)]
        new_updates, mu, nu = (treedef.unflatten(list(col)) for col in zip(*out, strict=True))
        return new_updates, RecordAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


class EverySummedState(NamedTuple):
    count: jax.Array  # int32: steps seen
    grad_sum: optax.Updates  # grads since the last inner update
    inner_state: optax.OptState


def apply_every_summed(inner: optax.GradientTransformation, every: int) -> optax.GradientTransformation:
    """Runs `inner` on steps every-1, 2·every-1, ... on the grads summed since its last run.

    Other steps return zero updates and keep `inner`'s state. Unlike
    ``optax.MultiSteps`` the grads are summed, not averaged: record #77 lets
    torch accumulate Adam grads over the even and the odd step. The choice is
    a ``lax.cond`` on the count in the state, so it compiles once.
    """
    if every == 1:
        return inner

    def init_fn(params):
        return EverySummedState(
            count=jnp.zeros([], jnp.int32),
            grad_sum=optax.tree.zeros_like(params),
            inner_state=inner.init(params),
        )

    def update_fn(updates, state, params=None):
        total = jax.tree.map(jnp.add, state.grad_sum, updates)

        def run(total, inner_state):
            new, inner_state = inner.update(total, inner_state, params)
            return new, inner_state, optax.tree.zeros_like(total)

        def hold(total, inner_state):
            return optax.tree.zeros_like(total), inner_state, total

        emit = state.count % every == every - 1
        new, inner_state, grad_sum = jax.lax.cond(emit, run, hold, total, state.inner_state)
        return new, EverySummedState(optax.safe_increment(state.count), grad_sum, inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------
# The whole optimizer


def make_record_optimizer(
    cfg: OptimConfig, rows: Sequence[OptimRow], total_steps: int
) -> optax.GradientTransformation:
    """NorMuon and Adam over a param tree, each leaf placed by its row (`param_kinds`).

    Uses these `cfg` fields:
      - NorMuon: `muon_lr` (η_M, record 0.023), `muon_weight_decay` (λ, 1.2),
        `muon_normuon_b2` (0.95), `muon_ns` ("polar_express"), `muon_ns_dtype`
        ("float32" only for exact checks), `muon_momentum` (0.95),
        `muon_momentum_warmup_from` (0.85), `muon_momentum_warmup_steps` (300),
        `muon_momentum_cooldown_steps` (50). `muon_scaling` must be "normuon" and
        `muon_weight_decay_mode` "cautious": this is what the optimizer does.
      - Adam: `adam_lr` (η_A, 0.008), `adam_weight_decay` (0.005), `adam_eps`
        (1e-10), `adam_every` (2).
      - Schedule: `lr_stage_muls` ((1.0, 1.52, 1.73)), `cooldown_frac` (0.6),
        `final_lr_frac` (0.15), `extension_steps` (40); `warmup_steps` must be 0.

    Args:
      cfg: the optimizer config.
      rows: one `OptimRow` per param group; each leaf must match exactly one.
      total_steps: scheduled plus extension steps (record #77: 1450 + 40).

    Returns:
      A transform whose update needs params. NorMuon leaves are
      ``[..., fan_in, fan_out]`` and every leading axis is a batch of
      matrices; Adam is elementwise. So `init` and `update` may be given the
      owned parts of ZeRO-1 (a slice of NorMuon leaves' leading axis, a flat
      slice of Adam leaves) instead of whole leaves.

    References:
      Jordan et al., `modded-nanogpt <https://github.com/KellerJordan/modded-nanogpt>`_,
      record #77 (NorMuonAndAdam, TrainingSchedule, get_muon_momentum).
    """
    if cfg.muon_scaling != "normuon" or cfg.muon_weight_decay_mode != "cautious":
        raise ConfigError(
            f"optim.muon_scaling={cfg.muon_scaling!r}, optim.muon_weight_decay_mode="
            f"{cfg.muon_weight_decay_mode!r}: the record optimizer is 'normuon' with 'cautious' decay"
        )
    if cfg.warmup_steps != 0 or cfg.muon_momentum_warmup_from is None:
        raise ConfigError(
            f"optim.warmup_steps={cfg.warmup_steps} must be 0 and optim.muon_momentum_warmup_from "
            f"={cfg.muon_momentum_warmup_from} set for the record optimizer"
        )
    scheduled = total_steps - cfg.extension_steps
    if scheduled <= 0:
        raise ConfigError(
            f"optim.extension_steps={cfg.extension_steps} leaves no scheduled steps of {total_steps}"
        )
    lr = lr_schedule(
        scheduled, stage_lr_muls=cfg.lr_stage_muls, cooldown_frac=cfg.cooldown_frac, floor=cfg.final_lr_frac
    )
    momentum = momentum_schedule(
        total_steps,
        low=cfg.muon_momentum_warmup_from,
        high=cfg.muon_momentum,
        warmup_steps=cfg.muon_momentum_warmup_steps,
        cooldown_steps=cfg.muon_momentum_cooldown_steps,
    )
    ns_dtype = jnp.dtype(cfg.muon_ns_dtype)
    normuon = optax.chain(
        muon.scale_by_muon(
            momentum=momentum,
            ns=cfg.muon_ns,
            scaling="normuon",
            normuon_b2=cfg.muon_normuon_b2,
            eps=_NS_EPS,
            ns_dtype=ns_dtype,
            ns_round_first=True,
            ns_impl=cfg.muon_ns_impl,
            shape_factor=False,
        ),
        _normuon_step(
            rows, base_lr=cfg.muon_lr, weight_decay=cfg.muon_weight_decay, lr=lr, ns_dtype=ns_dtype
        ),
    )
    every = cfg.adam_every
    adam = scale_by_record_adam(
        rows,
        base_lr=cfg.adam_lr,
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_eps,
        lr_of_count=lambda t: lr(every * t - 1),  # the t-th Adam update runs at step every·t - 1
    )
    return partition_in_order(
        {"adam": apply_every_summed(adam, every), "normuon": normuon},
        lambda params: param_kinds(rows, params),
    )


def partition_in_order(
    transforms: dict[str, optax.GradientTransformation], labels: Callable[[Any], Any]
) -> optax.GradientTransformation:
    """`optax.partition` (same state), with each group's update finished before the next one starts.

    The groups run in the dict's order, and an optimization barrier between them
    makes every later group's inputs wait for the earlier groups' updates. Record
    #77 orders its work so: Adam's cheap updates first, so their all-gathers
    (the embedding tables, the largest) run behind the Polar Express matmuls of
    NorMuon, which come last. Without the barrier XLA may schedule NorMuon first
    and leave the tables' gathers with nothing to hide behind.
    """
    plain = optax.partition(transforms, labels)

    def update_fn(updates, state, params=None):
        kinds, inner = labels(updates), {}
        for i, (group, tx) in enumerate(transforms.items()):
            if i:
                updates = jax.lax.optimization_barrier(updates)
            masked = optax.masked(tx, jax.tree.map(lambda kind, g=group: kind == g, kinds))
            updates, inner[group] = masked.update(updates, state.inner_states[group], params)
        return updates, state._replace(inner_states=inner)

    return optax.GradientTransformation(plain.init, update_fn)


# ----------------------------------------------------------------------------
# Untying the embedding from the head


def _get(tree: Any, path: str) -> Any:
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _set(tree: dict, path: str, value: Any) -> dict:
    head, _, rest = path.partition("/")
    return {**tree, head: _set(tree[head], rest, value) if rest else value}


def _transposed_into(src: jax.Array, shape: tuple[int, int], dst: jax.Array) -> jax.Array:
    """`src` (a [rows, cols] leaf, or its flat padded ZeRO form) transposed, in `dst`'s form."""
    t = src.reshape(-1)[: math.prod(shape)].reshape(shape).T.reshape(-1)
    return jnp.pad(t, (0, dst.size - t.size)).reshape(dst.shape).astype(dst.dtype)


HEAD, EMBEDDING = "lm_head/w", "embed/tokens"  # the leaves the untie parts


def untie(
    params: Any, opt_state: optax.OptState, *, head: str = HEAD, embed: str = EMBEDDING
) -> tuple[Any, optax.OptState]:
    """Start the embedding from the head: ``embed ← headᵀ``, and Adam's m, v likewise.

    Call it right after the split step's update (`split_step`). Adam's update
    count is shared by all Adam leaves, so the embedding already has the head's
    count. `params` must be whole leaves; the Adam moments may be whole or in
    the flat padded form of ZeRO-1's global state (only the first
    ``rows·cols`` entries are data). Pure and jittable.
    """
    shape = _get(params, head).shape
    params = _set(params, embed, _transposed_into(_get(params, head), shape, _get(params, embed)))

    def copy(tree):
        return _set(tree, embed, _transposed_into(_get(tree, head), shape, _get(tree, embed)))

    def fix(node):
        if isinstance(node, RecordAdamState):
            return node._replace(mu=copy(node.mu), nu=copy(node.nu))
        return node

    opt_state = jax.tree.map(fix, opt_state, is_leaf=lambda x: isinstance(x, RecordAdamState))
    return params, opt_state
