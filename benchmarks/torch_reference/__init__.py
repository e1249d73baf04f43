"""The PyTorch twins of jaxrun's recipes, for parity tests and side-by-side benchmarks.

`model.GPT` and `optim.make_optimizers` are written from the recipes' own
sources (train_gpt_simple.py for `simple`, llm.c's train_gpt2.py for
`gpt2_llmc`) and read jaxrun's `Config`, so both frameworks run the same
settings. `convert` carries weights between jaxrun params and torch state;
`worker` is the process `launch.py bench` and tests/test_parity.py start.
torch is optional: nothing in `jaxrun` imports this package at module level,
and this file imports no torch; `torch_python()` finds an interpreter that has it.
"""

import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
TORCH_PYTHON_ENV = "JAXRUN_TORCH_PYTHON"


def torch_python() -> str | None:
    """An interpreter that can import torch: $JAXRUN_TORCH_PYTHON, this one, or ./.venv-torch's."""
    if os.environ.get(TORCH_PYTHON_ENV):
        return os.environ[TORCH_PYTHON_ENV]
    if importlib.util.find_spec("torch") is not None:
        return sys.executable
    local = REPO / ".venv-torch" / "bin" / "python"
    return str(local) if local.exists() else None
