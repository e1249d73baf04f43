"""The command line: inputs it cannot use end in one `error:` line and exit code 2, never a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _launch(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "launch.py", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "README.md"], "README.md is not a config module"),  # was an AttributeError
        (["--set", "train.steps=ten"], "--set train.steps='ten': not a valid value"),  # ConfigError
        (["--resume", "no-such-run"], "no checkpoint to resume from in no-such-run"),  # no saved config
        (["eval", "no-such-run"], "no checkpoint in"),  # CheckpointError
    ],
    ids=["not_a_config", "config_error", "nothing_to_resume", "checkpoint_error"],
)
def test_bad_inputs_give_one_line(args, message):
    done = _launch(*args)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [done.stderr.strip()], done.stderr  # one line
    assert done.stderr.startswith("error: ") and message in done.stderr, done.stderr


def test_missing_shards_give_one_line(tmp_path):
    """A ShardError from deep in the run, after the devices are up."""
    done = _launch(
        "--set", "data.source=shards", "--set", f"data.train_files={tmp_path}/none_*.bin",
        "--set", f"train.out_dir={tmp_path}",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr, done.stderr


def test_print_config_into_a_closed_pipe_is_quiet():
    """`launch.py --print-config | head -1`: the reader leaves before the config is written."""
    cmd = [sys.executable, "launch.py", "--print-config"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # as `head` does once it has its lines
    stderr = proc.communicate(timeout=120)[1]
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
