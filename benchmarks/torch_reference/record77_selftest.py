"""Checks of the record-77 twin on its own: `python -m benchmarks.torch_reference.record77_selftest`.

Runs under any interpreter with torch and numpy (no pytest needed); tests/test_record77_twin.py
runs it in the torch interpreter. Each check raises AssertionError with what went wrong.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import numpy as np
import torch

from benchmarks.torch_reference import record77_convert as convert
from benchmarks.torch_reference.record77 import (
    GPT77,
    PAIRED_LAYERS,
    VE_TABLE,
    Features,
    ForwardSchedule,
    Record77Config,
)
from benchmarks.torch_reference.record77_ops import (
    DENSE_MAX_T,
    SoftcappedCE,
    banded_varlen_attention,
    bigram_hash,
    dense_varlen_attention,
    norm,
    varlen_attention,
)
from benchmarks.torch_reference.record77_optim import Batch, Schedule, Trainer, polar_express

CFG = Record77Config(vocab_size=256, model_dim=96, num_heads=6, head_dim=16, max_seq_len=64, block_size=8)
T = 64
CU = torch.tensor([0, 20, 41, T, T])


def _model(cfg: Record77Config = CFG, seed: int = 0) -> GPT77:
    torch.manual_seed(seed)
    model = GPT77(cfg)
    with torch.no_grad():  # wake the zero-initialised gates and tables so every path carries signal
        for p in (model.attn_gate_bank, model.ve_gate_bank, model.smear_gate.weight, model.skip_gate.weight):
            p.normal_(0, 0.5)
        model.bigram_embed.weight.normal_(0, 0.05)
        model.mlp_bank[:11, 1].normal_(0, 0.02)
        model.scalars[2 * 11] = 0.3
    return model


def _batch(seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CFG.vocab_size, (T + 1,), generator=g)
    return Batch(tokens[:-1], tokens[1:], CU)


def check_converter_round_trip() -> None:
    model = _model()
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    flat = convert.torch_to_jax(state)
    D, H, V, F_ = CFG.model_dim, CFG.num_heads, CFG.vocab_size, CFG.mlp_dim
    shapes = {
        "embed/tokens": (V, D),
        "lm_head/w": (D, V),
        "value_embed/tables": (5, V, D),
        "bigram/table": (5 * V, D),
        "smear/gate": (12, 1),
        "smear/lambda": (),
        "blocks/attn/w_q": (10, D, D),
        "blocks/attn/w_o": (10, D, D),
        "blocks/attn/gate": (10, 12, H),
        "blocks/attn/ve_gate": (5, 12, H),
        "blocks/attn/sa_lambdas": (11, 2),
        "blocks/mlp/w_up": (11, D, F_),
        "blocks/mlp/w_down": (11, F_, D),
        "residual/skip_gate": (12, 1),
        "residual/skip_lambda": (),
        "residual/backout_lambda": (),
        "residual/x0_lambdas": (11,),
    }
    for path, shape in shapes.items():
        assert flat[path].shape == shape, (path, flat[path].shape, shape)
    assert len(flat) == 22, sorted(flat)
    back = convert.jax_to_torch(flat, CFG.num_scalars)
    again = convert.torch_to_jax(back)
    for path in flat:
        assert np.array_equal(flat[path], again[path]), path
    for name, value in state.items():
        if name != "mlp_bank":
            assert np.array_equal(value, back[name]), name
    assert np.array_equal(state["mlp_bank"][:11], back["mlp_bank"][:11]) and not back["mlp_bank"][11].any()
    q = state["attn_bank"][4, :D]  # slot 4 = layer 4's W_Q, [out, in]
    assert np.array_equal(flat["blocks/attn/w_q"][4], q.T)
    assert float(flat["residual/backout_lambda"]) == 0.5 and float(flat["residual/skip_lambda"]) == -1.5


def _paired_brute_force(
    model: GPT77, x: torch.Tensor, layer: int, ve: torch.Tensor, window: int
) -> torch.Tensor:
    """Paired attention head by head with explicit loops, from the non-paired RoPE table at 2t + (h odd)."""
    D, H, K = CFG.model_dim, CFG.num_heads, CFG.head_dim
    a = layer - (layer > 6)
    sa = model.scalars[2 * layer : 2 * layer + 2]
    w = model.attn_bank[a]
    qkv = (x @ (sa[0] * w[: 3 * D]).T).view(T, 3, H, K)
    q, k, v = norm(qkv[:, 0]), norm(qkv[:, 1]), qkv[:, 2]
    cos, sin = model.yarn.factor1.float(), model.yarn.factor2.float()  # sin carries the sign pattern

    def rope(vec, pos):
        flip = vec.view(K // 2, 2).flip(-1).reshape(K)
        return cos[pos] * vec + sin[pos] * flip

    ve_gate = 2 * torch.sigmoid(x[:, :12] @ model.ve_gate_bank[VE_TABLE[layer]].T)  # [T, H]
    v = v + ve_gate[..., None] * ve.view(T, H, K)
    docs = torch.searchsorted(2 * CU, torch.arange(2 * T), right=True)
    out = torch.zeros(T, H, K)
    for g in range(H // 2):
        # virtual position 2t+j, group g: head h = g + 3j for q, k and v alike; q/k of head h carry
        # RoPE at position 2t + (h mod 2) (the source rotates pairs (2g', 2g'+1) at (2t, 2t+1), then views)
        qs = torch.stack([rope(q[t, g + 3 * j], 2 * t + (g + 3 * j) % 2) for t in range(T) for j in (0, 1)])
        ks = torch.stack([rope(k[t, g + 3 * j], 2 * t + (g + 3 * j) % 2) for t in range(T) for j in (0, 1)])
        vs = torch.stack([v[t, g + 3 * j] for t in range(T) for j in (0, 1)])
        for i in range(2 * T):
            keys = [j for j in range(2 * T) if docs[j] == docs[i] and 0 <= i - j <= window]
            p = torch.softmax(model.yarn.attn_scale * (ks[keys] @ qs[i]), 0)
            out[i // 2, g + 3 * (i % 2)] = p @ vs[keys]
    out = out * torch.sigmoid(x[:, :12] @ model.attn_gate_bank[a].T)[..., None]
    return out.reshape(T, D) @ (sa[1] * w[3 * D :]).T


def check_paired_interleave() -> None:
    model = _model()
    layer, window = 9, 24
    x = norm(torch.randn(T, CFG.model_dim, generator=torch.Generator().manual_seed(1)))
    ve = model.value_embeds.view(5, CFG.vocab_size, -1)[VE_TABLE[layer], _batch(2).inputs]
    a = layer - 1
    with torch.no_grad():
        got = model._attention(
            x,
            layer,
            model.attn_bank[a],
            model.scalars[18:20],
            ve,
            model.attn_gate_bank[a],
            model.ve_gate_bank[VE_TABLE[layer]],
            CU,
            window,
            False,
        )
        want = _paired_brute_force(model, x, layer, ve, window)
    err = (got - want).abs().max() / want.abs().max()
    assert layer in PAIRED_LAYERS and err < 1e-5, f"paired attention vs per-head reference: rel err {err:.2e}"


def check_banded_attention() -> None:
    """The banded attention path against the dense mask, values and gradients, in float32.

    Layouts: the self-test's documents (boundaries at 20 and 41, so windows straddle them), a ragged
    length with a block left partly empty, one-token documents, a paired layer's doubled sequence
    (3 heads, cu_seqlens and window in virtual positions), and one document spanning the sequence.
    Windows of 0, below, at and above the block size, and reaching past the sequence's start.
    """
    g = torch.Generator().manual_seed(7)
    cases = [  # (length, heads, cu_seqlens, windows, block)
        (T, 3, CU, (0, 5, 8, 19, 40, 100), 8),
        (T, 3, CU, (7, 24), 16),
        (61, 2, torch.tensor([0, 7, 30, 61]), (3, 13, 60), 8),
        (40, 2, torch.tensor([0, 1, 2, 3, 4, 17, 18, 40, 40]), (2, 9), 4),
        (2 * T, 3, 2 * CU, (17, 48), 16),
        (T, 2, torch.tensor([0, T]), (T - 2, T - 1), 16),
    ]
    for length, heads, cu, windows, block in cases:
        q, k, v = (torch.randn(length, heads, 16, generator=g, requires_grad=True) for _ in range(3))
        grad_out = torch.randn(length, heads, 16, generator=g)
        for window in windows:
            results = []
            for fn in (dense_varlen_attention, lambda *a: banded_varlen_attention(*a, block=block)):
                y = fn(q, k, v, cu, window, 0.3)
                results.append((y, *torch.autograd.grad((y * grad_out).sum(), (q, k, v))))
            for name, want, got in zip(("y", "dq", "dk", "dv"), *results):
                err = (got - want).abs().max().item()
                where = f"T={length} cu={cu.tolist()} w={window}"
                assert err < 1e-5, f"banded vs dense {name}: {where}: {err:.2e}"
    q, k, v = (torch.randn(T, 3, 16, generator=g) for _ in range(3))
    tiny = varlen_attention(q, k, v, CU, 8, 0.3)
    dense = dense_varlen_attention(q, k, v, CU, 8, 0.3)
    assert torch.equal(tiny, dense), "tiny CPU runs must stay on the dense path"
    long = DENSE_MAX_T + 1
    q, k, v = (torch.randn(long, 1, 8, generator=g) for _ in range(3))
    cu = torch.tensor([0, 1000, long])
    banded = banded_varlen_attention(q, k, v, cu, 128, 0.3)
    assert torch.equal(varlen_attention(q, k, v, cu, 128, 0.3), banded), (
        "long CPU runs must take the banded path"
    )


def check_head_backward() -> None:
    """SoftcappedCE without FP8 against autograd of the plain formula; with FP8 close to it, yet quantized."""
    g = torch.Generator().manual_seed(3)
    x, w = norm(torch.randn(T, 96, generator=g)), 0.05 * torch.randn(96, 256, generator=g)
    tgt, mtp = torch.randint(0, 256, (T,), generator=g), torch.tensor([1.0, 0.5, 0.25])
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    z = 23 * torch.sigmoid((xr @ wr + 5) / 7.5)
    lse = torch.logsumexp(z, -1)
    ref = sum(mtp[k] * (lse[: T - k] - z[torch.arange(T - k), tgt[k:]]).sum() for k in range(3))
    ref.backward()
    grads = {}
    for fp8 in (False, True):
        xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = SoftcappedCE.apply(xf, wf, tgt, mtp, fp8).sum()
        loss.backward()
        grads[fp8] = (loss.item(), xf.grad, wf.grad)
    loss, gx, gw = grads[False]
    assert abs(loss - ref.item()) < 1e-4 * abs(ref.item())
    assert torch.allclose(gx, xr.grad, rtol=1e-4, atol=1e-6) and torch.allclose(
        gw, wr.grad, rtol=1e-4, atol=1e-6
    )
    loss8, gx8, gw8 = grads[True]
    assert abs(loss8 - loss) < 1e-2 * abs(loss), (loss8, loss)
    rel = (gw8 - gw).norm() / gw.norm()
    assert 1e-4 < rel < 0.1, f"FP8 head weight gradient off by {rel:.2e} (want quantized but close)"


def check_training_decreases() -> None:
    """All features on, 12 scheduled + 2 extension steps on fixed batches: finite, eval loss down, YaRN as the record."""
    model = _model()
    trainer = Trainer(model, Schedule(12, 2), polar_dtype=torch.float32)
    batches = [_batch(10 + r) for r in range(2)]

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            out = sum(trainer.losses(b).mean().item() for b in batches) / len(batches)
        model.train()
        return out

    before = eval_loss()
    losses = [trainer.train_step(s, batches) for s in range(14)]
    after = eval_loss()
    assert all(math.isfinite(v) for v in losses), losses
    assert after < before - 0.1, f"eval loss {before:.3f} -> {after:.3f}"
    assert (
        abs(model.yarn.attn_scale - 0.131778) < 1e-6 and abs(model.yarn_paired.attn_scale - 0.131778) < 1e-6
    )
    assert trainer.opt.split_embed and trainer.schedule.split_step == 9
    assert not torch.equal(
        model.embed.weight, model.lm_head.weight.T
    )  # untied: updated on their own since step 11
    assert trainer.opt.state["embed.weight"]["step"] == trainer.opt.state["lm_head.weight"]["step"]


def check_feature_switches() -> None:
    """Every switch, flipped from the record's setting, changes the training loss and keeps it finite."""
    inp = _batch(4)
    sched = ForwardSchedule(torch.tensor([1.0, 0.5, 0.25]), 8, 24, 64)
    base = _model()(inp.inputs, inp.targets, CU, bigram_hash(inp.inputs, CFG.bigram_rows), sched).sum().item()
    for name in (f.name for f in dataclasses.fields(Features)):
        cfg = dataclasses.replace(CFG, features=Features(**{name: not getattr(Features(), name)}))
        loss = (
            _model(cfg)(inp.inputs, inp.targets, CU, bigram_hash(inp.inputs, CFG.bigram_rows), sched)
            .sum()
            .item()
        )
        assert math.isfinite(loss) and loss != base, (name, loss, base)


def check_polar_express() -> None:
    g = torch.randn(3, 48, 16, generator=torch.Generator().manual_seed(5))
    for mats in (g, g.mT):
        s = torch.linalg.svdvals(polar_express(mats, torch.float32))
        assert s.min() > 0.6 and s.max() < 1.25, s


CHECKS = (
    check_converter_round_trip,
    check_paired_interleave,
    check_banded_attention,
    check_head_backward,
    check_polar_express,
    check_feature_switches,
    check_training_decreases,
)


def main() -> int:
    torch.set_num_threads(1)
    for check in CHECKS:
        check()
        print(f"ok {check.__name__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
