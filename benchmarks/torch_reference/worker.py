"""The PyTorch side of `launch.py bench` and of tests/test_parity.py, run as its own process.

  python -m benchmarks.torch_reference.worker bench DIR          # a bench folder (see benchmarks/bench.py)
  python -m benchmarks.torch_reference.worker parity IN.npz OUT.npz
  python -m benchmarks.torch_reference.worker record77 IN.npz OUT.npz [IN2.npz OUT2.npz ...]
                                                  # record77_worker.py's protocol, requests in turn

A parity request holds the config (`config`, JSON), the task (`task`),
jaxrun params under `params/<path>` and token rows under `rows` (`[B, T+1]`
for "grads", `[steps, B, T+1]` for "train"). "init" answers the twin's own
initial params; "grads" the loss and the gradient of the loss the recipe
differentiates; "train" the train loss and params after each step. Arrays
cross as numpy, laid out as jaxrun's params. It needs torch and numpy only
(plus `jaxrun.config` and the helpers of `benchmarks.bench`, which import no
JAX), so it also runs in a CPU-only torch interpreter other than jaxrun's.
"""

from __future__ import annotations

import json
import statistics
import sys

import numpy as np
import torch

from benchmarks.bench import Workdir, peak_host_memory, split_rows, timed_loop, warm_up
from benchmarks.torch_reference import model as twin
from benchmarks.torch_reference import optim, train
from jaxrun.config import config_from_dict

_SDPA_BACKENDS = ("flash", "cudnn", "efficient", "math")


def _tokens(rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.from_numpy(x.astype(np.int64)).to(device) for x in split_rows(rows))


def parity(request: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Answer one parity request on the CPU in float32 (see the module docstring)."""
    torch.manual_seed(0)
    cfg = config_from_dict(json.loads(str(request["config"])))
    model = twin.build_model(cfg.model, cfg.name)
    task = str(request["task"])
    if task == "init":
        return {f"params/{k}": v for k, v in twin.export_params(model).items()}
    params = {k.removeprefix("params/"): v for k, v in request.items() if k.startswith("params/")}
    twin.load_params(model, params)
    if task == "grads":
        inputs, targets = _tokens(request["rows"], torch.device("cpu"))
        loss_sum = model(inputs, targets)
        count = (targets >= 0).sum()
        loss = loss_sum / count
        (loss if cfg.optim.loss_reduction == "mean" else loss_sum).backward()
        out = {f"grads/{k}": v for k, v in twin.export_grads(model).items()}
        return out | {"loss": np.float64(loss.item())}
    if task == "train":
        optimizers = optim.make_optimizers(cfg, model)
        out = {}
        for step, rows in enumerate(request["rows"]):
            inputs, targets = _tokens(rows, torch.device("cpu"))
            loss = train.train_step(model, optimizers, cfg, step, inputs, targets)
            out[f"loss/{step}"] = np.float64(loss.item())
            out |= {f"params/{step}/{k}": v for k, v in twin.export_params(model).items()}
        return out
    raise ValueError(f"unknown parity task {task!r}")


def _set_attention(backend: str) -> str:
    """Pick the SDPA backend on CUDA (all others off); a description of what attention runs."""
    if not torch.cuda.is_available():
        return "F.scaled_dot_product_attention (CPU)"
    if backend == "auto":
        return "F.scaled_dot_product_attention (torch's choice of backend)"
    for name in _SDPA_BACKENDS:
        getattr(torch.backends.cuda, f"enable_{'mem_efficient' if name == 'efficient' else name}_sdp")(
            name == backend
        )
    return f"F.scaled_dot_product_attention, {backend} backend only"


def bench(work: Workdir) -> dict:
    """Train the twin on the bench folder's batches; the result `benchmarks.bench` tabulates."""
    cfg, settings = work.load()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    attention = _set_attention(settings["torch_attention"])
    compiled = settings["torch_compile"]
    train_rows, val_rows = work.rows()
    init = dict(np.load(work.init_params))
    model = twin.build_model(cfg.model, cfg.name).to(device)
    twin.load_params(model, init)
    if compiled:
        model.compile(dynamic=False)  # as train_gpt_simple.py does

    def fresh_optimizers():
        return optim.make_optimizers(cfg, model, fused=device.type == "cuda", compile_muon=compiled)

    optimizers = fresh_optimizers()

    def step(i: int) -> float:
        inputs, targets = _tokens(train_rows[i], device)
        return float(train.train_step(model, optimizers, cfg, i, inputs, targets))

    warmup_ms = warm_up(step, settings["warmup_steps"])
    twin.load_params(model, init)  # timing starts from the same weights, as the speedrun does
    optimizers = fresh_optimizers()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    vb = cfg.data.val_batch_seqs
    val_inputs, val_targets = _tokens(val_rows[: len(val_rows) // vb * vb], device)

    def evaluate() -> float:
        return train.evaluate(model, val_inputs, val_targets, vb)

    run = timed_loop(step, evaluate, settings["steps"], settings["val_every"])
    median_ms = statistics.median(run["step_ms"])
    on_cuda = device.type == "cuda"
    return {
        "framework": "torch",
        "version": f"torch {torch.__version__}",
        "device": torch.cuda.get_device_name(device) if on_cuda else "CPU",
        "attention": attention,
        "compiler": "torch.compile (inductor, dynamic=False)" if compiled else "eager",
        "precision": twin.describe_precision(cfg.model, cfg.name),
        # torch compiles inside the first step: its time beyond a normal step's
        "compile_s": max(warmup_ms[0] - median_ms, 0.0) / 1000 if warmup_ms else float("nan"),
        "warmup_ms": warmup_ms,
        "val_rows": len(val_inputs),
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if on_cuda else peak_host_memory(),
        "memory_kind": "device" if on_cuda else "host RSS",
        **run,
    }


def main(argv: list[str]) -> int:
    if argv[:1] == ["bench"] and len(argv) == 2:
        work = Workdir(argv[1])
        work.result("torch").write_text(json.dumps(bench(work), indent=2))
        return 0
    if argv[:1] == ["parity"] and len(argv) == 3:
        with np.load(argv[1]) as request:
            np.savez(argv[2], **parity(dict(request)))
        return 0
    if argv[:1] == ["record77"] and len(argv) >= 3 and len(argv) % 2 == 1:
        from benchmarks.torch_reference import record77_worker

        for source, target in zip(argv[1::2], argv[2::2]):  # several requests share one torch start-up
            with np.load(source) as request:
                np.savez(target, **record77_worker.handle(dict(request)))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
