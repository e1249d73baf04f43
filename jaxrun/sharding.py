"""The device mesh, every PartitionSpec, and the collectives of the train step.

jaxrun is data parallel over one mesh axis, `dp`. Batches are split along
their sequence axis and params are replicated. The optimizer is sharded
(ZeRO-1): gradients are reduce-scattered so each device holds the summed
gradient of only the part of the params it owns, updates that part with its
own slice of the optimizer state, and all-gathers the new params.

Ownership per leaf (its `Layout`):
- LAYERS: Muon's stacked matrices [L, in, out] are split along L, so
  Newton-Schulz always sees whole matrices; L is padded up to a multiple of
  the device count (the padded matrices are zero and stay zero).
- FLAT: Adam's leaves are flattened, padded and split into equal slices.
- REPLICATED: every device updates the whole leaf (the unsharded optimizer,
  `mesh.shard_optimizer=False`), after an all-reduce of its gradient.

Current JAX makes mesh axes Explicit by default, so arrays are placed with a
matching NamedSharding before entering `jax.shard_map`.
"""

from __future__ import annotations

import enum
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrun.config import ConfigError, MeshConfig

# XLA GPU flags for overlapping collectives with compute, set in one place. The
# latency-hiding scheduler orders async reduce-scatters and all-gathers so they
# run behind independent matmuls; NCCL user buffers and NVLink multicast stay off.
XLA_GPU_OVERLAP_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_nccl_user_buffers=false",
)


def set_xla_gpu_flags() -> None:
    """Add the overlap flags to XLA_FLAGS (before jax starts its backend); CPU ignores them."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    names = {f.split("=")[0] for f in flags}
    flags += [f for f in XLA_GPU_OVERLAP_FLAGS if f.split("=")[0] not in names]
    os.environ["XLA_FLAGS"] = " ".join(flags)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast


def initialize_distributed() -> None:
    """Join the other processes of a multi-host run, if this is one.

    Explicit: JAXRUN_COORDINATOR (host:port), JAXRUN_NUM_PROCESSES and
    JAXRUN_PROCESS_ID. Otherwise SLURM or Open MPI launches with several tasks
    are detected by jax. A single process does nothing.
    """
    env = os.environ
    if "JAXRUN_COORDINATOR" in env:
        jax.distributed.initialize(
            coordinator_address=env["JAXRUN_COORDINATOR"],
            num_processes=int(env["JAXRUN_NUM_PROCESSES"]),
            process_id=int(env["JAXRUN_PROCESS_ID"]),
        )
    elif int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        jax.distributed.initialize()


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


class Layout(enum.Enum):
    LAYERS = "layers"
    FLAT = "flat"
    REPLICATED = "replicated"


def _padded(n: int, parts: int) -> int:
    return math.ceil(n / parts) * parts


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
    return jnp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _as_rows(x: jax.Array, layout: Layout, parts: int) -> jax.Array:
    """The leaf as rows to split: [L_pad, ...] for LAYERS, [size_pad] for FLAT."""
    if layout is Layout.LAYERS:
        return _pad_rows(x, _padded(x.shape[0], parts))
    flat = x.reshape(-1)
    return _pad_rows(flat, _padded(flat.shape[0], parts))


def reduce_grad(g: jax.Array, layout: Layout, axis: str) -> jax.Array:
    """Sum a gradient over devices, leaving each device only its own part."""
    if layout is Layout.REPLICATED:
        return jax.lax.psum(g, axis)
    parts = jax.lax.axis_size(axis)
    # async reduce-scatter: XLA overlaps it with the backward pass of earlier layers
    return jax.lax.psum_scatter(_as_rows(g, layout, parts), axis, scatter_dimension=0, tiled=True)


def owned_part(x: jax.Array, layout: Layout, axis: str) -> jax.Array:
    """This device's part of a replicated leaf: the slice `reduce_grad` hands it."""
    if layout is Layout.REPLICATED:
        return x
    parts = jax.lax.axis_size(axis)
    rows = _as_rows(x, layout, parts)
    size = rows.shape[0] // parts
    return jax.lax.dynamic_slice_in_dim(rows, jax.lax.axis_index(axis) * size, size, axis=0)


def gather_param(part: jax.Array, layout: Layout, axis: str, shape: tuple[int, ...]) -> jax.Array:
    """Rebuild a whole leaf from every device's updated part."""
    if layout is Layout.REPLICATED:
        return part
    # async all-gather: XLA overlaps the gather of early leaves with the updates of later ones
    rows = jax.lax.all_gather(part, axis, axis=0, tiled=True, to="invarying")
    if layout is Layout.LAYERS:
        return rows[: shape[0]]
    return rows[: math.prod(shape)].reshape(shape)


def state_specs(tree, axis: str, sharded: bool):
    """PartitionSpecs for optimizer state built on owned parts: arrays split on dim 0, scalars replicated."""
    return jax.tree.map(lambda x: P(axis) if sharded and x.ndim > 0 else P(), tree)
