"""One optimizer step and the val loss, as the recipes' training loops take them.

`train_step` runs a whole batch in micro-batches of `train.micro_batch_seqs`
rows, differentiates the summed token loss (train_gpt_simple.py's
`reduction="sum"`) or the mean over the batch's tokens (llm.c), clips the
gradient norm if the config says so, sets the scheduled learning rates and
steps every optimizer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from benchmarks.torch_reference import optim
from jaxrun.config import Config


def train_step(
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    cfg: Config,
    step: int,
    inputs: Tensor,
    targets: Tensor,
) -> Tensor:
    """One update on `[batch_seqs, T]` tokens; returns the mean train loss (a device scalar, unsynced)."""
    micro = cfg.train.micro_batch_seqs
    if inputs.size(0) % micro:
        raise ValueError(f"{inputs.size(0)} rows are not a multiple of train.micro_batch_seqs={micro}")
    count = (targets >= 0).sum()
    mean = cfg.optim.loss_reduction == "mean"
    total = torch.zeros((), device=inputs.device)
    for start in range(0, inputs.size(0), micro):
        loss_sum = model(inputs[start : start + micro], targets[start : start + micro])
        (loss_sum / count if mean else loss_sum).backward()
        total += loss_sum.detach()
    if cfg.optim.grad_clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip_norm)
    optim.set_lr(optimizers, optim.lr_factor(cfg.optim, cfg.train.steps, step))
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    return total / count


@torch.no_grad()
def evaluate(model: torch.nn.Module, inputs: Tensor, targets: Tensor, batch_seqs: int) -> float:
    """Mean token loss over `[N, T]` val rows, `batch_seqs` rows per forward."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=inputs.device)
    for start in range(0, inputs.size(0), batch_seqs):
        total += model(inputs[start : start + batch_seqs], targets[start : start + batch_seqs])
    model.train(was_training)
    return float(total) / max(int((targets >= 0).sum()), 1)
