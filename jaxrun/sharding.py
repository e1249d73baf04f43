"""The device mesh and every PartitionSpec the train step uses.

jaxrun is data parallel: one mesh axis, `dp`, over all devices. Batches are
split along their sequence axis; params are replicated. Current JAX makes mesh
axes Explicit by default, so arrays are placed with a matching NamedSharding.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxrun.config import ConfigError, MeshConfig


def make_mesh(cfg: MeshConfig) -> Mesh:
    """A 1-D data-parallel mesh over `cfg.num_devices` devices (all by default)."""
    available = jax.device_count()
    n = available if cfg.num_devices is None else cfg.num_devices
    if n > available:
        raise ConfigError(f"mesh.num_devices={n} but only {available} devices are visible")
    return jax.make_mesh((n,), (cfg.axis,), devices=jax.devices()[:n])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[accum, seqs, T] batches: micro-batches in order, sequences over `dp`."""
    return NamedSharding(mesh, P(None, mesh.axis_names[0]))


def eval_sharding(mesh: Mesh) -> NamedSharding:
    """[seqs, T] eval batches, sequences over `dp`."""
    return NamedSharding(mesh, P(mesh.axis_names[0]))


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assemble each process's rows into global arrays laid out by `sharding`."""
    return {name: jax.make_array_from_process_local_data(sharding, x) for name, x in local.items()}


def data_parallel(mesh: Mesh, local_fn, batch_spec: P | None = None):
    """Run `local_fn(params, batch) -> outputs` on each device's rows; sum outputs over `dp`.

    Params come in replicated; every output (gradients, loss sums, counts) is
    `psum`-ed so it leaves replicated. The all-reduce of each gradient is
    free to overlap the backward pass of earlier layers (XLA schedules it).
    """
    axis = mesh.axis_names[0]
    spec = batch_sharding(mesh).spec if batch_spec is None else batch_spec

    def body(params, batch):
        return jax.tree.map(lambda x: jax.lax.psum(x, axis), local_fn(params, batch))

    return jax.shard_map(body, mesh=mesh, in_specs=(P(), spec), out_specs=P())
