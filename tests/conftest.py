"""Test setup: eight host devices for sharding tests, quicker CPU compiles, strict rank promotion, inline CPU dispatch."""

import os

# Off a GPU node, LLVM at -O1 rather than -O2: the suite's time is mostly XLA compiling for the CPU,
# and at -O1 a record77 step variant compiles in 8 s rather than 10 s and runs no slower at the
# tests' sizes. The flag would also reach XLA's GPU code, so a GPU node keeps the default.
_CPU_ONLY = not os.path.exists("/dev/nvidiactl")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    + (" --xla_backend_optimization_level=1" if _CPU_ONLY else "")
).strip()

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
# The Mosaic GPU simulator's callbacks dispatch JAX ops of their own from worker threads. With async
# dispatch, an op the test enqueues behind a simulated kernel can take the CPU client's last worker
# while it waits on that kernel, and the kernel's callbacks then wait forever (seen on 2-core CI
# machines). Inline, a computation has finished before the test's next op is dispatched.
jax.config.update("jax_cpu_enable_async_dispatch", False)


def pytest_collection_modifyitems(config, items):
    on_gpu = any(d.platform == "gpu" for d in jax.devices())
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not on_gpu:
            item.add_marker(skip_gpu)


@pytest.fixture
def tiny_cfg():
    """The `simple` recipe shrunk to D=64, L=2, V=256, T=64, in float32."""
    from jaxrun.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig

    return Config(
        name="tiny",
        model=ModelConfig(
            num_layers=2, model_dim=64, head_dim=16, vocab_size=256, max_seq_len=64, compute_dtype="float32"
        ),
        optim=OptimConfig(),
        data=DataConfig(seq_len=64, batch_seqs=8, val_tokens=64 * 8, val_batch_seqs=1),
        train=TrainConfig(steps=4, micro_batch_seqs=8, val_every=2, progress=False),
    )
