"""One process of the multi-process test: 3 sharded steps of a tiny config, losses printed as JSON.

Run as `python -m tests.distributed_worker` with JAXRUN_COORDINATOR, JAXRUN_NUM_PROCESSES,
JAXRUN_PROCESS_ID set (or none of them, for the single-process baseline).
"""

import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

from jaxrun import sharding

sharding.initialize_distributed()

import jax
import numpy as np

from jaxrun import train
from jaxrun.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig

cfg = Config(
    name="distributed",
    model=ModelConfig(
        num_layers=3,
        model_dim=64,
        head_dim=16,
        vocab_size=256,
        max_seq_len=32,
        compute_dtype="float32",
        init="gpt2",
    ),
    optim=OptimConfig(muon_ns_dtype="float32"),
    data=DataConfig(seq_len=32, batch_seqs=8),
    train=TrainConfig(micro_batch_seqs=1),
)
mesh = sharding.make_mesh(cfg.mesh)
state = train.init_state(cfg, jax.random.key(0), mesh)
step = train.make_train_step(cfg, mesh)
rank, count = jax.process_index(), jax.process_count()
losses = []
for i in range(3):
    tokens = np.random.default_rng(i).integers(0, 256, (8, 33))
    rows = slice(rank * 8 // count, (rank + 1) * 8 // count)  # this process's sequences
    local = {"inputs": tokens[None, rows, :-1], "targets": tokens[None, rows, 1:]}
    state, metrics = step(state, sharding.global_batch(local, sharding.batch_sharding(mesh)))
    losses.append(float(metrics["train_loss"]))
w_up = np.asarray(state.params["blocks"]["mlp"]["w_up"].addressable_data(0))
print(json.dumps({"devices": mesh.size, "losses": losses, "w_up_sum": float(np.abs(w_up).sum())}))
