"""The record-77 twin's side of a parity test: `python -m benchmarks.torch_reference.worker record77 IN.npz OUT.npz`.

Request (one .npz; strings as 0-d arrays):
  task        "init" | "grads" | "train"
  config      JSON of `record77.Record77Config.to_dict()`: sizes, "dtype" (activation dtype), "features"
  schedule    JSON {"scheduled": S, "extension": E} (+ optional "cooldown_frac", "muon_warmup", "muon_cooldown")
  params/<p>  jaxrun's record-77 params, flat paths as RECORD77 layout (not for "init")
  init:   seed (int, optional)
  grads:  step (int: MTP weights, windows and YaRN state of that step, as training reaches it),
          mode ("train" default, or "eval"), inputs, targets [R, T] int, cu_seqlens [R, N] int padded with T
          (R micro-batches stand for the source's R ranks)
  train:  steps N, polar_dtype ("bfloat16" default, or "float32"), and for s < N:
          inputs/{s}, targets/{s} [R, T_s], cu_seqlens/{s} [R, N_s]; training starts at step 0
Response:
  init:   params/<p>
  grads:  loss (train: mean over micro-batches of the summed token losses, the objective differentiated;
          eval: mean token loss), losses [R, T] (per token), grads/<p> (train mode only; while tied,
          up to the split step, lm_head/w holds embed's gradient too and embed/tokens is zero, as jaxrun
          reads the embedding from lm_head/w), attn_scale, attn_scale_paired, ws_short, ws_long (tokens),
          mtp_weights
  train:  loss/{s} and params/{s}/<p> after each step s
"""

from __future__ import annotations

import json

import numpy as np
import torch

from benchmarks.torch_reference import record77_convert as convert
from benchmarks.torch_reference.record77 import GPT77, Record77Config
from benchmarks.torch_reference.record77_optim import Batch, Schedule, Trainer, is_tied


def _schedule(request) -> Schedule:
    s = json.loads(str(request["schedule"]))
    return Schedule(s.pop("scheduled"), s.pop("extension"), **s)


def export_params(model: GPT77) -> dict[str, np.ndarray]:
    # copies: a numpy view of a live tensor would change with later steps before it is saved
    return convert.torch_to_jax({k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()})


def load_params(model: GPT77, flat: dict[str, np.ndarray]) -> None:
    state = convert.jax_to_torch(flat, model.cfg.num_scalars)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(np.asarray(state[name], dtype=np.float32)))


def export_grads(model: GPT77, tied: bool, scale: float) -> dict[str, np.ndarray]:
    grads = {
        n: (torch.zeros_like(p) if p.grad is None else p.grad * scale).cpu().numpy()
        for n, p in model.named_parameters()
    }
    if tied:
        grads["lm_head.weight"] = grads["lm_head.weight"] + grads["embed.weight"].T
        grads["embed.weight"] = np.zeros_like(grads["embed.weight"])
    return convert.torch_to_jax(grads)


def _batches(request, suffix: str = "") -> list[Batch]:
    rows = zip(*(request[f"{k}{suffix}"] for k in ("inputs", "targets", "cu_seqlens")))
    return [Batch(*(torch.from_numpy(np.asarray(a, dtype=np.int64)) for a in r)) for r in rows]


def handle(request: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Answer one record-77 request on the CPU (see the module docstring)."""
    cfg = Record77Config.from_dict(json.loads(str(request["config"])))
    task = str(request["task"])
    torch.manual_seed(int(request.get("seed", 0)))
    model = GPT77(cfg)
    if task == "init":
        return {f"params/{k}": v for k, v in export_params(model).items()}
    load_params(model, {k.removeprefix("params/"): v for k, v in request.items() if k.startswith("params/")})
    schedule = _schedule(request)
    if task == "grads":
        trainer = Trainer(model, schedule)
        step = int(request["step"])
        for s in range(step + 1):
            args = trainer.advance(s)
        batches = _batches(request)
        out = {
            "attn_scale": np.float64(model.yarn.attn_scale),
            "attn_scale_paired": np.float64(model.yarn_paired.attn_scale),
            "ws_short": np.int64(args.ws_short),
            "ws_long": np.int64(args.ws_long),
            "mtp_weights": args.mtp_weights.numpy(),
        }
        if str(request.get("mode", "train")) == "eval":
            model.eval()
            with torch.no_grad():
                losses = torch.stack([trainer.losses(b) for b in batches])
            return out | {"losses": losses.numpy(), "loss": np.float64(losses.mean().item())}
        losses = [trainer.losses(b) for b in batches]
        for loss in losses:
            loss.sum().backward()
        out["losses"] = torch.stack(losses).detach().numpy()
        out["loss"] = np.float64(out["losses"].sum(axis=1).mean())
        grads = export_grads(model, is_tied(schedule, step), 1 / len(batches))
        return out | {f"grads/{k}": v for k, v in grads.items()}
    if task == "train":
        polar = getattr(torch, str(request.get("polar_dtype", "bfloat16")))
        trainer = Trainer(model, schedule, polar)
        out = {}
        for s in range(int(request["steps"])):
            out[f"loss/{s}"] = np.float64(trainer.train_step(s, _batches(request, f"/{s}")))
            out |= {f"params/{s}/{k}": v for k, v in export_params(model).items()}
        return out
    raise ValueError(f"unknown record77 task {task!r}")
