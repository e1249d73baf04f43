"""The model's part of the config tree: `ModelConfig` and its components' sub-configs.

Each sub-config belongs to the module of jaxrun/model/ named in its docstring, which owns its
params, forward and optimizer rows. Like the rest of the tree this imports no JAX, so the PyTorch
twins read it too. A sub-config set to None is a technique switched off. `jaxrun.config` holds the
whole tree and re-exports these names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from jaxrun.config_checks import check, check_choice


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
    # In training only, as e4m3 GEMMs (records after #77; the backward stays bf16; jaxrun/model/mlp_fp8.py),
    # with the XLA ReLU² path (kernels.mlp="xla"): the up-projection with current scaling, and the
    # down-projection with delayed scaling (its scales carried in the train state).
    fp8_up: bool = False
    fp8_down: bool = False


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


# The softcaps each loss pass takes for a head without FP8 or multi-token loss (None: any).
_LOSS_CAPS = {"xla": None, "xla_fused": ("isru", "tanh"), "pallas": ("isru",)}


@dataclass(frozen=True, kw_only=True)
class KernelConfig:
    """Which implementation runs each kernel (jaxrun/model/kernels.py); the model never branches on it."""

    # "auto": on a GPU cuDNN, or where documents are masked the Pallas kernel ("mosaic" on Hopper);
    # XLA elsewhere.
    # "pallas" runs the Mosaic GPU forward on Hopper where there are no documents, Triton for the
    # rest; "mosaic" runs every pass as a Mosaic GPU kernel, the forward with documents and the
    # backward too (pallas_kernels/attention_mgpu*.py; bf16, heads a multiple of 64, a Hopper GPU).
    attention: Literal["auto", "xla", "cudnn", "pallas", "mosaic"] = "auto"
    # "pallas": the fused linear+ReLU² kernels (Triton); "mosaic": the same, with its two epilogue
    # GEMMs as Hopper wgmma/TMA kernels (pallas_kernels/relu2_mgpu.py; bf16, a Hopper GPU).
    # "auto": "mosaic" on a Hopper GPU where it applies (`ModelConfig.mosaic_mlp_fits`), XLA elsewhere.
    mlp: Literal["auto", "xla", "pallas", "mosaic"] = "xla"
    # "xla_fused": head + softcap ('isru', 'tanh') + CE as one custom VJP in XLA, no f32 [N, V];
    # "pallas": one Pallas kernel, no [N, V] logits at all ('isru' only). Neither: FP8 or multi-token,
    # except record #77's FP8 'sigmoid' head, where both fuse its training loss (head_mtp_loss.py).
    # "auto" (`ModelConfig.loss_impl`): for that head "pallas" on a GPU and "xla_fused" elsewhere; for
    # other heads "xla_fused" where it applies, "xla" otherwise.
    loss: Literal["auto", "xla", "xla_fused", "pallas"] = "xla"
    # "pallas": RMSNorm's backward and the residual stream's gradient in one pass (pallas_kernels/
    # rms_norm_bwd.py). "auto": that kernel on a GPU where it applies, XLA elsewhere.
    norm: Literal["auto", "xla", "pallas"] = "xla"
    # "pallas": with loss="xla_fused", the backward's pass over the logits (bf16 dL/dz and the bias's
    # column sum together) as one kernel (pallas_kernels/logit_grad.py). "auto": as for norm.
    logit_grad: Literal["auto", "xla", "pallas"] = "xla"
    # "pallas": with loss="xla_fused", the forward's log-sum-exp over the logits as one kernel
    # (pallas_kernels/logit_lse.py). "auto": as for norm.
    logit_lse: Literal["auto", "xla", "pallas"] = "xla"
    # "pallas": the backward of the q/k/v projections, QK-norm and 'halves' RoPE as one pass that
    # writes [dq | dk | dv] with the biases' column sums, then one GEMM per gradient
    # (pallas_kernels/qkv_grad.py, jaxrun/model/qkv.py). "auto": as for norm.
    qkv: Literal["auto", "xla", "pallas"] = "xla"
    # The FP8 head's forward GEMM under the fused loss (record #77's head): "xla" writes float32
    # logits (cuBLASLt keeps the scale exact only so); "mosaic" a Hopper kernel that scales the
    # float32 sums and writes bf16 logits, as the record's `_scaled_mm` (pallas_kernels/
    # fp8_logits_mgpu.py; model width and vocabulary multiples of 128).
    fp8_logits: Literal["xla", "mosaic"] = "xla"


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
        check_choice(node, "norm", self.norm, ("layernorm", "rmsnorm"))
        check_choice(node, "init", self.init, ("gpt2", "speedrun", "record"))
        check_choice(node, "compute_dtype", self.compute_dtype, ("float32", "bfloat16"))
        check_choice(node + ".mlp", "activation", self.mlp.activation, ("gelu", "relu2"))
        check_choice(node + ".head", "tie", self.head.tie, ("never", "always", "until_split"))
        check_choice(node + ".head", "softcap", self.head.softcap, ("none", "tanh", "isru", "sigmoid"))
        check_choice(
            node + ".kernels",
            "attention",
            self.kernels.attention,
            ("auto", "xla", "cudnn", "pallas", "mosaic"),
        )
        check_choice(node + ".kernels", "mlp", self.kernels.mlp, ("auto", "xla", "pallas", "mosaic"))
        check_choice(node + ".kernels", "loss", self.kernels.loss, ("auto", "xla", "xla_fused", "pallas"))
        check_choice(node + ".kernels", "norm", self.kernels.norm, ("auto", "xla", "pallas"))
        check_choice(node + ".kernels", "logit_grad", self.kernels.logit_grad, ("auto", "xla", "pallas"))
        check_choice(node + ".kernels", "logit_lse", self.kernels.logit_lse, ("auto", "xla", "pallas"))
        check_choice(node + ".kernels", "qkv", self.kernels.qkv, ("auto", "xla", "pallas"))
        check_choice(node + ".kernels", "fp8_logits", self.kernels.fp8_logits, ("xla", "mosaic"))
        for name in ("vocab_size", "num_layers", "model_dim", "head_dim", "mlp_ratio", "max_seq_len"):
            check(getattr(self, name) > 0, f"model.{name}={getattr(self, name)} must be positive")
        check(
            self.model_dim % self.head_dim == 0,
            f"model.model_dim={self.model_dim} is not a multiple of model.head_dim={self.head_dim}",
        )
        check(
            self.head.softcap_value > 0,
            f"model.head.softcap_value={self.head.softcap_value} must be positive",
        )
        check(
            self.kernels.mlp in ("auto", "xla") or self.mlp.activation == "relu2",
            f"model.kernels.mlp={self.kernels.mlp!r} fuses ReLU², but model.mlp.activation="
            f"{self.mlp.activation!r}",
        )
        check(
            self.kernels.mlp != "mosaic" or self._mosaic_mlp_shapes,
            "model.kernels.mlp='mosaic' runs bf16 GEMMs that tile the model width by 64 and the hidden "
            f"width by 128, not compute_dtype={self.compute_dtype!r}, model_dim={self.model_dim} and "
            f"mlp_dim={self.mlp_dim}",
        )
        check(
            self.kernels.attention != "mosaic"
            or (self.compute_dtype == "bfloat16" and self.head_dim % 64 == 0),
            "model.kernels.attention='mosaic' runs bf16 wgmma over heads a multiple of 64 wide, not "
            f"compute_dtype={self.compute_dtype!r} with head_dim={self.head_dim}",
        )
        check(
            self.kernels.norm != "pallas" or (self.norm == "rmsnorm" and self.model_dim % 16 == 0),
            f"model.kernels.norm='pallas' is RMSNorm's backward over a width that is a multiple of 16, "
            f"not model.norm={self.norm!r} with model.model_dim={self.model_dim}",
        )
        for field in ("logit_lse", "logit_grad"):
            check(
                getattr(self.kernels, field) != "pallas" or self.logit_pass_fits,
                f"model.kernels.{field}='pallas' is a pass of the fused head loss without FP8 (model.kernels."
                "loss='xla_fused', model.head.fp8 unset) over a vocabulary that is a multiple of 128, not "
                f"loss={self.kernels.loss!r}, fp8={self.head.fp8}, vocab_size={self.vocab_size}",
            )
        check(
            self.kernels.qkv != "pallas" or self.fused_qkv_fits,
            "model.kernels.qkv='pallas' is the backward of QK-norm and 'halves' RoPE over heads of a "
            f"power-of-two width >= 32, not attn.qk_norm={self.attn.qk_norm}, attn.rope={self.attn.rope}, "
            f"head_dim={self.head_dim}",
        )
        for field in ("fp8_up", "fp8_down"):
            check(
                not getattr(self.mlp, field)
                or (self.mlp.activation == "relu2" and self.kernels.mlp in ("auto", "xla")),
                f"model.mlp.{field}=True quantizes the ReLU² MLP's XLA path: it needs model.mlp.activation="
                f"'relu2' and model.kernels.mlp='xla' or 'auto', not {self.mlp.activation!r} and {self.kernels.mlp!r}",
            )
        caps = _LOSS_CAPS[self.loss_impl(gpu=True)]  # an 'auto' head's pass does not hang on the backend
        check(
            caps is None or self._fp8_sigmoid_head or (self.head.softcap in caps and not self._record_head),
            f"model.kernels.loss={self.kernels.loss!r} supports softcap {' or '.join(map(repr, caps or ()))} "
            "without FP8 or multi-token loss, or the FP8 head with softcap 'sigmoid' (model.head.fp8 set, "
            f"multi-token or not), not model.head={self.head}",
        )
        check(
            self.kernels.fp8_logits != "mosaic"
            or (
                self._fp8_sigmoid_head
                and self.kernels.loss != "xla"
                and self.model_dim % 128 == 0
                and self.vocab_size % 128 == 0
            ),
            "model.kernels.fp8_logits='mosaic' is the forward GEMM of the fused FP8 head loss (model.head.fp8 "
            "set, softcap 'sigmoid', model.kernels.loss not 'xla') over a model width and vocabulary that "
            f"are multiples of 128, not loss={self.kernels.loss!r}, model_dim={self.model_dim}, "
            f"vocab_size={self.vocab_size}, head={self.head}",
        )
        self._check_rope()
        self._check_layers()

    @property
    def logit_pass_fits(self) -> bool:
        """Whether `kernels.logit_lse/logit_grad='pallas'` apply: the fused XLA head loss without
        FP8 over a vocabulary that is a multiple of 128."""
        return (
            self.loss_impl(gpu=True) == "xla_fused" and self.head.fp8 is None and self.vocab_size % 128 == 0
        )

    def loss_impl(self, gpu: bool) -> str:
        """`kernels.loss` with "auto" resolved: record #77's FP8 'sigmoid' head takes the Pallas pass
        on a GPU (faster: docs/PERF.md) and the fused XLA pass elsewhere; another head takes the
        fused XLA pass where its softcap allows, plain autodiff otherwise."""
        if self.kernels.loss != "auto":
            return self.kernels.loss
        if self._fp8_sigmoid_head:
            return "pallas" if gpu else "xla_fused"
        fused = self.head.softcap in _LOSS_CAPS["xla_fused"] and not self._record_head
        return "xla_fused" if fused else "xla"

    @property
    def mosaic_mlp_fits(self) -> bool:
        """Whether `kernels.mlp='auto'` takes the Mosaic GEMMs (on Hopper): ReLU² without FP8,
        bf16, the model width a multiple of 64 and the hidden width of 128."""
        fp8 = self.mlp.fp8_up or self.mlp.fp8_down
        return self.mlp.activation == "relu2" and not fp8 and self._mosaic_mlp_shapes

    @property
    def _mosaic_mlp_shapes(self) -> bool:
        return self.model_dim % 64 == 0 and self.mlp_dim % 128 == 0 and self.compute_dtype == "bfloat16"

    @property
    def fused_qkv_fits(self) -> bool:
        """Whether `kernels.qkv='pallas'` applies: QK-norm, 'halves' RoPE, power-of-two heads >= 32."""
        rope, k = self.attn.rope, self.head_dim
        return (
            self.attn.qk_norm
            and rope is not None
            and rope.pairing == "halves"
            and k >= 32
            and not k & (k - 1)
        )

    @property
    def _record_head(self) -> bool:
        return self.head.fp8 is not None or bool(self.head.multi_token)

    @property
    def _fp8_sigmoid_head(self) -> bool:
        """Record #77's head, whose training loss is fused by `head_mtp_loss` under any loss pass."""
        return self.head.fp8 is not None and self.head.softcap == "sigmoid"

    def _check_rope(self) -> None:
        rope = self.attn.rope
        if rope is None:
            check(
                self.embed.learned_positions,
                "model.attn.rope=None needs model.embed.learned_positions=True: the model has no positions",
            )
            return
        check_choice("model.attn.rope", "pairing", rope.pairing, ("halves", "interleaved"))
        rotated = self.head_dim * rope.fraction
        check(
            0 < rope.fraction <= 1 and rotated % 2 == 0 and rotated == int(rotated),
            f"model.attn.rope.fraction={rope.fraction} must rotate an even number of the "
            f"{self.head_dim} head dims",
        )
        check(
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
            check(all(0 <= i < L for i in layers), f"{name}={layers} names layers outside 0..{L - 1}")
        for name in (
            "model.attn.paired_layers",
            "model.embed.value.layers",
            "model.attn.windows.long_layers",
        ):
            clash = sorted(set(layer_fields[name]) & set(a.skip_layers))
            check(not clash, f"{name} lists {clash}, which model.attn.skip_layers leaves without attention")
        check(
            not a.paired_layers or self.num_heads % 2 == 0,
            f"model.attn.paired_layers needs an even head count, not {self.num_heads}",
        )
        check(
            not a.paired_layers
            or not set(a.paired_layers) & set(layer_fields["model.attn.windows.long_layers"]),
            "model.attn.paired_layers and model.attn.windows.long_layers overlap: key offset and YaRN differ there",
        )
        check(
            not a.key_offset or a.windows is not None, "model.attn.key_offset=True needs model.attn.windows"
        )
        if r.skip is not None:
            check(
                r.skip.target in a.skip_layers and 0 <= r.skip.source < r.skip.target,
                f"model.residual.skip={r.skip} must come from an earlier layer into one of "
                f"model.attn.skip_layers={a.skip_layers}",
            )
        check(
            r.saved_layer is None or 0 <= r.saved_layer < L - 1,
            f"model.residual.saved_layer={r.saved_layer} must be a layer before the last",
        )
        check(
            not r.backout or r.saved_layer is not None,
            "model.residual.backout=True needs model.residual.saved_layer",
        )
        width = 12  # the gates read the first 12 dims
        gated = a.gate or r.skip is not None or e.value is not None or e.smear is not None
        check(
            not gated or self.model_dim >= width,
            f"model.model_dim={self.model_dim} < the gates' {width} inputs",
        )
        uniform = not (a.skip_layers or a.paired_layers or a.windows or e.value or r != ResidualConfig())
        check(
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
