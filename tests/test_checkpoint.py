"""Checkpoints: exact resume in a new process, signals, damaged checkpoints, refusals, NaN stops.

One uninterrupted 6-step run (checkpointing every step) is the reference; the
other tests copy its run dir and resume from one of its checkpoints. Resumed
runs use the same 8 host devices, so losses and params must agree bitwise.
"""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrun
import launch
from jaxrun import checkpoint, data, loop_control, model, sharding, train
from jaxrun.config import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    saved_config,
)

ROOT = Path(__file__).resolve().parent.parent

# Three shards of 1300 tokens; a step takes 8 x 64 + 1, so each shard holds two steps:
# after step 2 the stream sits at the end of shard 0, after step 3 in the middle of shard 1.
SHARD_TOKENS, STEPS = 1300, 6

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="bitwise resume is checked on CPU")


def _config(shards: Path, out_dir: Path, **train) -> Config:
    """`tiny_cfg` with one sequence per device, over the shards in `shards`, logging to `out_dir`."""
    return Config(
        name="tiny",
        model=ModelConfig(
            num_layers=2, model_dim=64, head_dim=16, vocab_size=256, max_seq_len=64, compute_dtype="float32"
        ),
        data=DataConfig(
            seq_len=64,
            batch_seqs=8,
            val_tokens=64 * 8,
            val_batch_seqs=1,
            train_files=str(shards / "train_*.bin"),
            val_files=str(shards / "val_*.bin"),
        ),
        train=TrainConfig(
            **{
                "steps": STEPS,
                "micro_batch_seqs": 1,
                "val_every": 3,
                "progress": False,
                "out_dir": str(out_dir),
                "ckpt_every": 1,
                "ckpt_keep": 10,
                **train,
            }
        ),
    )


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for i in range(3):
        tokens = (np.arange(SHARD_TOKENS) * (i + 1) % 255 + 1).astype(np.uint16)
        noise = rng.random(SHARD_TOKENS) < 0.05
        tokens[noise] = rng.integers(1, 256, noise.sum())
        data.write_shard(tmp / f"train_{i:03d}.bin", tokens)
    data.write_shard(tmp / "val_000.bin", tokens)
    return tmp


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(records: list[dict], key: str = "train_loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in records if key in r}


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> str:
    """One persistent XLA cache for the `launch.py` processes: the 6-step ones compile once."""
    return str(tmp_path_factory.mktemp("xla_cache"))


def _launch(cache: str, *args: str) -> subprocess.Popen:
    """`launch.py` in a new process (inheriting the 8 host devices from conftest's XLA_FLAGS)."""
    cmd = [sys.executable, "launch.py", *args, "--compile-cache", cache]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, returncode: int = 0) -> str:
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == returncode, out
    return out


def _config_file(cfg: Config, path: Path) -> str:
    path.write_text(
        "import json\nfrom jaxrun.config import config_from_dict\n\n"
        f"def get_config():\n    return config_from_dict(json.loads({cfg.to_json()!r}))\n"
    )
    return str(path)


@pytest.fixture(scope="module")
def straight(shards, compile_cache):
    """6 steps in one process, a checkpoint after each: (run dir, train losses, val losses, params)."""
    cfg = _config(shards, shards / "straight")
    _finish(_launch(compile_cache, "--config", _config_file(cfg, shards / "straight.py")))
    [run_dir] = Path(cfg.train.out_dir).iterdir()
    records = _records(run_dir)
    return run_dir, _losses(records), _losses(records, "val_loss"), jaxrun.load_checkpoint(run_dir)[1]


def _copy_run(run_dir: Path, dest: Path, keep_through: int) -> Path:
    """A copy of the run dir with the checkpoints after `keep_through` removed."""
    copy = dest / run_dir.name
    shutil.copytree(run_dir, copy)
    for step_dir in checkpoint.step_dirs(copy / "checkpoints"):
        if int(step_dir.name) > keep_through:
            shutil.rmtree(step_dir)
    return copy


def _assert_each_step_once(records: list[dict]) -> None:
    """Train and val records each in step order, none twice: what a resume must leave."""
    for key in ("train_loss", "val_loss"):
        steps = [r["step"] for r in records if key in r]
        assert steps == sorted(set(steps)), (key, steps)


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _checksums(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / str(step) / "meta" / "meta.json").read_text())["checksums"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "resume_at, position",
    [(2, {"shard": 0, "offset": 1024}), (3, {"shard": 1, "offset": 512})],
    ids=["at_shard_end", "mid_shard"],
)
def test_resume_in_a_new_process_matches_the_straight_run(
    straight, compile_cache, tmp_path, resume_at, position
):
    run_dir, losses, val_losses, params = straight
    run = _copy_run(run_dir, tmp_path, keep_through=resume_at)
    saved = json.loads((run / "checkpoints" / str(resume_at) / "data" / "process_0-of-1.json").read_text())
    assert saved == {"epoch": 0, **position, "step": resume_at}
    out = _finish(_launch(compile_cache, "--resume", str(run)))
    assert f"resumed from {run / 'checkpoints' / str(resume_at)}" in out
    assert f"step:{STEPS}/{STEPS} val_loss:" in out

    records = _records(run)  # the records past the resumed step were dropped, then logged again
    _assert_each_step_once(records)
    assert _losses(records) == losses  # bitwise
    assert _losses(records, "val_loss") == val_losses
    cfg, resumed_params = jaxrun.load_checkpoint(run)
    assert cfg == saved_config(run_dir)
    _assert_trees_equal(resumed_params, params)
    assert _checksums(run, STEPS) == _checksums(run_dir, STEPS)  # the whole state: optimizer too


def _sigterm_once_training(proc: subprocess.Popen, run_dir: Path, after_step: int) -> str:
    """SIGTERM `proc` once it has logged a step past `after_step`; its output."""
    deadline = time.monotonic() + 300
    while not any(s > after_step for s in _losses(_records(run_dir))):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    return _finish(proc, 128 + signal.SIGTERM)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resumes(shards, compile_cache, tmp_path):
    cfg = _config(shards, tmp_path / "runs", steps=100_000, val_every=0, ckpt_every=0)
    proc = _launch(compile_cache, "--config", _config_file(cfg, tmp_path / "long.py"))
    deadline = time.monotonic() + 300
    while not (runs := list(Path(cfg.train.out_dir).glob("*/metrics.jsonl"))):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.2)
    run_dir = runs[0].parent
    out = _sigterm_once_training(proc, run_dir, after_step=0)
    [saved] = checkpoint.step_dirs(run_dir / "checkpoints")
    first = int(saved.name)
    assert f"stopped by SIGTERM after step {first}, with a checkpoint" in out
    assert max(_losses(_records(run_dir))) == first

    # Resume, and stop it again the same way: it continues from the step after.
    out = _sigterm_once_training(_launch(compile_cache, "--resume", str(run_dir)), run_dir, after_step=first)
    assert f"resumed from {saved}" in out
    second = int(checkpoint.step_dirs(run_dir / "checkpoints")[-1].name)
    assert second > first and f"stopped by SIGTERM after step {second}" in out
    records = _records(run_dir)
    _assert_each_step_once(records)
    assert sorted(_losses(records)) == list(range(1, second + 1))


@pytest.mark.slow
def test_kill_9_keeps_the_metrics_and_a_resume_repeats_no_step(shards, compile_cache, tmp_path):
    cfg = _config(shards, tmp_path / "runs", steps=100_000, val_every=0, ckpt_every=2)
    proc = _launch(compile_cache, "--config", _config_file(cfg, tmp_path / "long.py"))
    deadline = time.monotonic() + 300
    while not (runs := list(Path(cfg.train.out_dir).glob("*/checkpoints/4"))):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.2)
    proc.kill()  # SIGKILL: no handler runs, no file is closed
    proc.communicate()
    run_dir = runs[0].parent.parent
    logged = max(_losses(_records(run_dir)))  # every line whole, and at least to the checkpoint
    assert logged >= 4
    last = int(checkpoint.step_dirs(run_dir / "checkpoints")[-1].name)
    _finish(_launch(compile_cache, "--resume", str(run_dir), "--set", f"train.steps={last + 2}"))
    records = _records(run_dir)
    _assert_each_step_once(records)
    assert sorted(_losses(records)) == list(range(1, last + 3))


def test_signals_set_a_flag_and_a_second_one_acts_as_usual():
    # raise_signal sends to this (the main) thread, and its handler has run when the call returns:
    # os.kill to the process may land on another thread and wait for the main one to notice it.
    with loop_control.StopSignals() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _largest_array_file(step_dir: Path) -> Path:
    return max(
        (p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)), key=os.path.getsize
    )


@pytest.mark.slow
def test_damaged_checkpoints_are_skipped_with_a_message(straight, compile_cache, tmp_path):
    run_dir, losses, _, params = straight
    run = _copy_run(run_dir, tmp_path, keep_through=STEPS)
    ckpts = run / "checkpoints"
    truncated = _largest_array_file(ckpts / "6")
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    flipped = _largest_array_file(ckpts / "5")  # reads back fine; only the checksum can tell
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    flipped.write_bytes(bytes(raw))
    shutil.copytree(ckpts / "4", ckpts / "7.orbax-checkpoint-tmp")  # a save cut short
    (ckpts / "7.orbax-checkpoint-tmp" / "commit_success.txt").unlink()

    out = _finish(_launch(compile_cache, "--resume", str(run)))
    assert "Traceback" not in out and "Event loop is closed" not in out
    assert "checkpoint 7.orbax-checkpoint-tmp was never finished" in out
    assert "checkpoint 6 is damaged" in out
    assert "checkpoint 5 is damaged (CheckpointError: checksum mismatch" in out
    assert f"resumed from {ckpts / '4'}" in out
    assert sorted(p.name for p in (run / "checkpoints-damaged").iterdir()) == [
        "5",
        "6",
        "7.orbax-checkpoint-tmp",
    ]
    records = _records(run)
    _assert_each_step_once(records)
    assert _losses(records) == losses
    _assert_trees_equal(jaxrun.load_checkpoint(run)[1], params)


_CRASH_MID_SAVE = """
import json, os, signal, sys
import grain, jax.numpy as jnp
from jaxrun import checkpoint, train
from jaxrun.config import config_from_dict

cfg = config_from_dict(json.loads(sys.argv[2]))
ckpt = checkpoint.Checkpointer(cfg, sys.argv[1])
state = train.TrainState(jnp.int32(1), {"w": jnp.arange(4096.0)}, ())
ckpt.step_done(1, state, checkpoint.Position({"at": 1}), 0.0, force=True)
ckpt.close()
# Die while writing checkpoint 2: its data item's writer kills the process.
grain.checkpoint.CheckpointHandler.save = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
ckpt.step_done(2, state._replace(step=jnp.int32(2)), checkpoint.Position({"at": 2}), 0.0, force=True)
ckpt.flush()
"""


def test_a_crash_mid_save_leaves_the_previous_checkpoint(shards, tmp_path):
    cfg = _config(shards, tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", _CRASH_MID_SAVE, str(tmp_path), cfg.to_json()],
        cwd=ROOT,
        capture_output=True,
        check=False,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert (tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp").is_dir()  # orbax never renamed it

    messages = []
    ckpt = checkpoint.Checkpointer(cfg, tmp_path, log=messages.append)
    position = checkpoint.Position({})
    restored = ckpt.restore_latest(train.TrainState(jnp.int32(0), {"w": jnp.zeros(4096)}, ()), position)
    assert restored.step == 1 and position.get_state() == {"at": 1}
    np.testing.assert_array_equal(restored.state.params["w"], np.arange(4096.0))
    assert messages[0].startswith("checkpoint 2.orbax-checkpoint-tmp was never finished")


_FALL_BACK = """
import os, sys
from pathlib import Path
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxrun import checkpoint, train
from jaxrun.config import Config, TrainConfig

mesh = jax.make_mesh((8,), ("dp",))
params = {f"w{i}": jax.device_put(jnp.arange(65536.0) + i, NamedSharding(mesh, P("dp"))) for i in range(12)}
state = train.TrainState(jax.device_put(jnp.int32(1), NamedSharding(mesh, P())), params, ())
ckpt = checkpoint.Checkpointer(Config(name="t", train=TrainConfig(ckpt_keep=5)), sys.argv[1])
if sys.argv[2] == "save":
    for step in (1, 2):
        ckpt.step_done(step, state._replace(step=state.step * step), checkpoint.Position({}), 0.0, force=True)
    ckpt.close()
else:
    print("restored", ckpt.restore_latest(state, checkpoint.Position({})).step)
"""


def test_a_damaged_checkpoint_falls_back_with_one_line(tmp_path):
    """Orbax's reads left in flight by a failed restore print hundreds of traceback lines unless held back."""

    def run(*args):
        cmd = [sys.executable, "-c", _FALL_BACK, str(tmp_path), *args]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True, timeout=120)

    run("save")
    state_dir = tmp_path / "checkpoints" / "2" / "state"
    arrays = (p for p in state_dir.rglob("*") if p.is_file() and "/d/" in str(p))
    for path in sorted(arrays, key=os.path.getsize)[-3:]:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    done = run("restore")
    lines = (done.stdout + done.stderr).splitlines()
    assert lines[0].startswith("checkpoint 2 is damaged ("), lines[:3]
    assert lines[1:] == ["restored 1"], f"{len(lines)} lines: {lines[:6]}"


def _saved_init(shards: Path, tmp_path: Path, step: int = 0) -> tuple[Path, Config, train.TrainState]:
    """A run dir holding one checkpoint, of the initial state (no training, so no train-step compile)."""
    cfg = _config(shards, tmp_path)
    state = train.init_state(cfg, jax.random.key(1), sharding.make_mesh(cfg.mesh))
    ckpt = checkpoint.Checkpointer(cfg, tmp_path / "run", log=lambda line: None)
    ckpt.step_done(step, state, checkpoint.Position({}), 0.0, force=True)
    ckpt.close()
    return tmp_path / "run", cfg, state


def test_incompatible_config_is_refused(shards, tmp_path):
    run, _, _ = _saved_init(shards, tmp_path)
    with pytest.raises(
        SystemExit, match=r"(?s)model.model_dim: 64 -> 128.*params/blocks/attn/w_k: \(2, 64, 64\)"
    ):
        launch.main(["--resume", str(run), "--set", "model.model_dim=128", "--compile-cache", ""])
    with pytest.raises(SystemExit, match="--resume takes the config and params saved in RUN_DIR"):
        launch.main(["--resume", str(run), "--config", "demo"])


def test_resuming_past_train_steps_is_refused_before_loading_data(shards, tmp_path):
    run, _, _ = _saved_init(shards, tmp_path, step=5)
    # No shards there: a refusal that came after loading data would name them instead.
    args = ["--resume", str(run), "--set", "data.train_files=/nowhere/*.bin", "--compile-cache", ""]
    with pytest.raises(SystemExit, match=r"checkpoints/5, is past train.steps=3: set train.steps to 5"):
        launch.main([*args, "--set", "train.steps=3"])


@pytest.mark.slow
def test_nonfinite_loss_stops_the_run_naming_the_leaves(shards, tmp_path, monkeypatch):
    make_train_step = train.make_train_step

    def poisoned(cfg, mesh, mode=None, adam_step=None):
        """The real step, except that it leaves NaNs in blocks/mlp/w_up after step 5."""
        step = make_train_step(cfg, mesh, mode, adam_step)

        def step_then_poison(state, batch):
            state, metrics = step(state, batch)
            mlp = state.params["blocks"]["mlp"]
            w_up = jnp.where(state.step == 5, jnp.nan, mlp["w_up"])
            params = {**state.params, "blocks": {**state.params["blocks"], "mlp": {**mlp, "w_up": w_up}}}
            return state._replace(params=params), metrics

        return jax.jit(step_then_poison, donate_argnums=(0,))

    monkeypatch.setattr(train, "make_train_step", poisoned)
    cfg = _config(shards, tmp_path, steps=8, ckpt_every=2, val_every=0)
    with pytest.raises(checkpoint.NonFiniteError) as error:
        train.run(cfg)
    message = str(error.value)
    # Step 5's own loss was finite; step 6 is the first to see the NaNs.
    assert message.startswith("step 6 went non-finite (") and "train_loss=nan" in message
    assert "entering step 6: params: blocks/mlp/w_up; optimizer state: none; gradients" in message
    [run_dir] = Path(cfg.train.out_dir).iterdir()
    assert f"The last good checkpoint is {run_dir / 'checkpoints' / '4'}." in message
    assert "error: step 6 went non-finite" in (run_dir / "log.txt").read_text()
    assert [p.name for p in checkpoint.step_dirs(run_dir / "checkpoints")] == ["2", "4"]
    _, params = jaxrun.load_checkpoint(run_dir)  # intact: checksums verified
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_load_checkpoint_returns_config_and_params(shards, tmp_path, monkeypatch):
    run, cfg, state = _saved_init(shards, tmp_path)
    monkeypatch.chdir(tmp_path)  # orbax wants absolute paths; a relative one must work too
    for path in (run, run / "checkpoints" / "0", "run", Path("run") / "checkpoints"):
        loaded_cfg, params = jaxrun.load_checkpoint(path)
        assert loaded_cfg == cfg
        assert jax.tree.structure(params) == jax.tree.structure(state.params)
        _assert_trees_equal(params, state.params)
        assert all(x.devices() == {jax.devices()[0]} for x in jax.tree.leaves(params))
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        jaxrun.load_checkpoint(tmp_path / "nothing-here")


def test_what_load_checkpoint_returns_feeds_the_notebook_api(shards, tmp_path):
    """The whole Config it returns works where a ModelConfig does: apply, generate."""
    run, _, _ = _saved_init(shards, tmp_path)
    cfg, params = jaxrun.load_checkpoint(run)
    params = jax.tree.map(lambda x: x + 0.01, params)  # the zero-init head would give equal logits
    ids = jnp.arange(16)[None] % cfg.model.vocab_size
    np.testing.assert_array_equal(model.apply(params, ids, cfg), model.apply(params, ids, cfg.model))
    for c in (cfg, cfg.model):
        assert jaxrun.generate(params, c, "Hi", 4, temperature=0.0).startswith("Hi")


def test_importing_jaxrun_loads_nothing_heavy():
    code = "import sys, jaxrun; assert 'jax' not in sys.modules and 'orbax' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.slow
def test_eval_and_fine_tune_start_from_a_checkpoints_params(shards, tmp_path, capsys):
    """`launch.py eval` scores the saved params; `train.init_from` starts a new run from them at step 0."""
    from jaxrun import cli

    cfg = _config(shards, tmp_path / "runs", steps=2, val_every=1, ckpt_every=0)
    state = train.init_state(cfg, jax.random.key(1), sharding.make_mesh(cfg.mesh))
    leaves, tree = jax.tree.flatten(state.params)  # trained-looking params: not the zero-head init
    keys = jax.random.split(jax.random.key(2), len(leaves))
    noisy = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    params = jax.tree.unflatten(tree, noisy)
    ckpt = checkpoint.Checkpointer(cfg, tmp_path / "base", log=lambda line: None)
    ckpt.step_done(7, state._replace(params=params), checkpoint.Position({}), 0.0, force=True)
    ckpt.close()

    _, score = cli.score(str(tmp_path / "base"), [f"data.val_files={shards}/val_*.bin"])
    assert launch.main(["eval", str(tmp_path / "base")]) == 0
    assert f"val_loss:{score:.4f} on 512 tokens of {shards}/val_*.bin" in capsys.readouterr().out

    fine = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=str(tmp_path / "base")))
    result = train.run(fine)
    records = _records(Path(result["run_dir"]))
    assert Path(result["run_dir"]).parent == tmp_path / "runs"  # a new run dir, not the checkpoint's
    assert records[0]["step"] == 0 and records[0]["val_loss"] == pytest.approx(score, abs=1e-6)
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2]  # from step 0, not 7
    with pytest.raises(ConfigError, match="do not fit this model"):
        bigger = apply_overrides(fine, ["model.model_dim=128"])
        train.run(bigger)


class _StateBeforeFP8(NamedTuple):
    """TrainState as it was before it carried the MLP's delayed FP8 scales."""

    step: jax.Array
    params: dict
    opt_state: tuple


def test_a_checkpoint_from_before_the_fp8_field_restores(shards, tmp_path):
    """An empty `TrainState.fp8` is left off disk, so older checkpoints (without the field) restore;
    a state that has FP8 scales saves and restores them."""
    cfg = _config(shards, tmp_path)
    ckpt = checkpoint.Checkpointer(cfg, tmp_path)
    ckpt.step_done(
        1, _StateBeforeFP8(jnp.int32(1), {"w": jnp.arange(8.0)}, ()), checkpoint.Position({}), 0.0, True
    )
    scales = {"act_scale": jnp.arange(3.0), "w_scale": jnp.ones(3)}
    state2 = train.TrainState(jnp.int32(2), {"w": -jnp.arange(8.0)}, (), scales)
    ckpt.step_done(2, state2, checkpoint.Position({}), 0.0, True)
    ckpt.close()
    old = checkpoint.Checkpointer(cfg, tmp_path)._restore(
        1, train.TrainState(jnp.int32(0), {"w": jnp.zeros(8)}, ()), checkpoint.Position({})
    )
    assert old.state.fp8 == {} and old.state.params["w"].tolist() == list(range(8))
    like = train.TrainState(jnp.int32(0), {"w": jnp.zeros(8)}, (), jax.tree.map(jnp.zeros_like, scales))
    new = checkpoint.Checkpointer(cfg, tmp_path)._restore(2, like, checkpoint.Position({}))
    assert new.state.fp8["act_scale"].tolist() == [0.0, 1.0, 2.0]
