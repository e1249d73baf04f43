"""The building blocks of record #77's GPT in plain torch: norm, RoPE with YaRN, masked attention, the loss.

Written from modded-nanogpt's record-77 script (records/track_1_short/2026-03-06_SimplifyHC) and the
`triton_kernels.py` embedded in its logs. Where the source uses a kernel (FlashAttention-3 varlen,
the fused softcapped cross-entropy, `torch._scaled_mm` in FP8), this file computes the same
numbers with ordinary torch ops, so they run on the CPU in float32 and on a GPU in bf16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# The fused CE's softcap z = A·σ((logit + B)/C).
SOFTCAP_A, SOFTCAP_B, SOFTCAP_C = 23.0, 5.0, 7.5
# lm_head FP8 scales: x / (100/448) and W / (1.6/448) in e4m3; logit gradients / (0.75/448) in e5m2.
# The gradient scale is the source's grad_scale (1 with 8 ranks) times 0.75/448.
HEAD_X_S, HEAD_W_S, HEAD_GRAD_S = 100 / 448, 1.6 / 448, 0.75 / 448
BIGRAM_MUL_CUR, BIGRAM_MUL_PREV = 36313, 27191


def norm(x: Tensor) -> Tensor:
    """RMSNorm without gain, in float32 with float32's epsilon (the compiled source's eps=None), back to x's dtype."""
    return F.rms_norm(x.float(), (x.size(-1),), eps=torch.finfo(torch.float32).eps).to(x.dtype)


def bigram_hash(tokens: Tensor, rows: int) -> Tensor:
    """Row of the bigram table per position: (36313·cur XOR 27191·prev) mod (rows-1); position 0 the reserved row.

    int32 arithmetic as the source's `get_bigram_hash` (the products wrap around in int32 before the
    XOR; `%` then takes torch's floor-mod sign rule). The source hashes its buffer after writing the
    reserved row into position 0, so position 1's previous token is that row, not token 0.
    """
    mod = rows - 1
    out = tokens.to(torch.int32).clone()
    out[0] = mod
    out[1:] = torch.bitwise_xor(BIGRAM_MUL_CUR * out[1:], BIGRAM_MUL_PREV * out[:-1]) % mod
    return out


class Yarn:
    """Half-truncated RoPE tables (bf16, as the source stores them) and the YaRN-managed attention scale.

    `paired` builds 2·head_dim wide tables whose halves sit at positions 2t and 2t+1, for the
    paired-head layers' doubled virtual sequence.
    """

    def __init__(
        self, head_dim: int, max_seq_len: int, paired: bool = False, device: torch.device | None = None
    ):
        self.head_dim, self.max_seq_len, self.paired, self.device = head_dim, max_seq_len, paired, device
        self.reset()

    def reset(self) -> None:
        freq = (1 / 1024) ** torch.linspace(
            0, 1, steps=self.head_dim // 4, dtype=torch.float32, device=self.device
        )
        freq = freq.repeat_interleave(2)
        self.angular_freq = torch.cat([freq, freq.new_zeros(self.head_dim // 2)])
        self._build()
        self.attn_scale = 0.1  # the source's starting softmax scale, not 1/sqrt(head_dim)

    def _build(self) -> None:
        t = torch.arange(2 * self.max_seq_len, dtype=torch.float32, device=self.device)
        if self.paired:
            theta1, theta2 = torch.outer(2 * t, self.angular_freq), torch.outer(2 * t + 1, self.angular_freq)
            cos, sin = (
                torch.cat((theta1.cos(), theta2.cos()), -1),
                torch.cat((theta1.sin(), theta2.sin()), -1),
            )
        else:
            theta = torch.outer(t, self.angular_freq)
            cos, sin = theta.cos(), theta.sin()
        self.factor1 = cos.to(torch.bfloat16)
        self.factor2 = sin.to(torch.bfloat16)
        self.factor2[..., 1::2] *= -1

    def apply(self, old_window: int, new_window: int, alpha: float = 1, beta: float = 32) -> None:
        """YaRN at a long-window change (tokens): cumulative frequency rescale and a larger attention scale."""
        rotations = old_window * self.angular_freq / (2 * torch.pi)
        scaling = old_window / new_window
        weight = torch.clamp((rotations - alpha) / (beta - alpha), 0, 1)
        self.angular_freq = self.angular_freq * (scaling + weight * (1 - scaling))
        self._build()
        self.attn_scale *= 0.2 * math.log(new_window / old_window) + 1

    def rotary(self, x_BTHD: Tensor) -> Tensor:
        """Rotate each pair (x[2j], x[2j+1]) -> (a·cos + b·sin, b·cos − a·sin); the bf16 tables in x's dtype."""
        T = x_BTHD.size(-3)
        f1 = self.factor1[None, :T, None, :].to(x_BTHD.dtype)
        f2 = self.factor2[None, :T, None, :].to(x_BTHD.dtype)
        flip = x_BTHD.view(*x_BTHD.shape[:-1], x_BTHD.shape[-1] // 2, 2).flip(-1).view(x_BTHD.shape)
        return f1 * x_BTHD + f2 * flip


def doc_ids(cu_seqlens: Tensor, length: int) -> Tensor:
    """Document index of each of `length` positions, from cu_seqlens padded with `length` at the end."""
    pos = torch.arange(length, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens.to(torch.int64).contiguous(), pos, right=True) - 1


# Above this many positions the CPU also takes the banded path (the dense mask is T×T); below it the
# dense path keeps tiny float32 parity runs bit-identical to the reference. CUDA always takes it when
# windowed: the dense mask sends SDPA down the math path with float32 T×T scores, 12 s per record step.
DENSE_MAX_T = 4096
# Query block of the banded path: each block of B queries reads the B + ceil(w/B)·B keys that can fall
# in its windows, so a record step's work is ~T·(w+2B) per head instead of T².
BAND_BLOCK = 128


def varlen_attention(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, window: int | None, scale: float
) -> Tensor:
    """FlashAttention-3 varlen with causal=True, window_size=(window, 0): query i sees keys i-window..i of its document.

    q, k, v: [T, H, K] (batch 1 flattened). `window=None` is full causal attention within documents.
    Windowed attention on CUDA or past DENSE_MAX_T positions runs banded, the rest dense; both give
    the same numbers up to float rounding.
    """
    if window is not None and (q.is_cuda or q.size(0) > DENSE_MAX_T):
        return banded_varlen_attention(q, k, v, cu_seqlens, window, scale)
    return dense_varlen_attention(q, k, v, cu_seqlens, window, scale)


def dense_varlen_attention(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, window: int | None, scale: float
) -> Tensor:
    """The reference: one T×T boolean mask (same document, causal, within the window) and one SDPA call."""
    T = q.size(0)
    docs = doc_ids(cu_seqlens, T)
    i = torch.arange(T, device=q.device)
    diff = i[:, None] - i[None, :]
    mask = (docs[:, None] == docs[None, :]) & (diff >= 0)
    if window is not None:
        mask = mask & (diff <= window)
    y = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
    )
    return y.transpose(0, 1)


def banded_varlen_attention(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, window: int, scale: float, block: int = BAND_BLOCK
) -> Tensor:
    """`dense_varlen_attention` with a window, computed only where the window can reach.

    Queries go in blocks of `block`; block n (positions nB..nB+B-1) sees at most keys nB-P..nB+B-1
    with P = ceil(w/B)·B. Keys are padded with P positions in front (document -1, matching no query)
    and read as overlapping [B+P] views (`unfold`, no copy), so one SDPA call with a per-block
    [B, B+P] mask does all blocks as a batch; on CUDA that mask selects the memory-efficient kernel
    in the activation dtype. Queries are padded up to a whole block; a padded query sees itself
    (its own document id), so no softmax row is empty, and its output is dropped.
    """
    T, H, K = q.shape
    w = min(window, T - 1)  # i - j < T always: a longer window changes nothing
    B = min(block, T)
    n_blocks = -(-T // B)
    P = -(-w // B) * B
    pad = n_blocks * B - T
    docs = doc_ids(cu_seqlens, n_blocks * B)
    docs = torch.cat([docs.new_full((P,), -1), docs])  # [P + nB]: the front padding is no document
    k_NHSK = F.pad(k, (0, 0, 0, 0, P, pad)).unfold(0, B + P, B).transpose(-1, -2)
    v_NHSK = F.pad(v, (0, 0, 0, 0, P, pad)).unfold(0, B + P, B).transpose(-1, -2)
    q_NHBK = F.pad(q, (0, 0, 0, 0, 0, pad)).view(n_blocks, B, H, K).transpose(1, 2)
    # query a of block n is position nB + a, key c is nB - P + c: the offset i - j = P + a - c for every n
    a = torch.arange(B, device=q.device)[:, None]
    c = torch.arange(B + P, device=q.device)[None, :]
    band_BS = (P + a - c >= 0) & (P + a - c <= w)
    docs_q_NB = docs[P:].view(n_blocks, B)
    docs_k_NS = docs.unfold(0, B + P, B)
    mask_NBS = band_BS & (docs_q_NB[:, :, None] == docs_k_NS[:, None, :])
    y_NHBK = F.scaled_dot_product_attention(q_NHBK, k_NHSK, v_NHSK, attn_mask=mask_NBS[:, None], scale=scale)
    return y_NHBK.transpose(1, 2).reshape(n_blocks * B, H, K)[:T]


def fp8_e4m3(x: Tensor, scale: float) -> Tensor:
    """x / scale in x's dtype, then to float8_e4m3fn (round to nearest), as the source quantizes."""
    return x.div(scale).to(torch.float8_e4m3fn)


class FP8UpProjection(torch.autograd.Function):
    """The MLP up-projection of the records after #77, in training: x @ Wᵀ with x and W each as e4m3 at
    448/amax (current scaling: x's amax over the whole tensor, W's over the layer's weight), float32
    sums rescaled by amax_x·amax_W/448², in x's dtype. The backward is the unquantized GEMM's."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(x, w)
        ax, aw = (t.abs().amax().float().clamp_min(1e-12) for t in (x, w))
        x8 = (x.float() * (448 / ax)).to(torch.float8_e4m3fn)
        w8 = (w.float() * (448 / aw)).to(torch.float8_e4m3fn)
        return ((x8.float() @ w8.float().T) * (ax / 448 * (aw / 448))).to(x.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w = ctx.saved_tensors
        return g @ w.to(g.dtype), (g.T @ x).to(w.dtype)


class SoftcappedCE(torch.autograd.Function):
    """The source's training head + FusedSoftcappedCrossEntropy: per-token Σ_k w_k·CE(z_t, target_{t+k}).

    Forward: logits = x @ W (FP8 e4m3 operands with static scales, float32 accumulation, out in bf16
    whatever x's dtype, as the source's `_scaled_mm(out_dtype=torch.bfloat16)`; or a plain matmul in
    x's dtype with `fp8=False`), z = 23σ((logits+5)/7.5) in float32, terms with t+k beyond the sequence
    dropped. Backward as the Triton kernel: the gradient w.r.t. the raw logits in float32, divided by
    grad_s and quantized to e5m2, then grad_x (bf16, then x's dtype) and grad_W (float32) from the
    quantized operands (`fp8=False`: from the unquantized gradient and operands).
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, targets: Tensor, mtp_weights: Tensor, fp8: bool) -> Tensor:
        if fp8:
            x8, w8 = fp8_e4m3(x, HEAD_X_S), fp8_e4m3(w.to(x.dtype), HEAD_W_S)
            logits = ((x8.float() @ w8.float()) * (HEAD_X_S * HEAD_W_S)).to(torch.bfloat16)
            ctx.save_for_backward(logits, targets, mtp_weights, x8, w8)
        else:
            logits = x @ w.to(x.dtype)
            ctx.save_for_backward(logits, targets, mtp_weights, x, w)
        ctx.fp8, ctx.x_dtype = fp8, x.dtype
        z = SOFTCAP_A * torch.sigmoid((logits.float() + SOFTCAP_B) / SOFTCAP_C)
        lse = torch.logsumexp(z, dim=-1)
        T = z.size(0)
        losses = torch.zeros(T, dtype=torch.float32, device=x.device)
        for k in range(mtp_weights.numel()):
            rows = torch.arange(T - k, device=x.device)
            z_target = z[rows, targets[k:]]
            losses[: T - k] += mtp_weights[k] * (lse[: T - k] - z_target)
        return losses

    @staticmethod
    def backward(ctx, grad_losses: Tensor):
        logits, targets, mtp_weights, xs, ws = ctx.saved_tensors
        T = logits.size(0)
        u = torch.sigmoid((logits.float() + SOFTCAP_B) / SOFTCAP_C)
        z = SOFTCAP_A * u
        p = torch.softmax(z, dim=-1)
        s_w = torch.zeros(T, dtype=torch.float32, device=logits.device)
        onehot = torch.zeros_like(p)
        for k in range(mtp_weights.numel()):
            s_w[: T - k] += mtp_weights[k]
            rows = torch.arange(T - k, device=logits.device)
            onehot[rows, targets[k:]] += mtp_weights[k]
        grad_z = s_w[:, None] * p - onehot
        grad_logits = grad_losses.float()[:, None] * (SOFTCAP_A / SOFTCAP_C) * grad_z * u * (1 - u)
        if ctx.fp8:
            g8 = (grad_logits / HEAD_GRAD_S).to(torch.float8_e5m2).float()
            grad_x = ((g8 @ ws.float().T) * (HEAD_GRAD_S * HEAD_W_S)).to(torch.bfloat16).to(ctx.x_dtype)
            grad_w = (xs.float().T @ g8) * (HEAD_X_S * HEAD_GRAD_S)
        else:
            g = grad_logits.to(ctx.x_dtype)
            grad_x = g @ ws.to(ctx.x_dtype).T
            grad_w = (xs.T @ g).float()
        return grad_x, grad_w, None, None, None


def eval_losses(x: Tensor, w: Tensor, targets: Tensor) -> Tensor:
    """The source's eval head: matmul in x's dtype (no FP8), softcap in that dtype, next-token CE in float32."""
    logits = x @ w.to(x.dtype)
    z = SOFTCAP_A * torch.sigmoid((logits + SOFTCAP_B) / SOFTCAP_C)
    return F.cross_entropy(z.float(), targets, reduction="none")
