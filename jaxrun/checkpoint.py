"""Checkpoints, exact resume and safe stops: orbax under the train loop.

A checkpoint, `<run dir>/checkpoints/<step>/`, holds all a run needs to
continue exactly: the `TrainState` (params, optimizer state and step; the
learning-rate and momentum schedules are functions of the counts in it), the
train stream's position (through grain's orbax handler), the config, and a
JSON record of the train time so far, the RNG key and a checksum per array.
Saving is asynchronous (orbax's `CheckpointManager`). Right after step n is
dispatched, a jitted copy of the state is taken on the device; it goes to
orbax once step n+1 has been dispatched, so the device-to-host copy overlaps a
step and the disk write runs in a background thread.

Faults. Orbax writes into a temporary directory and renames it when complete,
so a save cut short never looks finished. Such leftovers, and checkpoints that
fail to read back or whose checksums disagree (orbax restores flipped bits
without complaint), are reported and moved to `<run dir>/checkpoints-damaged/`,
and resuming falls back to the one before. A state with non-finite values is
never saved. What stops the loop early (signals, a non-finite loss) is in
`jaxrun.loop_control`.
"""

from __future__ import annotations

import copy
import gc
import io
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxrun import model
from jaxrun.config import Config, ConfigError, config_changes, config_from_dict

_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}


class CheckpointError(RuntimeError):
    """No checkpoint to resume from, or none that reads back whole; the message says where."""


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient norm or state; the message names the step and leaves."""


class Restored(NamedTuple):
    state: Any
    step: int
    train_ms: float


def leaf_paths(tree: Any) -> list[tuple[str, Any]]:
    """(path, leaf) pairs, paths like `opt_state/inner_states/hidden/inner_state/0/count`."""
    flat = jax.tree_util.tree_leaves_with_path(tree)
    return [(jax.tree_util.keystr(path, simple=True, separator="/"), leaf) for path, leaf in flat]


def _checksum(x: jax.Array) -> jax.Array:
    """The array's bits as words, summed with odd position weights mod 2^32: any one changed word shows."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    words = jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(jnp.uint32)
    index = jnp.zeros(words.shape, jnp.uint32)
    for axis, size in enumerate(words.shape):
        index = index * jnp.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
    return jnp.sum(words * (2 * index + 1), dtype=jnp.uint32)


@jax.jit
def _checksums(tree: Any) -> jax.Array:
    return jnp.stack([_checksum(x) for x in jax.tree.leaves(tree)])


@jax.jit
def _snapshot(state: Any) -> tuple[Any, jax.Array, jax.Array]:
    """A copy of `state` that outlives its donation to the next step, its checksums, its finite leaves."""
    leaves = jax.tree.leaves(state)
    finite = [
        jnp.isfinite(x).all() if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True) for x in leaves
    ]
    return jax.tree.map(jnp.copy, state), _checksums(state), jnp.stack(finite)


class Position(grain.DatasetIterator):
    """A data stream position, held still: what a snapshot saves through grain's orbax handler."""

    def __init__(self, state: dict[str, Any]):
        super().__init__()
        self._state = state

    def __next__(self):
        raise StopIteration

    def get_state(self) -> dict[str, Any]:
        return self._state

    def set_state(self, state: dict[str, Any]) -> None:
        self._state = state


class _Snapshot(NamedTuple):
    step: int
    state: Any
    checksums: jax.Array
    finite: jax.Array
    position: dict[str, Any]
    train_ms: float
    blocked_ms: float


def _handlers() -> dict[str, Any]:
    # One writer per array (no replica-parallel slicing): the first save then compiles
    # no slicing programs, which cost seconds of stall (orbax's default on GPU too).
    arrays = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
    registry = ocp.type_handlers.create_type_handler_registry((jax.Array, arrays))
    return {
        "state": ocp.PyTreeCheckpointHandler(type_handler_registry=registry),
        "data": grain.checkpoint.CheckpointHandler(),
        "config": ocp.JsonCheckpointHandler("config.json"),
        "meta": ocp.JsonCheckpointHandler("meta.json"),
    }


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _on_disk(state: Any) -> Any:
    """The tree a checkpoint holds for `state`: a NamedTuple's fields by name (as orbax stores them),
    leaving out empty dicts (`TrainState.fp8` without FP8 scales), so that checkpoints written before
    such a field existed still restore."""
    if not hasattr(state, "_asdict"):
        return state
    return {k: v for k, v in state._asdict().items() if not (isinstance(v, dict) and not v)}


def _from_disk(like: Any, tree: Any) -> Any:
    """`_on_disk`'s inverse: fields left out take their (empty) defaults."""
    return type(like)(**tree) if hasattr(like, "_asdict") else tree


def _restore_args(abstract: Any, partial: bool = False) -> ocp.args.PyTreeRestore:
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    return ocp.args.PyTreeRestore(abstract, restore_args=restore_args, partial_restore=partial)


def _verify(tree: Any, checksums: dict[str, int]) -> None:
    """Raise CheckpointError if a restored leaf's checksum differs from the saved one."""
    sums = np.asarray(_checksums(tree)).tolist()
    bad = [p for (p, _), s in zip(leaf_paths(tree), sums, strict=True) if checksums.get(p) != s]
    if bad:
        raise CheckpointError(f"checksum mismatch in {len(bad)} array(s), e.g. {bad[0]}")


def _shapes(tree: Any) -> dict[str, str]:
    """Each leaf's shape and dtype, by path; params first, so messages lead with them."""
    shapes = {p: f"{tuple(x.shape)} {np.dtype(x.dtype).name}" for p, x in leaf_paths(tree)}
    return dict(sorted(shapes.items(), key=lambda item: (not item[0].startswith("params"), item[0])))


def _refusal(step_dir: Path, changes: list[str], devices: int, old: dict, new: dict) -> str:
    """Why this config cannot resume from `step_dir`: its changes, and the arrays whose shapes differ."""
    differ = [p for p in {**old, **new} if old.get(p) != new.get(p)]  # params first
    diffs = [f"{p}: {old.get(p, 'absent')} -> {new.get(p, 'absent')}" for p in differ]
    lines = [
        f"cannot resume from {step_dir}: this config changes the shapes of the saved train state.",
        "  config changes: " + ("; ".join(changes) or "none"),
    ]
    if devices != jax.device_count():
        lines.append(
            f"  devices: {devices} when saved, {jax.device_count()} now (the optimizer state is sharded)"
        )
    more = f" (and {len(diffs) - 6} more)" if len(diffs) > 6 else ""
    lines.append(f"  state arrays: {'; '.join(diffs[:6])}{more}")
    return "\n".join(lines)


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = text.split(" See full TensorStore details")[0]  # then a repr of the whole store spec
    return f"{type(error).__name__}: {text[:160]}"


def _try_restore(restore: Callable[[], Any]) -> tuple[Any, str | None]:
    """`(restore(), None)`, or `(None, a one-line reason)` if it raised, without orbax's noise.

    A read that fails part way leaves orbax's other reads in flight: their tasks, and the
    TensorStore callbacks into an event loop already closed, print hundreds of lines of
    tracebacks to stderr (and to the `asyncio` log) as they finish or are collected. That
    output is held back while the restore runs and, after a failure, until those reads have
    settled; the caller reports the one-line reason instead.
    """
    held = sys.stderr, sys.unraisablehook, sys.excepthook
    quiet = [logging.getLogger(name) for name in ("asyncio", "absl", "orbax")]
    disabled = [logger.disabled for logger in quiet]
    sys.stderr, sys.unraisablehook, sys.excepthook = io.StringIO(), lambda _: None, lambda *_: None
    for logger in quiet:
        logger.disabled = True
    try:
        try:
            return restore(), None
        except Exception as e:  # noqa: BLE001 (a damaged checkpoint may raise anything)
            reason = _short(e)
        for _ in range(10):  # the reads left in flight finish within milliseconds; collect what they leave
            gc.collect()
            time.sleep(0.05)
        return None, reason
    finally:
        sys.stderr, sys.unraisablehook, sys.excepthook = held
        for logger, was in zip(quiet, disabled, strict=True):
            logger.disabled = was


def step_dirs(directory: str | Path) -> list[Path]:
    """Finished checkpoint step directories under `directory`, oldest first (plain file reads, no jax)."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        return []
    return sorted(
        (p for p in directory.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
    )


class Checkpointer:
    """A run's checkpoints in `<run_dir>/checkpoints`: asynchronous saves, resuming from the newest good one.

    Args:
      cfg: the run's config; `train.ckpt_every` and `train.ckpt_keep` set the cadence.
      run_dir: the run's directory.
      log: where messages go (the run log's `info`).
    """

    def __init__(self, cfg: Config, run_dir: str | Path, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.directory = Path(run_dir).expanduser().resolve() / "checkpoints"
        self.stall_ms = 0.0  # time the loop spent blocked in checkpointing, in total
        self.log = log
        self._pending: _Snapshot | None = None
        self._changes: list[str] = []  # config changes against the checkpoint resumed from
        self._manager: ocp.CheckpointManager | None = None

    @property
    def manager(self) -> ocp.CheckpointManager:
        """Orbax's manager, made on first use, after moving aside saves that never finished."""
        if self._manager is None:
            if self.directory.exists():
                for tmp in ocp.path.step.all_temporary_paths(epath.Path(self.directory)):
                    path = Path(tmp.get())
                    dest = self._set_aside(path)
                    self.log(
                        f"checkpoint {path.name} was never finished (stopped mid-save); moved it to {dest}"
                    )
            options = ocp.CheckpointManagerOptions(
                preservation_policy=ocp.checkpoint_managers.LatestN(self.cfg.train.ckpt_keep),
                enable_async_checkpointing=True,
            )
            self._manager = ocp.CheckpointManager(self.directory, item_handlers=_handlers(), options=options)
        return self._manager

    def _set_aside(self, path: Path) -> Path:
        """Move a damaged or unfinished checkpoint out of orbax's sight, keeping it for inspection."""
        dest = self.directory.with_name("checkpoints-damaged") / path.name
        if jax.process_index() == 0:
            n = 0
            while dest.exists():
                n += 1
                dest = dest.with_name(f"{path.name}.{n}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, dest)
        return dest

    def warm_up(self, state: Any) -> None:
        """Compile the snapshot and open the manager before the clock starts, if this run checkpoints."""
        if self.cfg.train.ckpt_every:
            jax.block_until_ready(_snapshot(state))
            _ = self.manager

    def due(self, step: int) -> bool:
        every = self.cfg.train.ckpt_every
        return every > 0 and (step % every == 0 or step == self.cfg.train.steps)

    def step_done(self, step: int, state: Any, stream: Any, train_ms: float, force: bool = False) -> None:
        """Call right after dispatching `step`, once its predecessor's metrics were read.

        Saves the snapshot taken at the previous call, if any (its step has finished or
        is about to), then snapshots `state` if a checkpoint is due (or `force`d). Without
        a checkpoint due this costs nothing: no host sync.
        """
        self.flush()
        if force or self.due(step):
            t0 = time.perf_counter()
            state_copy, sums, finite = _snapshot(state)
            blocked = 1000 * (time.perf_counter() - t0)
            position = copy.deepcopy(stream.get_state())
            self._pending = _Snapshot(step, state_copy, sums, finite, position, train_ms, blocked)

    def flush(self) -> None:
        """Hand the pending snapshot to orbax; returns once it is on the host, before it is on disk."""
        snap, self._pending = self._pending, None
        if snap is None:
            return
        t0 = time.perf_counter()
        finite = np.asarray(snap.finite)
        paths = [p for p, _ in leaf_paths(snap.state)]
        if not finite.all():
            bad = [p for p, ok in zip(paths, finite, strict=True) if not ok]
            self.wait()
            last = self.manager.latest_step()
            self._fail(
                f"non-finite values in the state after step {snap.step}, in {', '.join(bad)}; not saved. "
                + (
                    f"The last good checkpoint is {self.directory / str(last)}."
                    if last
                    else "There is no checkpoint."
                )
            )
        meta = {
            "step": snap.step,
            "train_ms": snap.train_ms,
            "rng": np.asarray(jax.random.key_data(jax.random.key(self.cfg.train.seed))).tolist(),
            "devices": jax.device_count(),
            "checksums": dict(zip(paths, np.asarray(snap.checksums).tolist(), strict=True)),
        }
        args = ocp.args.Composite(
            state=ocp.args.PyTreeSave(_on_disk(snap.state)),
            data=grain.checkpoint.CheckpointSave(Position(snap.position)),
            config=ocp.args.JsonSave(json.loads(self.cfg.to_json())),
            meta=ocp.args.JsonSave(meta),
        )
        self.manager.save(snap.step, args=args, force=True)
        blocked = snap.blocked_ms + 1000 * (time.perf_counter() - t0)
        self.stall_ms += blocked
        where = self.directory / str(snap.step)
        self.log(f"checkpoint {snap.step}: saving to {where} (loop blocked {blocked:.0f}ms)")

    def wait(self) -> None:
        """Block until every save handed to orbax is on disk."""
        if self._manager is not None:
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Save any pending snapshot and wait for all writes."""
        self.flush()
        self.wait()
        if self._manager is not None:
            self._manager.close()
            self._manager = None

    def discard_pending(self) -> None:
        """Drop the snapshot not yet handed to orbax, and wait for the saves that were."""
        self._pending = None
        self.wait()

    def _fail(self, message: str) -> NoReturn:
        self.log(f"error: {message}")
        raise NonFiniteError(message)

    def check_compatible(self, abstract_state: Any) -> None:
        """Refuse (ConfigError) a state whose shapes differ from the newest readable checkpoint's.

        Other config changes are allowed, and listed once a checkpoint is restored. A
        checkpoint past `train.steps` is refused here too, before any data is read or
        anything compiled.
        """
        for step in reversed(self.manager.all_steps()):
            step_dir = self.directory / str(step)
            try:
                saved = self.manager.item_metadata(step)["state"].tree
                old_cfg = json.loads((step_dir / "config" / "config.json").read_text())
                devices = json.loads((step_dir / "meta" / "meta.json").read_text())["devices"]
            except Exception:  # noqa: BLE001, S112 (unreadable: restore_latest reports it and falls back)
                continue
            if step > self.cfg.train.steps:
                raise ConfigError(
                    f"the newest checkpoint, {step_dir}, is past train.steps={self.cfg.train.steps}: "
                    f"set train.steps to {step} or more to continue"
                )
            self._changes = config_changes(old_cfg, self.cfg)
            old, new = _shapes(saved), _shapes(abstract_state)
            if old != new:
                raise ConfigError(_refusal(step_dir, self._changes, devices, old, new))
            return
        raise CheckpointError(f"no readable checkpoint to resume from in {self.directory}")

    def restore_latest(self, state: Any, stream: Any) -> Restored | None:
        """The newest checkpoint that reads back whole, restored in `state`'s layout; `stream` moves to it.

        Damaged checkpoints (unreadable, truncated, or failing their checksums) are
        reported, moved to `checkpoints-damaged/`, and the one before is tried. Returns
        None, leaving `stream` where it was, if none is left.
        """
        position = stream.get_state()
        for step in reversed(self.manager.all_steps()):
            restored, error = _try_restore(lambda step=step: self._restore(step, state, stream))
            if error is None:
                return restored
            dest = self._set_aside(self.directory / str(step))
            self.manager.reload()
            self.log(f"checkpoint {step} is damaged ({error}); moved it to {dest}, trying the one before")
        stream.set_state(position)
        return None

    def _restore(self, step: int, state: Any, stream: Any) -> Restored:
        args = ocp.args.Composite(
            state=_restore_args(_on_disk(_abstract(state))),
            data=grain.checkpoint.CheckpointRestore(stream),
            meta=ocp.args.JsonRestore(),
        )
        restored = self.manager.restore(step, args=args)
        restored_state = _from_disk(state, restored.state)
        _verify(restored_state, restored.meta["checksums"])
        if int(restored_state.step) != step:
            raise CheckpointError(f"holds the state of step {int(restored_state.step)}")
        return Restored(restored_state, step, float(restored.meta["train_ms"]))

    def resume(self, state: Any, stream: Any) -> Restored:
        """`restore_latest`, or CheckpointError if there is nothing to resume from."""
        restored = self.restore_latest(state, stream)
        if restored is None:
            raise CheckpointError(f"no usable checkpoint to resume from in {self.directory}")
        if restored.step > self.cfg.train.steps:
            raise ConfigError(
                f"the checkpoint is at step {restored.step}, past train.steps={self.cfg.train.steps}"
            )
        changes = f" with config changes: {'; '.join(self._changes)}" if self._changes else ""
        self.log(f"resumed from {self.directory / str(restored.step)}{changes}")
        return restored


def load_checkpoint(path: str | Path) -> tuple[Config, model.Params]:
    """The config and params of a checkpoint, on the first device, for notebooks.

    Args:
      path: a run dir or its `checkpoints` dir (the newest checkpoint that reads back
        whole is used; damaged ones are skipped with a message), or one step's dir.

    Returns:
      `(cfg, params)`: the run's config and the params, checksums verified.

    Raises:
      CheckpointError: no checkpoint there reads back whole.
    """
    path = Path(path).expanduser().resolve()  # orbax reads absolute paths only
    if (path / "state").is_dir():
        candidates = [path]
    else:
        candidates = list(
            reversed(step_dirs(path / "checkpoints" if (path / "checkpoints").is_dir() else path))
        )
    errors = []
    for step_dir in candidates:
        loaded, error = _try_restore(lambda step_dir=step_dir: _load_params(step_dir))
        if error is None:
            return loaded
        errors.append(f"{step_dir}: {error}")
        if len(candidates) > 1:
            print(f"skipping damaged checkpoint {step_dir} ({error})")
    raise CheckpointError(f"no checkpoint in {path} reads back whole" + "".join(f"\n  {e}" for e in errors))


def _load_params(step_dir: Path) -> tuple[Config, model.Params]:
    cfg = config_from_dict(json.loads((step_dir / "config" / "config.json").read_text()))
    checksums = json.loads((step_dir / "meta" / "meta.json").read_text())["checksums"]
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), cfg.model))
    abstract = {
        "params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)
    }
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(step_dir / "state", args=_restore_args(abstract, partial=True))
    _verify(restored, checksums)
    return cfg, restored["params"]


def init_params(path: str | None, like: model.Params, log: Callable[[str], None] = print) -> Any:
    """The params of checkpoint `path`, placed as `like` is, to fine-tune from; None without a path.

    Raises:
      CheckpointError: nothing there reads back whole.
      ConfigError: their shapes differ from `like`'s (the model config differs).
    """
    if path is None:
        return None
    saved_cfg, params = load_checkpoint(path)
    old, new = _shapes(params), _shapes(like)
    differ = [f"{p}: {old.get(p, 'absent')} -> {new.get(p, 'absent')}" for p in {**old, **new}]
    differ = [d for p, d in zip({**old, **new}, differ, strict=True) if old.get(p) != new.get(p)]
    if differ:
        raise ConfigError(
            f"train.init_from={path}: its params do not fit this model; "
            f"{len(differ)} differ, e.g. {differ[0]}"
        )
    log(f"initialized params from {path} (a {saved_cfg.name} run): fresh optimizer, step 0")
    return jax.tree.map(lambda p, x: jax.device_put(p, x.sharding), params, like)
