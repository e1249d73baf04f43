"""Record 77's NorMuonAndAdam and training schedule for one process (no comms), in plain torch.

Written from the record-77 script's `NorMuonAndAdam`, `TrainingSchedule`, `TrainingManager` and
`get_muon_momentum`. One process stands for the source's 8 ranks: each micro-batch is one rank's
packed sequence, its summed token loss is back-propagated, and gradients are averaged over the
micro-batches (the source's reduce AVG). The sparse bigram all-to-all is a dense mean here, which
is what it computes. Params are float32 masters in every mode (the source's bf16 + mantissa
buffer holds the same float32 for NorMuon params; its bf16 Adam params round each update, which
the twin does not). `polar_dtype` is the Polar Express dtype: bf16 as the source, float32 for an
exact CPU reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate, pairwise

import torch
from torch import Tensor

from benchmarks.torch_reference.record77 import GPT77, ForwardSchedule
from benchmarks.torch_reference.record77_ops import bigram_hash

# (a, b, c) per iteration, computed for num_iters=5, safety_factor=2e-2, cushion=2
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
NORMUON = dict(lr=0.023, beta2=0.95, weight_decay=1.2)
ADAM = dict(lr=0.008, eps=1e-10, weight_decay=0.005)
# source label -> (betas, lr_mul, wd_mul), the script's param_table
ADAM_TABLE = {
    "scalars": ((0.9, 0.99), 5.0, 0.0),
    "smear_gate.weight": ((0.9, 0.99), 0.01, 0.0),
    "skip_gate.weight": ((0.9, 0.99), 0.05, 0.0),
    "attn_gate_bank": ((0.9, 0.99), 1.0, 1.0),
    "ve_gate_bank": ((0.9, 0.99), 1.0, 1.0),
    "lm_head.weight": ((0.5, 0.95), 1.0, 150.0),
    "bigram_embed.weight": ((0.75, 0.95), 75.0, 5.0),
    "post_lambdas": ((0.9, 0.95), 1.0, 0.0),
    "x0_lambdas": ((0.9, 0.95), 1.0, 0.0),
    "bigram_lambdas": ((0.9, 0.95), 1.0, 0.0),
    "resid_lambdas": ((0.9, 0.95), 5.0, 0.0),
    "value_embeds": ((0.75, 0.95), 75.0, 5.0),
    "embed.weight": ((0.5, 0.95), 1.0, 150.0),
}
NORMUON_PARAMS = ("attn_bank", "mlp_bank")


def matrices(name: str, t: Tensor) -> Tensor:
    """The bank as the stack of matrices NorMuon orthogonalizes one by one: the source's `.reshape`.

    attn_bank [La, 4D, D] is 4·La square matrices (Q, K, V, O apart), mlp_bank [12, 2, F, D] 24 of [F, D].
    """
    return t.reshape(-1, t.shape[-1], t.shape[-1]) if name == "attn_bank" else t.reshape(-1, *t.shape[-2:])


@dataclass(frozen=True)
class Stage:
    lr_mul: float
    batch_size: int  # global tokens per step
    window_blocks: tuple[int, int]  # (short, long)
    mtp_start: tuple[float, ...]
    mtp_end: tuple[float, ...]
    train_max_seq_len: int


STAGES = (
    Stage(1.0, 8 * 2048 * 8, (1, 3), (1.0, 0.5, 0.25), (1.0, 0.5, 0.0), 896),
    Stage(1.52, 16 * 2048 * 8, (3, 7), (1.0, 0.5), (1.0, 0.0), 2048),
    Stage(1.73, 24 * 2048 * 8, (5, 11), (1.0,), (1.0,), 2048),
    Stage(1.0, 24 * 2048 * 8, (6, 13), (1.0,), (1.0,), 2048),  # extension; its lr_mul is never used
)


class Schedule:
    """Stages over `scheduled` steps (thirds) plus `extension` steps: lr, momentum, MTP, windows, split step."""

    def __init__(
        self,
        scheduled: int = 1450,
        extension: int = 40,
        cooldown_frac: float = 0.6,
        muon_warmup: int = 300,
        muon_cooldown: int = 50,
        stages: tuple[Stage, ...] = STAGES,
    ):
        self.scheduled, self.total = scheduled, scheduled + extension
        self.cooldown_frac, self.muon_warmup, self.muon_cooldown, self.stages = (
            cooldown_frac,
            muon_warmup,
            muon_cooldown,
            stages,
        )
        ends = [0] + [round(c * scheduled) for c in accumulate([1 / 3] * (len(stages) - 1))] + [self.total]
        self.boundaries = list(pairwise(ends))
        self.split_step = self.boundaries[2][0] | 1  # first step of stage 2, forced odd so Adam runs

    def lookup(self, step: int) -> tuple[Stage, float]:
        for stage, (start, end) in zip(self.stages, self.boundaries):
            if step < end:
                return stage, (step - start) / (end - start)
        return self.stages[-1], 1.0

    def lr(self, step: int) -> float:
        lr = self.lookup(step)[0].lr_mul
        cd_start = int(self.scheduled * (1 - self.cooldown_frac))
        if step >= cd_start:
            t = min(1.0, (step - cd_start) / (self.scheduled - cd_start))
            lr = lr * (1 - t) + 0.15 * t
        return lr

    def momentum(self, step: int, lo: float = 0.85, hi: float = 0.95) -> float:
        cd_start = self.total - self.muon_cooldown
        if step < self.muon_warmup:
            return lo + step / self.muon_warmup * (hi - lo)
        if step > cd_start:
            return hi - (step - cd_start) / self.muon_cooldown * (hi - lo)
        return hi

    def mtp_weights(self, step: int) -> list[float]:
        stage, t = self.lookup(step)
        return [a + (b - a) * t for a, b in zip(stage.mtp_start, stage.mtp_end)]


def polar_express(g: Tensor, dtype: torch.dtype) -> Tensor:
    """5 Polar Express iterations on a stack of matrices: X(bA + cA²) with A = XᵀX when tall, else (bA + cA²)X."""
    X = g.to(dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * (1 + 2e-2) + 1e-6)
    tall = g.size(-2) > g.size(-1)
    for a, b, c in POLAR_EXPRESS:
        A = X.mT @ X if tall else X @ X.mT
        B = (b * A.float() + c * (A.float() @ A.float())).to(dtype)  # the fused ba_plus_cAA, fp32 accumulate
        X = a * X + (X @ B if tall else B @ X)
    return X


def normuon_variance(v: Tensor, buf: Tensor, beta2: float, red_dim: int) -> Tensor:
    """NorMuon: per-row/column second moment (no bias correction), then rescale to keep ‖v‖_F."""
    v_mean = v.float().square().mean(dim=red_dim, keepdim=True)
    size = v.size(red_dim)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * size).sqrt()
    buf.lerp_(v_mean, 1 - beta2)
    step = buf.clamp_min(1e-10).rsqrt()
    v_norm_new = ((v_mean * size) * step.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    return v * (step * (v_norm / v_norm_new.clamp_min(1e-10))).type_as(v)


class NorMuonAndAdam:
    """The source's optimizer math on one process, including the embed/lm_head tie."""

    def __init__(self, model: GPT77, polar_dtype: torch.dtype = torch.bfloat16):
        self.model, self.polar_dtype = model, polar_dtype
        self.params = dict(model.named_parameters())
        self.state: dict[str, dict] = {}
        for name, p in self.params.items():
            if name in NORMUON_PARAMS:
                mats = matrices(name, p.data)
                rows, cols = mats.shape[-2:]
                red = (mats.size(0), rows, 1) if rows >= cols else (mats.size(0), 1, cols)
                self.state[name] = dict(
                    momentum=torch.zeros_like(mats), second=torch.zeros(red, device=p.device)
                )
            else:
                self.state[name] = dict(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
        self.split_embed = False

    def _normuon(self, name: str, p: Tensor, grad: Tensor, lr: float, momentum: float) -> None:
        st = self.state[name]
        mats, g = matrices(name, p.data), matrices(name, grad).float()
        st["momentum"].lerp_(g, 1 - momentum)
        g = g.lerp(st["momentum"], momentum)
        rows, cols = mats.shape[-2:]
        v = polar_express(g, self.polar_dtype)
        v = normuon_variance(v, st["second"], NORMUON["beta2"], -1 if rows >= cols else -2).float()
        shape_mult = max(1.0, rows / cols) ** 0.5
        per_matrix = torch.ones(mats.size(0), 1, 1, device=p.device)
        if name == "mlp_bank":
            per_matrix[1::2] = 2.0  # c_proj (odd matrices of the flattened bank) at twice the lr
        lr_eff = shape_mult * per_matrix * lr * NORMUON["lr"]
        wd = NORMUON["weight_decay"] * lr * NORMUON["lr"]
        mask = (v * mats) >= 0
        mats.copy_(mats - mats * mask * wd * lr_eff - v * lr_eff)

    def _adam(self, name: str, p: Tensor, grad: Tensor, lr_sched: float) -> None:
        st = self.state[name]
        (beta1, beta2), lr_mul, wd_mul = ADAM_TABLE[name]
        lr = ADAM["lr"] * lr_sched * lr_mul
        st["step"] += 1
        t = st["step"]
        step_size = lr * (1 - beta2**t) ** 0.5 / (1 - beta1**t)
        st["m"].mul_(beta1).add_(grad, alpha=1 - beta1)
        st["v"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        update = st["m"].div(st["v"].sqrt().add(ADAM["eps"])).mul(step_size)
        mask = (update * p.data) > 0  # cautious decay: strict, unlike NorMuon's >=
        update.addcmul_(p.data, mask, value=lr * lr * ADAM["weight_decay"] * wd_mul)
        p.data.sub_(update)

    @torch.no_grad()
    def step(self, lr: float, momentum: float, do_adam: bool, num_ranks: int) -> None:
        """One update from the summed per-rank grads in .grad (Adam's kept over two steps), then clear them."""
        lm, embed = self.params["lm_head.weight"], self.params["embed.weight"]
        if do_adam and not self.split_embed and embed.grad is not None:
            lm.grad = lm.grad + embed.grad.T
        for name, p in self.params.items():
            if p.grad is None or (name == "embed.weight" and not self.split_embed):
                continue
            if name in NORMUON_PARAMS:
                self._normuon(name, p, p.grad / num_ranks, lr, momentum)
            elif do_adam:
                self._adam(name, p, p.grad / num_ranks, lr)
        if do_adam and not self.split_embed:
            embed.data.copy_(lm.data.T)
        for name, p in self.params.items():
            if do_adam or name in NORMUON_PARAMS:
                p.grad = None

    def untie(self) -> None:
        """At the split step: embed's Adam state becomes lm_head's, transposed."""
        lm, emb = self.state["lm_head.weight"], self.state["embed.weight"]
        emb["step"], emb["m"], emb["v"] = lm["step"], lm["m"].T.clone(), lm["v"].T.clone()
        self.split_embed = True


@dataclass
class Batch:
    """One rank-local packed sequence: inputs, targets [T] and cu_seqlens padded with T."""

    inputs: Tensor
    targets: Tensor
    cu_seqlens: Tensor


class Trainer:
    """The source's TrainingManager on one process: schedule, YaRN at long-window changes, optimizer."""

    def __init__(self, model: GPT77, schedule: Schedule, polar_dtype: torch.dtype = torch.bfloat16):
        self.model, self.schedule = model, schedule
        self.opt = NorMuonAndAdam(model, polar_dtype)
        self.ws_short, self.ws_long = schedule.stages[0].window_blocks
        self.forward_args = self.advance(0)

    def advance(self, step: int) -> ForwardSchedule:
        """Windows, YaRN and MTP weights for `step` (the source's advance_schedule)."""
        stage, _ = self.schedule.lookup(step)
        bs = self.model.cfg.block_size
        short, long = stage.window_blocks
        if long != self.ws_long:
            self.model.yarn.apply(self.ws_long * bs, long * bs)
            self.model.yarn_paired.apply(self.ws_long * bs, long * bs)
        self.ws_short, self.ws_long = short, long
        mtp = torch.tensor(self.schedule.mtp_weights(step), device=self.model.lm_head.weight.device)
        self.forward_args = ForwardSchedule(mtp, short * bs, long * bs, stage.train_max_seq_len)
        return self.forward_args

    def losses(self, batch: Batch) -> Tensor:
        rows = self.model.cfg.bigram_rows
        return self.model(
            batch.inputs, batch.targets, batch.cu_seqlens, bigram_hash(batch.inputs, rows), self.forward_args
        )

    def backward(self, batches: list[Batch]) -> float:
        """Sum-loss backward per micro-batch (one per rank); the mean over ranks of the summed losses."""
        total = 0.0
        for batch in batches:
            loss = self.losses(batch).sum()
            loss.backward()
            total += loss.item()
        return total / len(batches)

    def train_step(self, step: int, batches: list[Batch]) -> float:
        self.advance(step)
        loss = self.backward(batches)
        s = self.schedule
        self.opt.step(s.lr(step), s.momentum(step), step % 2 == 1, len(batches))
        if step == s.split_step:
            self.opt.untie()
        return loss


def is_tied(schedule: Schedule, step: int) -> bool:
    """Whether step's update still treats embed as lm_headᵀ (up to and including the split step)."""
    return step <= schedule.split_step
