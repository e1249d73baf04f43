"""Record #77's GPT (modded-nanogpt, 2026-03-06 "SimplifyHC") as a plain-torch module, for parity tests.

The parameters carry the source's names and storage layouts (`attn_bank [10, 4D, D]`,
`mlp_bank [12, 2, F, D]`, `scalars`, `value_embeds [5V, D]`, `lm_head.weight [D, V]`, ...), so
record77_convert.py maps them onto jaxrun's params as /work's RECORD77 layout fixes. They are
float32 masters (as jaxrun keeps them); `Record77Config.dtype` is the activation dtype and every
weight the source holds in bf16 is cast to it at use. "float32" gives an exact CPU reference,
"bfloat16" the source's numerics for a GPU side-by-side.

The layer plan is fixed: 11 layers, attention in all but layer 6, paired heads in 0, 2, 5, 9, the
long window (and the partial key offset) in 3 and 10, value embeddings in 1, 2, 8, 9, 10, a gated
skip from layer 3 into layer 6, layers 8-10 attending from the residual saved after layer 7, and
backout of that residual before the head. `Features` turns each technique off for feature-by-feature
parity (off means the term is simply absent; its params stay and get zero gradient).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.torch_reference.record77_ops import (
    FP8UpProjection,
    SoftcappedCE,
    Yarn,
    eval_losses,
    norm,
    varlen_attention,
)

NUM_LAYERS = 11
NUM_ATTN = NUM_LAYERS - 1  # layer 6 has none; attention slot a = i for i <= 5, i - 1 for i >= 7
PAIRED_LAYERS = (0, 2, 5, 9)
LONG_LAYERS = (3, 10)
VE_TABLE = {1: 0, 2: 1, 8: 2, 9: 3, 10: 4}  # layer -> value-embedding table and ve_gate_bank slot
GATE_IN = 12  # every small gate reads the first 12 dims of its input
SKIP_FROM, SKIP_TO, SAVED_AFTER = 3, 6, 7


def attn_slot(layer: int) -> int:
    return layer - (layer > SKIP_TO)


@dataclass(frozen=True, kw_only=True)
class Features:
    """Which of record 77's techniques run; the defaults are the record (all on, but the later records'
    techniques, which are off)."""

    value_embeds: bool = True
    bigram: bool = True
    smear: bool = True
    paired_heads: bool = True  # off: layers 0, 2, 5, 9 are ordinary attention layers
    key_offset: bool = True
    attn_gate: bool = True
    skip: bool = True
    saved_activation: bool = True  # off: layers 8-10 attend from the current residual and there is no backout
    fp8_head: bool = True
    mtp: bool = True  # off: only the next-token weight of the schedule's MTP weights
    windows: bool = True  # off: full causal attention within documents
    fp8_mlp_up: bool = (
        False  # a later record's technique, off in #77: the MLP up-projection in FP8 (training)
    )


@dataclass(frozen=True, kw_only=True)
class Record77Config:
    """Sizes of the twin; the record is the default (vocab already padded to a multiple of 128)."""

    vocab_size: int = 50304
    model_dim: int = 768
    num_heads: int = 6
    head_dim: int = 128
    max_seq_len: int = 262144  # RoPE tables cover 2·max_seq_len positions
    block_size: int = 128  # window unit in tokens
    scalar_pad_world: int = 8  # the source pads `scalars` to a multiple of its world size
    dtype: str = "float32"
    features: Features = field(default_factory=Features)

    def __post_init__(self):
        if self.num_heads * self.head_dim != self.model_dim or self.num_heads % 2 or self.model_dim < GATE_IN:
            raise ValueError(f"need num_heads*head_dim == model_dim >= 12 and even heads, got {self}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")

    @property
    def mlp_dim(self) -> int:
        return 4 * self.model_dim

    @property
    def bigram_rows(self) -> int:
        return 5 * self.vocab_size

    @property
    def num_scalars(self) -> int:
        return 2 * NUM_LAYERS + 3 + (-(2 * NUM_LAYERS) - 3) % self.scalar_pad_world

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Record77Config:
        return cls(**{**d, "features": Features(**d.get("features", {}))})


@dataclass
class ForwardSchedule:
    """The source's ForwardScheduleConfig: MTP weights and windows (tokens) of the current step."""

    mtp_weights: Tensor
    ws_short: int
    ws_long: int
    train_max_seq_len: int


class _Weight(nn.Module):
    """Holds one `weight`, so state-dict names read as the source's (`embed.weight`, `lm_head.weight`)."""

    def __init__(self, *shape: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(*shape))


class GPT77(nn.Module):
    """Record 77's GPT; `forward` returns per-token losses like the source's."""

    def __init__(self, cfg: Record77Config, device: torch.device | None = None):
        super().__init__()
        self.cfg = cfg
        V, D, H, F_, L = cfg.vocab_size, cfg.model_dim, cfg.num_heads, cfg.mlp_dim, NUM_LAYERS
        bound = 3**0.5 * 0.5 * D**-0.5
        with torch.device(device or "cpu"):
            self.smear_gate = _Weight(1, GATE_IN)
            self.skip_gate = _Weight(1, GATE_IN)
            self.value_embeds = nn.Parameter(0.01 * torch.randn(5 * V, D))
            self.attn_gate_bank = nn.Parameter(torch.zeros(NUM_ATTN, H, GATE_IN))
            self.ve_gate_bank = nn.Parameter(torch.zeros(5, H, GATE_IN))
            self.attn_bank = nn.Parameter(torch.empty(NUM_ATTN, 4 * D, D).uniform_(-bound, bound))
            mlp = torch.zeros(12, 2, F_, D)  # slot 11 pads 11 layers to 24 matrices, as the source
            mlp[:, 0].uniform_(-bound, bound)
            self.mlp_bank = nn.Parameter(mlp)
            self.lm_head = _Weight(D, V)
            nn.init.normal_(self.lm_head.weight, std=0.005)
            self.embed = _Weight(V, D)
            self.bigram_embed = _Weight(cfg.bigram_rows, D)
            with torch.no_grad():
                self.embed.weight.copy_(self.lm_head.weight.T)
            self.post_lambdas = nn.Parameter(torch.ones(L, 2))
            self.x0_lambdas = nn.Parameter(torch.zeros(L))
            self.bigram_lambdas = nn.Parameter(torch.full((L,), 0.05))
            self.resid_lambdas = nn.Parameter(torch.full((L, 2), 1.1**0.5))
            pad = cfg.num_scalars - 2 * L - 3
            self.scalars = nn.Parameter(torch.tensor([0.5, 1.0] * L + [0.0, 0.5, -1.5] + [1.0] * pad))
        self.yarn = Yarn(cfg.head_dim, cfg.max_seq_len, device=device)
        self.yarn_paired = Yarn(cfg.head_dim, cfg.max_seq_len, paired=True, device=device)

    def _attention(self, x, layer, w_qkvo, sa, ve, gate_w, ve_gate_w, cu_seqlens, window, key_offset):
        """One attention layer on the normed input x [T, D] (the source's CausalSelfAttention, batch 1)."""
        cfg, f = self.cfg, self.cfg.features
        T, D, H, K = x.size(0), cfg.model_dim, cfg.num_heads, cfg.head_dim
        paired = f.paired_heads and layer in PAIRED_LAYERS
        yarn = self.yarn_paired if paired else self.yarn
        w = w_qkvo.to(x.dtype)
        q, k, v = F.linear(x, sa[0] * w[: 3 * D]).view(T, 3 * H, K).chunk(3, dim=-2)
        q, k = norm(q), norm(k)
        if not paired:
            q, k = yarn.rotary(q[None])[0], yarn.rotary(k[None])[0]
            if key_offset:  # stationary half of each key moves one position later
                shifted = torch.cat([k[:1, :, K // 2 :], k[:-1, :, K // 2 :]])
                k = torch.cat([k[..., : K // 2], shifted], dim=-1)
            if ve is not None:
                g = 2 * torch.sigmoid(F.linear(torch.cat([x[:, :6], ve[:, :6]], -1), ve_gate_w)).view(T, H, 1)
                v = v + g * ve.view_as(v)
        else:
            # virtual sequence of 2T: RoPE turns heads (2g, 2g+1) at positions (2t, 2t+1), then each token's
            # row of 6 heads is read as 2 positions × 3 groups, so for q, k and v alike position 2t holds
            # heads 0..2 and 2t+1 heads 3..5 (q/k head h rotated at 2t + h mod 2, wherever it lands)
            q = yarn.rotary(q.reshape(1, T, H // 2, 2 * K))[0].reshape(2 * T, H // 2, K)
            k = yarn.rotary(k.reshape(1, T, H // 2, 2 * K))[0].reshape(2 * T, H // 2, K)
            v = v.reshape(2 * T, H // 2, K)
            if ve is not None:
                g = 2 * torch.sigmoid(F.linear(x[:, :GATE_IN], ve_gate_w)).view(2 * T, H // 2, 1)
                v = v + g * ve.view_as(v)
            cu_seqlens = 2 * cu_seqlens
        y = varlen_attention(q, k, v, cu_seqlens, window if f.windows else None, yarn.attn_scale)
        y = y.reshape(T, H, K)
        if f.attn_gate:
            y = y * torch.sigmoid(F.linear(x[:, :GATE_IN], gate_w)).view(T, H, 1)
        return F.linear(y.reshape(T, D), sa[1] * w[3 * D :])

    def forward(
        self,
        input_seq: Tensor,
        target_seq: Tensor,
        cu_seqlens: Tensor,
        bigram_input_seq: Tensor,
        schedule: ForwardSchedule,
    ) -> Tensor:
        """Per-token losses of one rank-local packed sequence (1-D int inputs, cu_seqlens padded with T)."""
        cfg, f, dt, L = self.cfg, self.cfg.features, self.cfg.torch_dtype, NUM_LAYERS
        V, D = cfg.vocab_size, cfg.model_dim
        sa = self.scalars[: 2 * L].view(L, 2)
        smear_lambda, backout_lambda, skip_lambda = (
            self.scalars[2 * L],
            self.scalars[2 * L + 1],
            self.scalars[2 * L + 2],
        )
        resid, post = self.resid_lambdas.to(dt), self.post_lambdas.to(dt)
        x0_l, bigram_l = self.x0_lambdas.to(dt), self.bigram_lambdas.to(dt)
        windows = [schedule.ws_long if i in LONG_LAYERS else schedule.ws_short for i in range(L)]

        x = F.embedding(input_seq, self.embed.weight.to(dt))
        bigram = F.embedding(bigram_input_seq, self.bigram_embed.weight.to(dt)) if f.bigram else None
        ve_all = self.value_embeds.view(5, V, D)[:, input_seq].to(dt) if f.value_embeds else None
        if f.smear:  # 1-token look-back on the raw embedding, document boundaries not masked
            gate = smear_lambda * torch.sigmoid(F.linear(x[1:, :GATE_IN], self.smear_gate.weight.to(dt)))
            x = torch.cat([x[:1], x[1:] + gate * x[:-1]])
        x = x0 = norm(x)
        if bigram is not None:
            x = x + bigram * bigram_l[0]
        skip_gate = (
            torch.sigmoid(skip_lambda)
            * 2
            * torch.sigmoid(F.linear(x0[:, :GATE_IN], self.skip_gate.weight.to(dt)))
        )

        skip_connection = saved = None
        for i in range(L):
            if i == SKIP_TO:
                if f.skip:
                    x = x + skip_gate * skip_connection
            else:
                a = attn_slot(i)
                table = VE_TABLE.get(i)
                ve = ve_all[table] if ve_all is not None and table is not None else None
                attn_in = saved if f.saved_activation and saved is not None else x
                out = self._attention(
                    norm(attn_in),
                    i,
                    self.attn_bank[a],
                    sa[i],
                    ve,
                    self.attn_gate_bank[a].to(dt),
                    None if table is None else self.ve_gate_bank[table].to(dt),
                    cu_seqlens,
                    windows[i],
                    f.key_offset and windows[i] == schedule.ws_long,
                )
                inject = x0 * x0_l[i]
                if bigram is not None and i > 0:  # layer 0's bigram term went in before the loop
                    inject = inject + bigram * bigram_l[i]
                x = resid[i, 0] * x + post[i, 0] * out + inject
            fc, proj = self.mlp_bank[i, 0].to(dt), self.mlp_bank[i, 1].to(dt)
            h = norm(x)
            up = FP8UpProjection.apply(h, fc) if f.fp8_mlp_up and self.training else h @ fc.T
            x = resid[i, 1] * x + post[i, 1] * (F.relu(up).square() @ proj)
            if i == SKIP_FROM:
                skip_connection = x
            if i == SAVED_AFTER:
                saved = x
        if f.saved_activation:
            x = x - backout_lambda * saved
        x = norm(x)
        if not self.training:
            return eval_losses(x, self.lm_head.weight, target_seq)
        mtp = schedule.mtp_weights.float() if f.mtp else schedule.mtp_weights[:1].float()
        return SoftcappedCE.apply(x, self.lm_head.weight, target_seq, mtp, f.fp8_head)
