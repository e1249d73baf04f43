"""The recipes' optimizers and schedule in PyTorch, read from jaxrun's `OptimConfig`.

`make_optimizers(cfg, model)` gives train_gpt_simple.py's pair (AdamW over the
embedding, head and vectors; Muon over the blocks' matrices) for
`kind="muon_adam"`, or one AdamW over everything for `kind="adamw"` (llm.c,
weight decay only where `adam_decay_vectors` allows). Groups follow
`convert.param_group`. `lr_factor` is the schedule both recipes' sources
compute by hand each step; `set_lr` applies it.

Muon is written as the reference writes it: Nesterov momentum by two `lerp_`,
Newton–Schulz on the smaller Gram side in the reference's dtype (bf16; float32
for exactness checks), the `sqrt(max(1, rows/cols))` shape factor, and
decoupled decay `p *= 1 - lr·wd`. This twin runs on one process: it has no
`all_gather` of the update across ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from benchmarks.torch_reference import convert
from jaxrun.config import Config, OptimConfig

NS_COEFFS = {
    "simple": ((2.0, -1.5, 0.5),) * 12,  # train_gpt_simple.py
    "quintic": ((3.4445, -4.7750, 2.0315),) * 5,  # the original Muon
}


def newton_schulz(G: Tensor, coeffs, dtype: torch.dtype = torch.bfloat16, eps: float = 1e-7) -> Tensor:
    """The polar factor of G, approximately, by the reference's quintic iteration."""
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for a, b, c in coeffs:
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if tall else X


def muon_update(grad: Tensor, momentum: Tensor, mu: float, coeffs, ns_dtype: torch.dtype) -> Tensor:
    """Nesterov momentum, orthogonalized, times the shape factor. Updates `momentum` (and `grad`) in place."""
    momentum.lerp_(grad, 1 - mu)
    update = grad.lerp_(momentum, mu)
    update = newton_schulz(update, coeffs, ns_dtype)
    return update * max(1, grad.size(-2) / grad.size(-1)) ** 0.5


class Muon(torch.optim.Optimizer):
    """Single-process Muon, as train_gpt_simple.py steps it on each rank's share.

    Args:
      params: the matrices, `[out, in]`.
      lr, weight_decay, mu: as the reference's.
      coeffs: the Newton–Schulz schedule (`NS_COEFFS`).
      ns_dtype: the Newton–Schulz dtype.
      compile_update: run the per-matrix update under `torch.compile`, as the reference does.
    """

    def __init__(
        self, params, *, lr, weight_decay, mu, coeffs, ns_dtype=torch.bfloat16, compile_update=False
    ):
        params = list(params)
        if not params or any(p.ndim < 2 for p in params):
            raise ValueError("Muon needs a non-empty list of matrices")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "mu": mu})
        self.coeffs, self.ns_dtype = coeffs, ns_dtype
        self._update = torch.compile(muon_update) if compile_update else muon_update

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["momentum"] = torch.zeros_like(p)
                update = self._update(p.grad, state["momentum"], group["mu"], self.coeffs, self.ns_dtype)
                p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr)


def check_supported(o: OptimConfig) -> None:
    """Raise if `o` turns on something this twin does not implement (the two recipes need none)."""
    unsupported = {
        "muon_ns": (o.muon_ns, tuple(NS_COEFFS)),
        "muon_scaling": (o.muon_scaling, ("shape",)),
        "muon_weight_decay_mode": (o.muon_weight_decay_mode, ("decoupled",)),
        "muon_momentum_warmup_from": (o.muon_momentum_warmup_from, (None,)),
    }
    bad = {k: v for k, (v, ok) in unsupported.items() if o.kind == "muon_adam" and v not in ok}
    if bad:
        raise NotImplementedError(f"the PyTorch twin does not implement optim settings {bad}")


def lr_factor(o: OptimConfig, total_steps: int, step: int) -> float:
    """The schedule of `jaxrun.optim.lr_factor`, in plain Python.

    llm.c: linear warmup over `warmup_steps`, then cosine decay. Speedrun:
    constant, then linear decay over the last `cooldown_frac` of the steps.
    """
    warm = min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps else 1.0
    decay_start = max(o.warmup_steps, (1 - o.cooldown_frac) * total_steps)
    ratio = min(max((step - decay_start) / max(total_steps - decay_start, 1), 0.0), 1.0)
    keep = 1.0 - ratio if o.cooldown_shape == "linear" else 0.5 * (1.0 + math.cos(math.pi * ratio))
    return warm * (o.final_lr_frac + (1.0 - o.final_lr_frac) * keep)


def make_optimizers(
    cfg: Config, model: torch.nn.Module, *, fused: bool | None = None, compile_muon: bool = False
) -> list[torch.optim.Optimizer]:
    """AdamW (+ Muon for `kind="muon_adam"`) over `model`'s params, grouped as jaxrun groups them."""
    o = cfg.optim
    check_supported(o)
    groups: dict[str, list[Tensor]] = {"embed": [], "head": [], "scalar": [], "hidden": []}
    for name, p in model.named_parameters():
        groups[convert.param_group(name, p.ndim)].append(p)
    lrs = {"embed": o.embed_lr, "head": o.head_lr, "scalar": o.scalar_lr, "hidden": o.hidden_lr}
    adam_names = ["embed", "head", "scalar"] + (["hidden"] if o.kind == "adamw" else [])
    adam_groups = [
        {
            "params": groups[g],
            "lr": lrs[g],
            "weight_decay": 0.0 if g == "scalar" and not o.adam_decay_vectors else o.adam_weight_decay,
        }
        for g in adam_names
        if groups[g]
    ]
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(adam_groups, betas=(o.adam_b1, o.adam_b2), eps=o.adam_eps, fused=fused)
    ]
    if o.kind == "muon_adam":
        optimizers.append(
            Muon(
                groups["hidden"],
                lr=o.muon_lr,
                weight_decay=o.muon_weight_decay,
                mu=o.muon_momentum,
                coeffs=NS_COEFFS[o.muon_ns],
                ns_dtype=getattr(torch, o.muon_ns_dtype),
                compile_update=compile_muon,
            )
        )
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * factor


def schedule(cfg: Config) -> Callable[[int], float]:
    """`step -> lr factor` for `cfg`'s run length."""
    return lambda step: lr_factor(cfg.optim, cfg.train.steps, step)
