"""The jitted train step, eval, and the timed training loop.

`make_train_step(cfg, mesh)` returns one compiled program for the whole
update: forward and backward over every micro-batch (a `lax.scan`), the
gradient all-reduce XLA inserts for the data-parallel mesh, and the optimizer.
The state is donated. `run(cfg)` is what `launch.py` calls: it compiles ahead
of time, warms up, re-initializes (so timing excludes compilation, the
speedrun's rule), then trains, evaluating and logging in the speedrun's format.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrun import adam_hold, checkpoint, loop_control, model, optim, record_optim, schedule, sharding
from jaxrun import data as data_lib
from jaxrun.config import Config, ConfigError
from jaxrun.model import kernels as model_kernels
from jaxrun.model import mlp_fp8
from jaxrun.runlog import RunLog
from jaxrun.step_clock import StepClock


class TrainState(NamedTuple):
    step: jax.Array
    params: model.Params
    opt_state: optax.OptState
    fp8: dict = {}  # noqa: RUF012  the MLP's delayed FP8 scales (model.mlp.fp8_down), replicated; else empty
    # Adam's gradients summed on each device since its last update, unreduced, flat, by param path
    # (`jaxrun.adam_hold`, record #77's Adam on several devices); else empty
    held: dict = {}  # noqa: RUF012


def grad_accum_steps(cfg: Config, num_devices: int, batch_seqs: int | None = None) -> int:
    """Micro-batches per step, so that batch_seqs = accum · micro_batch_seqs · devices."""
    batch_seqs = cfg.data.batch_seqs if batch_seqs is None else batch_seqs
    per_pass = cfg.train.micro_batch_seqs * num_devices
    if batch_seqs % per_pass:
        raise ConfigError(
            f"data.batch_seqs={batch_seqs} is not a multiple of train.micro_batch_seqs="
            f"{cfg.train.micro_batch_seqs} × {num_devices} devices"
        )
    return batch_seqs // per_pass


def layouts(cfg: Config, params: model.Params):
    """Each leaf's ownership under the sharded optimizer (see `sharding.Layout`)."""
    if not cfg.mesh.shard_optimizer:
        return jax.tree.map(lambda _: sharding.Layout.REPLICATED, params)
    muon = cfg.optim.kind in ("muon_adam", "normuon_adam")
    return jax.tree.map(
        lambda label: sharding.Layout.LAYERS if muon and label == "hidden" else sharding.Layout.FLAT,
        optim.param_labels(params),
    )


def _opt_state_specs(cfg: Config, mesh: jax.sharding.Mesh, tx: optax.GradientTransformation):
    """PartitionSpecs of the optimizer state, built on each device's owned parts."""
    axis = mesh.axis_names[0]
    params = jax.eval_shape(lambda key: model.init(key, cfg.model), jax.random.key(0))
    lay = layouts(cfg, params)

    def local_state(params):
        return tx.init(jax.tree.map(lambda p, l: sharding.owned_part(p, l, axis), params, lay))

    shapes = jax.eval_shape(
        jax.shard_map(local_state, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False), params
    )
    return sharding.state_specs(shapes, axis, cfg.mesh.shard_optimizer)


def init_state(cfg: Config, key: jax.Array, mesh: jax.sharding.Mesh) -> TrainState:
    """Fresh params, replicated, and the optimizer state of each device's owned parts."""
    tx, axis = optim.make_optimizer(cfg), mesh.axis_names[0]
    specs = _opt_state_specs(cfg, mesh, tx)

    def build(key):
        params = model.init(key, cfg.model)
        lay = layouts(cfg, params)

        def local_state(params):
            return tx.init(jax.tree.map(lambda p, l: sharding.owned_part(p, l, axis), params, lay))

        opt_state = jax.shard_map(local_state, mesh=mesh, in_specs=P(), out_specs=specs)(params)
        held = adam_hold.held_state(cfg, params, mesh.size)
        return TrainState(jnp.zeros((), jnp.int32), params, opt_state, fp8_state(cfg, params), held)

    out = TrainState(P(), P(), specs, P(), P(axis))
    return jax.jit(build, out_shardings=jax.tree.map(lambda s: NamedSharding(mesh, s), out))(key)


def fp8_state(cfg: Config, params: model.Params) -> dict:
    """The train state's delayed FP8 scales at step 0 (empty unless model.mlp.fp8_down)."""
    return mlp_fp8.init_state(params["blocks"]["mlp"]["w_down"]) if cfg.model.mlp.fp8_down else {}


def make_train_step(
    cfg: Config, mesh: jax.sharding.Mesh, mode: model.Mode | None = None, adam_step: bool | None = None
):
    """`step(state, batch) -> (state, metrics)`, jitted with the state donated.

    `batch` holds int32 `inputs` and `targets` (and `segment_ids`) shaped
    [accum, seqs, T], the sequences split over the mesh. Inside one `shard_map`,
    each device sums gradients over its micro-batches, reduce-scatters them so
    it holds the total for the params it owns, updates those with its optimizer
    state, and all-gathers the new params. `mode` is where training is (see
    `jaxrun.schedule`; by default step 0's); multi-token weights follow the step.
    Where Adam's gradients wait on each device (`adam_hold.holds_adam_grads`), `adam_step`
    says which variant this is: the step Adam updates on, or one in between
    (`adam_hold.adam_step_of` gives it for a step). The logged `grad_norm` is the norm of the
    gradients reduced on the step: on steps in between, NorMuon's only.
    While the embedding is tied to the head, it is set to the head's transpose
    after each update, so every reader of the params sees the tied weights.
    """
    _check_kernels_can_train(cfg, mesh)
    holding = adam_hold.holds_adam_grads(cfg, mesh.size)
    if holding != (adam_step is not None):
        raise ValueError(
            f"adam_step={adam_step}: give it exactly when Adam's gradients wait on each device "
            f"(here {'they do' if holding else 'they do not'}); `adam_step_of` gives it for a step"
        )
    mode = schedule.train_mode(cfg, 0) if mode is None else mode
    tx, axis = optim.make_optimizer(cfg), mesh.axis_names[0]
    local_grads = _local_grads(cfg, mesh.axis_names, mode)
    specs = _opt_state_specs(cfg, mesh, tx)
    sharded = cfg.mesh.shard_optimizer

    def local_step(params, opt_state, fp8, held, batch, step):
        lay = layouts(cfg, params)
        w_down_before = params["blocks"]["mlp"]["w_down"]  # the delayed weight scale reads it (fp8_down)
        grads, loss_sum, count, act_amax = local_grads(
            params, batch, schedule.multi_token_weights(cfg, step), fp8
        )
        # The count goes as float32 (exact to 2^24 tokens a step), so one all-reduce carries the
        # loss sum, the count and the squared gradient norm below: a collective fewer a step
        loss_sum, count = jax.lax.psum((loss_sum, count.astype(jnp.float32)), axis)
        waiting = adam_hold.waiting_leaves(grads, held, adam_step, mode.tied)  # leaves that move nothing
        grads, held = adam_hold.hold_grads(grads, held, adam_step)
        grads = jax.tree.map(
            lambda g, l, w: adam_hold.owned_zeros(g, l, axis) if w else sharding.reduce_grad(g, l, axis),
            grads,
            lay,
            waiting,
        )
        if cfg.optim.loss_reduction == "mean":
            grads = jax.tree.map(lambda g: g / count, grads)
        elif cfg.optim.loss_reduction == "rank_mean":  # each rank's summed loss, averaged over ranks
            grads = jax.tree.map(lambda g: g / cfg.data.ranks, grads)
        sq = sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))
        norm = jnp.sqrt(jax.lax.psum(sq, axis) if sharded else sq)
        grads = optim.clip_by_norm(grads, norm, cfg.optim.grad_clip_norm)
        owned = jax.tree.map(lambda p, l: sharding.owned_part(p, l, axis), params, lay)
        updates, opt_state = tx.update(grads, opt_state, owned)
        owned = optax.apply_updates(owned, updates)
        params = jax.tree.map(  # a waiting leaf had no update: it keeps the param it came in with
            lambda p, l, q, w: q if w else sharding.gather_param(p, l, axis, q.shape),
            owned,
            lay,
            params,
            waiting,
        )
        if mode.tied:  # the embedding follows the head it is tied to (record #77 syncs it the same way)
            params["embed"]["tokens"] = params["lm_head"]["w"].T
        if fp8:  # every device sets the same scales: the max activation amax over the mesh
            amax = jax.lax.pmax(act_amax, axis)
            fp8 = mlp_fp8.next_state(amax, w_down_before, params["blocks"]["mlp"]["w_down"], step)
        return params, opt_state, fp8, held, {"train_loss": loss_sum / count, "grad_norm": norm}

    batch_spec = sharding.batch_sharding(mesh).spec
    sharded_step = jax.shard_map(
        local_step,
        mesh=mesh,
        in_specs=(P(), specs, P(), P(axis), batch_spec, P()),
        out_specs=(P(), specs, P(), P(axis), P()),
    )

    lr_factor = optim.lr_factor_of(cfg)

    def step(state: TrainState, batch: dict[str, jax.Array]):
        params, opt_state, fp8, held, metrics = sharded_step(
            state.params, state.opt_state, state.fp8, state.held, batch, state.step
        )
        metrics = {**metrics, "lr_factor": lr_factor(state.step)}  # this update's share of each base lr
        return TrainState(state.step + 1, params, opt_state, fp8, held), metrics

    return jax.jit(step, donate_argnums=(0,))


def _check_kernels_can_train(cfg: Config, mesh: jax.sharding.Mesh) -> None:
    """Pallas and Mosaic kernels train on GPUs only, the Mosaic ones on Hopper: elsewhere they need
    the interpreter or the Mosaic GPU simulator, which shard_map breaks."""
    k = cfg.model.kernels
    chosen = {f"model.kernels.{f.name}": getattr(k, f.name) for f in dataclasses.fields(k)}
    chosen["optim.muon_ns_impl"] = cfg.optim.muon_ns_impl
    fields = [f"{name}={impl!r}" for name, impl in chosen.items() if impl in ("pallas", "mosaic")]
    device = mesh.devices.flat[0]
    if fields and device.platform != "gpu":
        raise ConfigError(
            f"{', '.join(fields)} train on GPUs only, but the mesh is on {device.platform}: the Pallas "
            "interpreter and the Mosaic GPU simulator that run the kernels elsewhere do not work inside "
            "shard_map. Use 'xla' or 'auto' here (model.loss still runs the kernels interpreted, for checks)."
        )
    hopper_only = ", ".join(
        f"model.kernels.{n}='mosaic'" for n in ("mlp", "attention", "fp8_logits") if getattr(k, n) == "mosaic"
    )
    if hopper_only and not model_kernels.on_hopper(device):
        raise ConfigError(
            f"{hopper_only} runs Hopper (sm_90) kernels, but the mesh's GPUs are {device.device_kind}: "
            "use 'auto' or 'pallas'"
        )


def _local_grads(cfg: Config, axes: tuple[str, ...], mode: model.Mode | None = None):
    """Summed token loss, its gradient and the token count over this device's micro-batches."""
    mode = schedule.train_mode(cfg, 0) if mode is None else mode

    def summed_loss(params, fp8, micro, multi_token_weights):
        losses_BT = model.token_losses(params, micro, cfg.model, mode, multi_token_weights, fp8 or None)
        return losses_BT.sum(), (micro["targets"] >= 0).sum()

    def local_grads(params, batch, multi_token_weights=None, fp8=None):
        """(summed gradients, loss sum, token count, the MLP's activation amax [L] or None)."""
        # Differentiate a per-device copy: gradients of the replicated params would come
        # back already psum-ed, once per micro-batch. Local sums are reduced once, outside.
        params, fp8 = jax.lax.pcast((params, fp8 or {}), axes, to="varying")

        def accumulate(carry, micro):
            grads, amax, loss_sum, count = carry
            (micro_loss, micro_count), (micro_grads, micro_fp8) = jax.value_and_grad(
                summed_loss, argnums=(0, 1), has_aux=True
            )(params, fp8, micro, multi_token_weights)
            if fp8:  # the "gradient" of each activation scale is its amax (mlp_fp8): a max, not a sum
                amax = jnp.maximum(amax, micro_fp8["act_scale"])
            return (
                jax.tree.map(jnp.add, grads, micro_grads),
                amax,
                loss_sum + micro_loss,
                count + micro_count,
            ), None

        amax0 = jnp.zeros_like(fp8["act_scale"]) if fp8 else None
        sums = jax.lax.pcast((jnp.float32(0), jnp.int32(0)), axes, to="varying")  # per device until the psum
        (grads, amax, loss_sum, count), _ = jax.lax.scan(
            accumulate, (jax.tree.map(jnp.zeros_like, params), amax0, *sums), batch
        )
        return grads, loss_sum, count, amax

    return local_grads


def make_eval_step(cfg: Config, mesh: jax.sharding.Mesh, mode: model.Mode | None = None):
    """`eval_step(params, batch) -> summed token loss` over a [seqs, T] batch, in eval `mode`
    (by default the final validation's)."""
    mode = schedule.eval_mode(cfg, cfg.train.steps) if mode is None else mode

    def local_eval(params, batch):
        return model.token_losses(params, batch, cfg.model, mode).sum()

    return jax.jit(sharding.data_parallel(mesh, local_eval, batch_spec=sharding.eval_sharding(mesh).spec))


def evaluate(eval_step, params, val: dict[str, np.ndarray], cfg: Config, mesh) -> float:
    """Mean val loss over the val tokens, in chunks of val_batch_seqs per device.

    Every process holds all val rows and hands in its share of each chunk.
    """
    chunk = cfg.data.val_batch_seqs * mesh.size
    share = chunk // jax.process_count()
    mine = jax.process_index() * share
    total, num_chunks = 0.0, len(val["inputs"]) // chunk
    for start in range(0, num_chunks * chunk, chunk):
        local = {k: v[start + mine : start + mine + share] for k, v in val.items()}
        total += eval_step(params, sharding.global_batch(local, sharding.eval_sharding(mesh)))
    return float(total) / (num_chunks * chunk * val["inputs"].shape[1])


def _stack_micro(local: dict[str, np.ndarray], accum: int) -> dict[str, np.ndarray]:
    return {k: v.reshape(accum, -1, *v.shape[1:]) for k, v in local.items()}


def _load_data(cfg: Config, mesh) -> tuple[Any, dict[str, np.ndarray], float]:
    """The train stream for this process, the val arrays, and the unigram baseline loss."""
    d = cfg.data
    if d.source == "sotu":
        from jaxrun.data import demo_corpus

        train_files, val_files = demo_corpus.prepare(d.cache_dir)
    else:
        train_files, val_files = data_lib.find_shards(d.train_files), data_lib.find_shards(d.val_files)
    common = {
        "batch_seqs": d.batch_seqs,
        "seq_len": d.seq_len,
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "stages": data_stages(cfg)[1:],
        "prefetch": d.prefetch,
        "vocab_size": cfg.model.vocab_size,
    }
    if d.mode == "record":
        stream = data_lib.RecordStream(train_files, max_doc_len=d.max_doc_len, ranks=d.ranks, **common)
    elif d.mode == "documents":
        stream = data_lib.DocumentStream(train_files, max_doc_len=d.max_doc_len, **common)
    else:
        stream = data_lib.TokenStream(train_files, **common)
    val = load_val(cfg, mesh, val_files)
    first = data_lib.read_shard(train_files[0])
    data_lib.check_token_ids(first, cfg.model.vocab_size, train_files[0])
    return stream, val, unigram_loss(first, val["targets"], cfg.model.vocab_size)


def load_val(cfg: Config, mesh, val_files: list) -> dict[str, np.ndarray]:
    """The val rows `evaluate` scores, from `val_files`; ConfigError if they fill no eval chunk."""
    d = cfg.data
    chunk = d.val_batch_seqs * mesh.size
    val_inputs, val_targets = data_lib.val_batches(
        val_files, num_tokens=d.val_tokens, seq_len=d.val_len, vocab_size=cfg.model.vocab_size
    )
    if len(val_inputs) < chunk:
        raise ConfigError(
            f"data.val_tokens={d.val_tokens} gives {len(val_inputs)} sequences, fewer than one eval chunk "
            f"of data.val_batch_seqs={d.val_batch_seqs} × {mesh.size} devices"
        )
    val = {"inputs": val_inputs, "targets": val_targets}
    if d.mode == "record":  # record #77 masks val documents too, from the BOS positions in each row
        val["segment_ids"] = data_lib.segment_ids(val_inputs)
    return val


def data_stages(cfg: Config) -> list[data_lib.Stage]:
    """The batch-shape schedule: stage 0 from data.batch_seqs/seq_len/max_doc_len, then data.stages."""
    d = cfg.data
    first = data_lib.Stage(step=0, batch_seqs=d.batch_seqs, seq_len=d.seq_len, max_doc_len=d.max_doc_len)
    later = [data_lib.Stage(step=s, batch_seqs=b, seq_len=t, max_doc_len=m) for s, b, t, m in d.stages]
    return [first, *later]


def variant_key(cfg: Config, num_devices: int, step: int) -> tuple[Any, tuple[int, ...], bool | None]:
    """What the step compiled for `step` depends on: (mode, batch shape, `adam_step_of`)."""
    stage = data_lib.stage_at(step, data_stages(cfg))
    accum = grad_accum_steps(cfg, num_devices, stage.batch_seqs)
    shape = (accum, stage.batch_seqs // accum, stage.seq_len)
    return schedule.train_mode(cfg, step), shape, adam_hold.adam_step_of(cfg, num_devices, step)


def _compile_stages(
    state: TrainState, cfg: Config, mesh, steps: range | None = None
) -> dict[tuple[Any, tuple[int, ...], Any], Any]:
    """Compile the step ahead of time for every variant run at `steps` (default: the whole schedule)
    and at step 0 (the warm-up's), keyed by `variant_key`."""
    steps = range(cfg.train.steps) if steps is None else steps
    keys = ("inputs", "targets") if cfg.data.mode == "contiguous" else ("inputs", "targets", "segment_ids")
    split = schedule.split_step(cfg)
    firsts = {steps.start, *schedule.stage_starts(cfg), *(stage.step for stage in data_stages(cfg))}
    firsts |= {split, split + 1} if split is not None else set()
    firsts |= {s + 1 for s in firsts}  # both Adam variants of each stretch, where there are two
    lowered = {}  # tracing and lowering run Python, one variant at a time
    for step in sorted({0} | {s for s in firsts if s in steps}):
        key = variant_key(cfg, mesh.size, step)
        if key not in lowered:
            spec = jax.ShapeDtypeStruct(key[1], jnp.int32, sharding=sharding.batch_sharding(mesh))
            step_fn = make_train_step(cfg, mesh, key[0], adam_step=key[2])
            lowered[key] = step_fn.lower(state, dict.fromkeys(keys, spec))
    # XLA compiles without the GIL: with several threads the variants compile side by side
    with ThreadPoolExecutor(cfg.train.compile_threads or len(lowered)) as pool:
        return dict(zip(lowered, pool.map(lambda low: low.compile(), lowered.values()), strict=True))


def make_untie(state: TrainState):
    """`untie(state) -> state`: the embedding leaves the head, with its copy of the head's Adam moments."""

    shardings = jax.tree.map(lambda x: x.sharding, state)

    def untie(state: TrainState) -> TrainState:
        # on whole arrays: the copy transposes leaves that ZeRO-1 holds flat and split
        params, opt_state = jax.tree.map(
            lambda x, s: jax.sharding.reshard(x, NamedSharding(s.mesh, P())),
            (state.params, state.opt_state),
            (shardings.params, shardings.opt_state),
        )
        params, opt_state = record_optim.untie(params, opt_state)
        return state._replace(params=params, opt_state=opt_state)

    return jax.jit(untie, out_shardings=shardings, donate_argnums=(0,))


def val_due(cfg: Config, step: int) -> bool:
    """Whether the loop validates before `step`: every val_every steps, every val_every_late from 90%
    of the run on (train_gpt_simple.py's rule, `step / steps < 0.9`), and always at the end."""
    t = cfg.train
    every = t.val_every_late if t.val_every_late and step >= 0.9 * t.steps else t.val_every
    return step == t.steps or (every > 0 and step % every == 0)


def tokens_trained(cfg: Config, steps: int) -> int:
    stages = data_stages(cfg)
    return sum(data_lib.stage_at(step, stages).tokens for step in range(steps))


def unigram_loss(train_tokens: np.ndarray, val_targets: np.ndarray, vocab_size: int) -> float:
    """Val loss of the add-one-smoothed unigram model of the train tokens: the bar to clear."""
    counts = np.bincount(np.asarray(train_tokens), minlength=vocab_size)[:vocab_size] + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[val_targets.reshape(-1)].mean())


def peak_device_gib() -> float | None:
    """The most memory this process's first device has held, in GiB (None where the backend keeps
    no count, as the CPU's does not). With preallocation the pool is reserved up front; this is
    what the arrays in it took at their peak."""
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def run(cfg: Config, resume: str | None = None) -> dict[str, Any]:
    """Train `cfg` end to end; returns the final metrics. Logs go to cfg.train.out_dir.

    `resume` names a run dir to continue, from its newest good checkpoint, logging
    into it. SIGTERM and SIGINT save a checkpoint at the next step boundary and
    return early, with `stopped_by` set (see `jaxrun.loop_control`).
    """
    try:
        with loop_control.StopSignals() as stop, StepClock() as step_times:
            return _run(cfg, resume, stop, step_times)
    finally:
        gc.unfreeze()  # _run freezes the objects made during setup for the loop (see there)


def _run(
    cfg: Config, resume: str | None, stop: loop_control.StopSignals, step_times: StepClock
) -> dict[str, Any]:
    mesh = sharding.make_mesh(cfg.mesh)
    accums = [grad_accum_steps(cfg, mesh.size, stage.batch_seqs) for stage in data_stages(cfg)]
    wall_t0, eval_s = time.perf_counter(), 0.0
    log = RunLog(cfg, resume)
    ckpt = checkpoint.Checkpointer(cfg, log.run_dir, log=log.info)
    if resume:  # refuse a config that changes the state's shapes before compiling anything
        ckpt.check_compatible(jax.eval_shape(lambda: init_state(cfg, jax.random.key(cfg.train.seed), mesh)))
    log.header(mesh)
    stream, val, baseline = _load_data(cfg, mesh)
    eval_steps: dict[model.Mode, Any] = {}  # one per eval mode, compiled at its first use
    batch_sharding = sharding.batch_sharding(mesh)

    def next_batch():
        local = next(stream)
        accum = grad_accum_steps(cfg, mesh.size, len(local["inputs"]) * jax.process_count())
        return sharding.global_batch(_stack_micro(local, accum), batch_sharding)

    key = jax.random.key(cfg.train.seed)
    state = init_state(cfg, key, mesh)
    # Fine-tuning: a checkpoint's params, a fresh optimizer and step 0 (a resume restores all three).
    init_params = checkpoint.init_params(cfg.train.init_from, state.params, log.info) if not resume else None
    log.info(
        f"params: {model.count_params(state.params):,}  grad accumulation: {accums}  devices: {mesh.size}"
    )
    log.info(f"unigram baseline val_loss (first train shard): {baseline:.4f}")

    data_state = stream.get_state()
    t0 = time.perf_counter()
    # Only what this run will reach: from the checkpoint a resume starts at to the end or the pause.
    newest = checkpoint.step_dirs(ckpt.directory) if resume else []
    first = int(newest[-1].name) if newest else 0
    end = cfg.train.stop_after if first < cfg.train.stop_after else cfg.train.steps
    variants = _compile_stages(state, cfg, mesh, range(first, end))
    split, untie = (
        schedule.split_step(cfg),
        make_untie(state) if schedule.split_step(cfg) is not None else None,
    )
    compile_s = time.perf_counter() - t0

    def compiled(state, batch, step=None):  # the step compiled for this step's variant
        step = int(state.step) if step is None else step
        mode, _, adam_step = variant_key(cfg, mesh.size, step)
        key = (mode, batch["inputs"].shape, adam_step)
        if key not in variants:  # the resume fell back past a damaged checkpoint to an earlier stage
            log.info(f"compiling step {step}'s variant, which this run did not expect to reach")
            variants[key] = make_train_step(cfg, mesh, mode, adam_step).lower(state, batch).compile()
        return variants[key](state, batch)

    state, _ = compiled(state, next_batch(), 0)  # warm-up step, then start again from scratch
    jax.block_until_ready(state)
    ckpt.warm_up(state)
    stream.set_state(data_state)
    state = init_state(cfg, key, mesh)
    state = state if init_params is None else state._replace(params=init_params)
    start, train_ms = 0, 0.0
    if resume:
        state, start, train_ms = ckpt.resume(state, stream)
        log.rewind(start)  # metrics past the restored step are logged again
    log.info(f"compile: {compile_s:.1f}s for {len(variants)} step variant(s) (excluded from train_time)")

    steps, val_loss = cfg.train.steps, float("nan")
    pause = cfg.train.stop_after if start < cfg.train.stop_after else None  # a resume goes past it
    progress = log.progress(steps)
    pending = None  # (step, metrics, its end on the step clock) dispatched but not yet read

    def read_pending():
        done, metrics = pending[0], jax.device_get(pending[1])  # one transfer; waits for that step
        log.train_metrics(done, {**metrics, "step_ms": step_times.step_ms(pending[2])})
        progress.update(done)
        if not loop_control.all_finite(metrics):  # stop, naming the leaves that went non-finite
            stream.set_state(data_state)
            fresh = init_state(cfg, key, mesh)
            loop_control.stop_nonfinite(ckpt, done, metrics, fresh, stream, compiled, next_batch)

    # Setup made millions of long-lived objects (jax, the compiled steps); frozen, the cyclic
    # collector's full passes skip them instead of stalling the loop for tens of milliseconds.
    gc.collect()
    gc.freeze()
    t0 = time.perf_counter()
    step_times.restart()
    for step in range(start, steps + 1):
        last = step == steps
        if val_due(cfg, step) or step == pause:
            jax.block_until_ready(state)
            # the clock stops for eval; t0 now times the eval
            t0, train_ms = time.perf_counter(), train_ms + 1000 * (time.perf_counter() - t0)
            if pending is not None:
                read_pending()
                pending = None
            mode = schedule.eval_mode(cfg, step)
            if mode not in eval_steps:
                eval_steps[mode] = make_eval_step(cfg, mesh, mode)
            val_loss = evaluate(eval_steps[mode], state.params, val, cfg, mesh)
            log.val(step, val_loss, train_ms, train_ms / step if step else float("nan"))
            t0, eval_s = time.perf_counter(), eval_s + time.perf_counter() - t0
            step_times.restart()
        if last or step == pause:
            break
        state, metrics = compiled(state, next_batch(), step)
        if step == split:  # after the split step's update the embedding and head go separate ways
            state = untie(state)
        if pending is not None:  # read step n-1's metrics while step n runs
            read_pending()
        pending = (step + 1, metrics, step_times.watch(metrics))
        clock = train_ms + 1000 * (time.perf_counter() - t0)
        ckpt.step_done(step + 1, state, stream, clock, force=stop.signal is not None or step + 1 == pause)
        if stop.signal is not None:
            break
    progress.close()
    if pending is not None:  # stopped by a signal before reading the last step's metrics
        read_pending()
    ckpt.close()
    if not last and stop.signal is None:  # the stop_after pause: validated, checkpointed
        log.info(
            f"paused after step {pause} (train.stop_after), with a checkpoint; "
            f"continue with: python launch.py --resume {log.run_dir}"
        )
        log.close()
        paused = {"stopped_by": "stop_after", "step": pause, "val_loss": val_loss, "train_time_ms": train_ms}
        return {**paused, "state": state, "run_dir": str(log.run_dir)}
    if not last:
        log.info(
            f"stopped by {stop.signal.name} after step {step + 1}, with a checkpoint; "
            f"continue with: python launch.py --resume {log.run_dir}"
        )
        log.close()
        stopped = {"stopped_by": stop.signal.name, "signal": int(stop.signal), "step": step + 1}
        return {**stopped, "state": state, "run_dir": str(log.run_dir)}
    result = {
        "val_loss": val_loss,
        "unigram_val_loss": baseline,
        "train_time_ms": train_ms,
        "step_avg_ms": train_ms / steps,
        "compile_s": compile_s,
        "tokens_per_s": tokens_trained(cfg, steps) / (train_ms / 1000),
        "ckpt_stall_ms": ckpt.stall_ms,
        "eval_s": eval_s,
        "peak_device_gib": peak_device_gib(),
    }
    t0 = time.perf_counter()
    if cfg.train.sample_tokens:
        from jaxrun import sample

        text = sample.generate_text(state.params, cfg, cfg.train.sample_prompt, cfg.train.sample_tokens)
        log.info("sample:\n" + text)
    result |= {"sample_s": time.perf_counter() - t0, "wall_s": time.perf_counter() - wall_t0}
    log.finish(result)
    log.close()
    return {**result, "state": state, "run_dir": str(log.run_dir)}
