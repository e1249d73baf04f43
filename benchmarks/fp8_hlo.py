"""Does record77's FP8 head run as FP8 GEMMs? Compiles the head's loss, forward and backward, and lists its dots.

  python benchmarks/fp8_hlo.py [--tokens 49152] [--loss xla_fused|xla]
  python benchmarks/fp8_hlo.py --accumulation [--k 4096,16384,65536]
  python benchmarks/fp8_hlo.py --forms [--tokens 49152] [--mosaic-tiles 128x128x128x3,...]

The record runs its lm_head as three FP8 GEMMs (torch._scaled_mm): e4m3 × e4m3 forward, and e5m2 × e4m3
for the input's and the weight's gradients. jaxrun writes each as a `dot_general` of float8 operands with
float32 accumulation and the static scales applied after; XLA's GPU compiler turns such a dot into a
cuBLASLt FP8 GEMM (a custom call `__cublas$lt$matmul$f8`) when it can, and otherwise upcasts the operands
and runs a bf16/f32 GEMM. This compiles the training head's value-and-grad at record77's shapes (one
micro-batch of `--tokens`, D = 768, V = 50304) and prints, for the program XLA receives, every dot and its
operand types, and for the compiled program the FP8 GEMM custom calls and the other GEMMs. On a GPU it
exits 1 unless all three products are FP8 GEMMs.

`--accumulation` measures how the weight-gradient GEMM (e4m3ᵀ × e5m2 → f32, summing over K tokens)
accumulates at each precision: its error against the float32 sum of the same products (each exact in
float32), relative to the largest entry. Fast accumulation (DEFAULT on a GPU) grows with K; HIGHEST
should stay flat. On a CPU both are exact.

`--forms` times the forward GEMM written five ways (FORWARD_FORMS; the Mosaic kernel at each of
`--mosaic-tiles`) at `--tokens` × 768 × 50304 and prints, for each, the result type of its FP8 GEMMs (none: XLA did not make one) and its logits' error
against the exact float32 product (the largest and the mean, each relative to the logits' largest and
mean size): a bf16 result lets the GEMM write the logits itself, instead of a float32 [N, V] that a
second pass converts.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FP8_GEMM = "__cublas$lt$matmul$f8"
_DEF = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ", re.MULTILINE)
_DOT = re.compile(r"= (\S+) dot\(%?([\w.\-]+), %?([\w.\-]+)\)")


def head_program(tokens: int, loss: str, row_len: int = 2048):
    """The jitted value-and-grad of record77's training head at `tokens` tokens, and example inputs."""
    import jax
    import jax.numpy as jnp

    import launch
    from jaxrun import model, schedule

    cfg = launch.load_config("record77")
    m = dataclasses.replace(cfg.model, kernels=dataclasses.replace(cfg.model.kernels, loss=loss))
    mode, weights = schedule.train_mode(cfg, 0), schedule.multi_token_weights(cfg, 0)
    params = {"lm_head": {"w": jax.ShapeDtypeStruct((m.model_dim, m.vocab_size), jnp.float32)}}
    h = jax.ShapeDtypeStruct((tokens // row_len, row_len, m.model_dim), jnp.bfloat16)
    targets = jax.ShapeDtypeStruct((tokens // row_len, row_len), jnp.int32)

    def summed(params, h, targets):
        return model.head.token_losses(params, h, targets, m, mode, weights).sum()

    return jax.jit(jax.value_and_grad(summed, argnums=(0, 1))), (params, h, targets)


def fp8_gemm_results(compiled_text: str) -> list[str]:
    """The result element type of each FP8 cuBLASLt GEMM in a compiled HLO module's text (the first
    tuple element: the GEMM's output; the second is its workspace)."""
    return re.findall(r"= \(?(\w+)\[[^\n]*custom_call_target=\"" + re.escape(FP8_GEMM) + '"', compiled_text)


def dots(hlo_text: str) -> list[tuple[str, str, str]]:
    """(result type, lhs type, rhs type) of every `dot` in an HLO module's text."""
    types = dict(_DEF.findall(hlo_text))
    return [(out, types.get(lhs, lhs), types.get(rhs, rhs)) for out, lhs, rhs in _DOT.findall(hlo_text)]


def weight_grad_operands(k_tokens: int, d: int = 768, v: int = 4096):
    """e4m3 inputs [K, d], an e5m2 softmax-like logit gradient [K, v], and the float32 sum of their
    products [d, v] (each product is exact in float32), as the FP8 head's weight gradient sees them."""
    import jax
    import jax.numpy as jnp

    from jaxrun.config import FP8HeadConfig
    from jaxrun.model import head

    scales = FP8HeadConfig()
    k = jax.random.split(jax.random.key(2), 2)
    x8 = head.fp8_input(jax.random.normal(k[0], (k_tokens, d), jnp.bfloat16), scales)
    probs = jax.nn.softmax(4.0 * jax.random.normal(k[1], (k_tokens, v)), axis=-1)
    g8 = head.quantize_grad(probs - jax.nn.one_hot(jnp.arange(k_tokens) % v, v), scales)
    with jax.default_matmul_precision("highest"):
        want = x8.astype(jnp.float32).T @ g8.astype(jnp.float32)
    return x8, g8, want


def relative_error(got, want) -> float:
    import jax.numpy as jnp

    return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


def accumulation_errors(k_tokens: int) -> dict[str, float]:
    """{precision: error of the largest entry} of the weight-gradient GEMM at K = `k_tokens`."""
    import jax
    import jax.numpy as jnp

    x8, g8, want = weight_grad_operands(k_tokens)
    errors = {}
    for precision in (jax.lax.Precision.DEFAULT, jax.lax.Precision.HIGHEST):
        got = jax.jit(
            lambda a, b, p=precision: jax.lax.dot_general(
                a, b, (((0,), (0,)), ((), ())), precision=p, preferred_element_type=jnp.float32
            )
        )(x8, g8)
        errors[precision.name] = relative_error(got, want)
    return errors


FORWARD_FORMS = {
    "f32_result": "float32 sums, scaled, then rounded to bf16 (record77's forward)",
    "bf16_result": "the sums rounded to bf16 by the GEMM; the reader scales them in float32",
    "bf16_dequantized": "operands dequantized in bf16 (scales rounded to bf16), bf16 result",
    "f32_dequantized": "operands dequantized in float32, bf16 result",
    "mosaic": "Mosaic GPU kernel: float32 sums scaled in its epilogue, bf16 stored (fp8_logits_mgpu.py)",
}


def forward_form(name: str, x_scale: float, w_scale: float, tiles=None):
    """`fn(x8 [N, D], w8 [D, V]) -> bf16 [N, V]`, what the GEMM returns, for a FORWARD_FORMS entry
    (`tiles`: the Mosaic kernel's, default its own)."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import fp8_logits_mgpu

    bf16, f32 = jnp.bfloat16, jnp.float32

    def dot(a, b, out):
        return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=out)

    def fn(x8, w8):
        if name == "f32_result":
            return (dot(x8, w8, f32) * (x_scale * w_scale)).astype(bf16)
        if name == "bf16_result":
            return dot(x8, w8, bf16)
        if name == "bf16_dequantized":
            return dot(x8.astype(bf16) * bf16(x_scale), w8.astype(bf16) * bf16(w_scale), bf16)
        if name == "mosaic":  # the weight K-major, as the model passes it
            return fp8_logits_mgpu.fp8_logits(
                x8, w8.T, scale=x_scale * w_scale, tiles=tiles or fp8_logits_mgpu.TILES
            )
        return dot(x8.astype(f32) * x_scale, w8.astype(f32) * w_scale, bf16)

    return fn


def _tiles(spec: str):
    """'128x128x128x4' -> Tiles(tile_m, tile_n, tile_k, stages)."""
    from pallas_kernels.gemm_mgpu import Tiles

    tm, tn, tk, st = (int(x) for x in spec.split("x"))
    return Tiles(tile_m=tm, tile_n=tn, tile_k=tk, stages=st)


def forms(tokens: int, mosaic_tiles: list[str]) -> None:
    import jax
    import jax.numpy as jnp

    from benchmarks.mlp_ce_bench import time_it
    from jaxrun.config import FP8HeadConfig
    from jaxrun.model import head

    s = FP8HeadConfig()
    k = jax.random.split(jax.random.key(0), 2)
    x8, w8 = head.fp8_operands(
        jax.random.normal(k[0], (tokens, 768)) * 2.0, jax.random.normal(k[1], (768, 50_304)) * 0.02, s
    )
    exact_dot = jax.jit(
        lambda a, b: jax.lax.dot_general(
            a,
            b,
            (((1,), (0,)), ((), ())),
            precision=jax.lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32,
        )
    )
    exact = exact_dot(x8, w8) * (s.x_scale * s.w_scale)
    print(f"the forward FP8 GEMM, {tokens} × 768 × 50304, on {jax.devices()[0].device_kind}")
    print("  error: max |logit - exact| / max |exact|, and mean |logit - exact| / mean |exact|")
    print("  same: the share of logits equal to f32_result's (record77's XLA forward)")
    runs = [(name, what, None) for name, what in FORWARD_FORMS.items() if name != "mosaic"]
    runs += [(f"mosaic {t}", FORWARD_FORMS["mosaic"], _tiles(t)) for t in mosaic_tiles]

    @functools.partial(jax.jit, static_argnames="rescale")
    def stats(out, today, rescale):
        """(max and mean error, relative; the share equal to `today`) in fused reductions: at
        record #77's shape each [N, V] temporary would be 10 GB."""
        logits = out.astype(jnp.float32) * (s.x_scale * s.w_scale if rescale else 1.0)
        err = jnp.abs(logits - exact)
        same = jnp.mean(logits.astype(jnp.bfloat16) == today)
        return err.max() / jnp.abs(exact).max(), err.mean() / jnp.abs(exact).mean(), same

    today = None
    for name, what, tiles in runs:
        form = forward_form(name.split()[0], s.x_scale, s.w_scale, tiles)
        compiled = jax.jit(form).lower(x8, w8).compile()
        out = compiled(x8, w8)
        today = out if today is None else today  # f32_result runs first
        err_max, err_mean, same = (float(v) for v in stats(out, today, name == "bf16_result"))
        del out
        ms = time_it(compiled, (x8, w8))[0]
        gemms = ", ".join(fp8_gemm_results(compiled.as_text())) or "none"
        print(
            f"  {name:17s} {ms:7.3f} ms  FP8 GEMM result: {gemms:5s}  error max {err_max:.1e}"
            f" mean {err_mean:.1e}  same {same:.4f}  ({what})"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=49_152)
    p.add_argument("--loss", default="xla_fused", choices=("xla", "xla_fused"))
    p.add_argument(
        "--accumulation", action="store_true", help="measure the FP8 GEMM's accumulation error instead"
    )
    p.add_argument("--k", default="4096,16384,65536", help="--accumulation: token counts K")
    p.add_argument("--forms", action="store_true", help="time the forward GEMM written five ways instead")
    p.add_argument(
        "--mosaic-tiles",
        default="128x128x128x3",
        help="--forms: the Mosaic kernel's tilings, tile_m x tile_n x tile_k x stages, comma-separated (a GPU; \"\" for none)",
    )
    a = p.parse_args(argv)
    import jax

    if a.forms:
        forms(a.tokens, [t for t in a.mosaic_tiles.split(",") if t])
        return 0

    if a.accumulation:
        print(f"FP8 weight-gradient GEMM on {jax.devices()[0].device_kind}: error / largest entry")
        for k in map(int, a.k.split(",")):
            print(f"  K={k:>6}", "  ".join(f"{p}: {e:.2e}" for p, e in accumulation_errors(k).items()))
        return 0

    fn, args = head_program(a.tokens, a.loss)
    lowered = fn.lower(*args)
    print(f"record77 head, {a.tokens} tokens, model.kernels.loss={a.loss}, on {jax.devices()[0].device_kind}")
    print("dots XLA receives (result, lhs, rhs):")
    for d in dots(lowered.as_text(dialect="hlo")):
        print("  ", *d)
    compiled = lowered.compile().as_text()
    fp8 = compiled.count(f'custom_call_target="{FP8_GEMM}"')
    others = re.findall(r'custom_call_target="(__cublas\$[^"]*)"', compiled)
    print(f"compiled: {fp8} FP8 GEMM(s) ({FP8_GEMM}); all cuBLAS calls: {sorted(set(others)) or 'none'}")
    if fp8:  # the forward's bf16 logits: written by the GEMM itself, or as f32 and then converted
        print(f"FP8 GEMM results: {', '.join(fp8_gemm_results(compiled))}")
    if jax.default_backend() == "gpu" and fp8 < 3:
        print("FAIL: the forward and both gradient products should each be an FP8 GEMM")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
