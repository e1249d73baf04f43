"""The GPT of the recipes in PyTorch, built from jaxrun's `ModelConfig`.

One module covers both recipes, switch by switch as `jaxrun.model` reads
them: `simple` (train_gpt_simple.py: RMSNorm with gains, biases, QK RMS-norm,
half-truncated RoPE, attention scale 0.12, ReLU², ISRU softcap) and
`gpt2_llmc` (llm.c's train_gpt2.py: learned positions, LayerNorm, GELU (tanh),
tied embeddings). Weights are `[out, in]` with one module per layer, as torch
code writes them; `convert.py` maps them to and from jaxrun's params.

How a recipe's source holds its numbers (`PRECISION`):
- "cast": activations run in the compute dtype and every weight is cast to it
  at use (`F.linear(x, w.type_as(x))`), as train_gpt_simple.py does; its token
  embedding is even stored in bf16 (`nn.Embedding(...).bfloat16()`), so the
  first activation, and every one after it, is bf16.
- "autocast": float32 weights and a float32 residual stream under
  `torch.autocast`, as llm.c's train_gpt2.py runs.
With `compute_dtype="float32"` both are plain float32.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.torch_reference import convert
from jaxrun.config import ModelConfig

# recipe name -> (precision policy, token embedding stored in the compute dtype)
PRECISION: dict[str, tuple[str, bool]] = {
    "simple": ("cast", True),
    "gpt2_llmc": ("autocast", False),
}
DEFAULT_PRECISION = ("cast", False)  # jaxrun's own: float32 weights cast at use


class Linear(nn.Linear):
    """`nn.Linear` that casts its weights to the input's dtype, as the speedrun's does."""

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.type_as(x)
        return F.linear(x, self.weight.type_as(x), bias)


class Norm(nn.Module):
    """LayerNorm (eps 1e-5, GPT-2's) or RMSNorm (eps = the dtype's epsilon, F.rms_norm's default)."""

    def __init__(self, dim: int, cfg: ModelConfig):
        super().__init__()
        self.layernorm = cfg.norm == "layernorm"
        self.weight = nn.Parameter(torch.ones(dim)) if cfg.norm_gains else None
        self.bias = nn.Parameter(torch.zeros(dim)) if self.layernorm else None

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.type_as(x)
        if self.layernorm:
            return F.layer_norm(x, (x.size(-1),), weight, self.bias.type_as(x), eps=1e-5)
        return F.rms_norm(x, (x.size(-1),), weight=weight)


def rotary(x_BTHK: Tensor, freqs: Tensor) -> Tensor:
    """Rotate the two halves of each head by position·freqs, in float32 (zero freqs pass through)."""
    pos = torch.arange(x_BTHK.size(1), dtype=torch.float32, device=x_BTHK.device)
    theta = torch.outer(pos, freqs)[None, :, None, :]
    cos, sin = theta.cos(), theta.sin()
    x1, x2 = x_BTHK.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1).type_as(x_BTHK)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, HK = cfg.model_dim, cfg.num_heads * cfg.head_dim
        self.cfg = cfg
        self.q, self.k, self.v = (Linear(D, HK, bias=cfg.linear_biases) for _ in range(3))
        self.o = Linear(HK, D, bias=cfg.linear_biases)
        self.scale = cfg.attn.scale if cfg.attn.scale is not None else 1 / math.sqrt(cfg.head_dim)
        if cfg.attn.rope is not None:
            rotating = int(cfg.head_dim * cfg.attn.rope.fraction) // 2
            freqs = (1 / cfg.attn.rope.base) ** torch.linspace(0, 1, rotating, dtype=torch.float32)
            freqs = torch.cat([freqs, freqs.new_zeros(cfg.head_dim // 2 - rotating)])
            self.register_buffer("freqs", freqs, persistent=False)
        else:
            self.freqs = None

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        H, K = self.cfg.num_heads, self.cfg.head_dim
        q, k, v = (proj(x).view(B, T, H, K) for proj in (self.q, self.k, self.v))
        if self.cfg.attn.qk_norm:
            q, k = F.rms_norm(q, (K,)), F.rms_norm(k, (K,))
        if self.freqs is not None:
            q, k = rotary(q, self.freqs), rotary(k, self.freqs)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=self.scale
        )
        return self.o(y.transpose(1, 2).reshape(B, T, H * K))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.relu2 = cfg.mlp.activation == "relu2"
        self.up = Linear(cfg.model_dim, cfg.mlp_dim, bias=cfg.linear_biases)
        self.down = Linear(cfg.mlp_dim, cfg.model_dim, bias=cfg.linear_biases)

    def forward(self, x: Tensor) -> Tensor:
        u = self.up(x)
        u = F.relu(u).square() if self.relu2 else F.gelu(u, approximate="tanh")
        return self.down(u)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm, self.attn = Norm(cfg.model_dim, cfg), Attention(cfg)
        self.mlp_norm, self.mlp = Norm(cfg.model_dim, cfg), MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """`GPT(cfg)(inputs)` gives softcapped float32 logits; `(inputs, targets)` the summed token loss.

    Args:
      cfg: jaxrun's model config; every switch `jaxrun.model` reads means the same here.
      precision: "cast" or "autocast" (see the module docstring).
      embed_in_compute_dtype: store the token embedding in `cfg.compute_dtype`.
    """

    def __init__(self, cfg: ModelConfig, *, precision: str = "cast", embed_in_compute_dtype: bool = False):
        super().__init__()
        if precision not in ("cast", "autocast"):
            raise ValueError(f"precision must be 'cast' or 'autocast', got {precision!r}")
        self.cfg, self.precision = cfg, precision
        self.compute_dtype = getattr(torch, cfg.compute_dtype)
        D, V = cfg.model_dim, cfg.vocab_size
        self.embed = nn.Embedding(V, D)
        if embed_in_compute_dtype:
            self.embed.to(self.compute_dtype)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, D) if cfg.embed.learned_positions else None
        self.embed_norm = Norm(D, cfg) if cfg.embed.norm else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.final_norm = Norm(D, cfg)
        self.lm_head = None if cfg.head.tie == "always" else Linear(D, V, bias=cfg.linear_biases)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The recipe's init, as `jaxrun.model.init` draws it (same law, not the same numbers).

        "speedrun": embeddings N(0, 1), matrices N(0, 0.33/fan_in), output
        projections and the head zero. "gpt2": N(0, 0.02²), residual output
        projections N(0, (0.02/sqrt(2L))²). Biases zero, gains one.
        """
        speedrun = self.cfg.init == "speedrun"
        for name, p in self.named_parameters():
            output_proj = name.endswith((".o.weight", ".down.weight"))
            if p.ndim < 2:
                p.fill_(1.0 if name.endswith("norm.weight") else 0.0)
            elif name in ("embed.weight", "pos_embed.weight"):
                p.normal_(0.0, 1.0 if speedrun else 0.02, generator=generator)
            elif speedrun:
                if output_proj or name == "lm_head.weight":
                    p.zero_()
                else:
                    p.normal_(0.0, math.sqrt(0.33 / p.size(-1)), generator=generator)
            else:
                std = 0.02 / math.sqrt(2 * self.cfg.num_layers) if output_proj else 0.02
                p.normal_(0.0, std, generator=generator)

    def _softcap(self, z: Tensor) -> Tensor:
        c = self.cfg.head.softcap_value
        if self.cfg.head.softcap == "isru":
            return c * z * torch.rsqrt(z.square() + c * c)
        if self.cfg.head.softcap == "tanh":
            return c * torch.tanh(z / c)
        return z

    def _logits(self, inputs: Tensor) -> Tensor:
        cast = self.precision == "cast"
        x = self.embed(inputs)
        if cast:
            x = x.to(self.compute_dtype)
        if self.pos_embed is not None:
            x = x + self.pos_embed.weight[: inputs.size(1)].type_as(x)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        for block in self.blocks:
            x = block(x)
        x = self.final_norm(x)
        if self.lm_head is None:
            return self._softcap(F.linear(x, self.embed.weight.type_as(x)).float())
        return self._softcap(self.lm_head(x).float())

    def forward(self, inputs: Tensor, targets: Tensor | None = None) -> Tensor:
        autocast = self.precision == "autocast" and self.compute_dtype != torch.float32
        with torch.autocast(inputs.device.type, dtype=self.compute_dtype, enabled=autocast):
            logits = self._logits(inputs)
        if targets is None:
            return logits
        return F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction="sum"
        )


def describe_precision(cfg: ModelConfig, recipe: str) -> str:
    precision, embed_in_compute = PRECISION.get(recipe, DEFAULT_PRECISION)
    if cfg.compute_dtype == "float32":
        return "float32 throughout"
    if precision == "autocast":
        return f"float32 weights and residual, torch.autocast({cfg.compute_dtype})"
    embed = f", token embedding stored in {cfg.compute_dtype}" if embed_in_compute else ""
    return f"{cfg.compute_dtype} activations, float32 weights cast at use{embed}"


def build_model(cfg: ModelConfig, recipe: str) -> GPT:
    """The twin of recipe `recipe` (a config's `name`), with that recipe's precision policy."""
    precision, embed_in_compute = PRECISION.get(recipe, DEFAULT_PRECISION)
    return GPT(cfg, precision=precision, embed_in_compute_dtype=embed_in_compute)


@torch.no_grad()
def load_params(model: GPT, flat: dict) -> None:
    """Copy jaxrun params (flat paths -> arrays) into `model`, in place; every param must be given."""
    state = convert.jax_to_torch(flat)
    own = dict(model.named_parameters())
    if missing := sorted(set(own) ^ set(state)):
        raise KeyError(f"params present on only one side: {missing}")
    for name, value in state.items():
        own[name].copy_(torch.from_numpy(value))


def export_params(model: GPT) -> dict[str, np.ndarray]:
    """`model`'s params as jaxrun params (flat paths -> float32 numpy)."""
    return convert.torch_to_jax({name: _numpy(p) for name, p in model.named_parameters()})


def export_grads(model: GPT) -> dict[str, np.ndarray]:
    """`model`'s gradients laid out as jaxrun params (flat paths -> float32 numpy)."""
    return convert.torch_to_jax({name: _numpy(p.grad) for name, p in model.named_parameters()})


def _numpy(x: Tensor) -> np.ndarray:
    # A copy: `.numpy()` of a float32 CPU tensor shares its memory, which the optimizer updates in place.
    return x.detach().to("cpu", torch.float32, copy=True).numpy()
