"""Record 77's params both ways between jaxrun's flat dict and the twin's source-named state, in numpy.

jaxrun path                  | twin (source) name      | how
embed/tokens                 | embed.weight            | same
lm_head/w                    | lm_head.weight          | same ([D, V], the source's CastedLinearT layout)
value_embed/tables [5,V,D]   | value_embeds [5V, D]    | reshape
bigram/table                 | bigram_embed.weight     | same
smear/gate [12, 1]           | smear_gate.weight [1,12]| transpose
residual/skip_gate [12, 1]   | skip_gate.weight [1,12] | transpose
blocks/attn/w_{q,k,v,o}      | attn_bank [La, 4D, D]   | rows jD:(j+1)D of slot a, transposed
blocks/attn/gate [La,12,H]   | attn_gate_bank [La,H,12]| transpose
blocks/attn/ve_gate [5,12,H] | ve_gate_bank [5,H,12]   | transpose
blocks/mlp/w_up [L, D, F]    | mlp_bank[i, 0] [F, D]   | transpose (slot 11 is padding)
blocks/mlp/w_down [L, F, D]  | mlp_bank[i, 1] [F, D]   | same
blocks/attn/sa_lambdas [L,2] | scalars[0:2L]           | reshape
smear/lambda, residual/backout_lambda, residual/skip_lambda | scalars[2L], [2L+1], [2L+2]
residual/{post,resid,x0,bigram}_lambdas | {post,resid,x0,bigram}_lambdas | same

Padding that jaxrun does not hold comes back as the source initialises it where it matters for
nothing (mlp_bank slot 11: zeros) or as the source's value (scalars padding: ones). Gradients map
the same way. Nothing here imports torch or JAX.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

NUM_LAYERS = 11
MLP_SLOTS = 12
_QKVO = ("w_q", "w_k", "w_v", "w_o")
_SAME = {
    "embed/tokens": "embed.weight",
    "lm_head/w": "lm_head.weight",
    "bigram/table": "bigram_embed.weight",
    "residual/post_lambdas": "post_lambdas",
    "residual/resid_lambdas": "resid_lambdas",
    "residual/x0_lambdas": "x0_lambdas",
    "residual/bigram_lambdas": "bigram_lambdas",
}
_TRANSPOSED = {
    "smear/gate": "smear_gate.weight",
    "residual/skip_gate": "skip_gate.weight",
    "blocks/attn/gate": "attn_gate_bank",
    "blocks/attn/ve_gate": "ve_gate_bank",
}
_SCALARS = {
    "smear/lambda": 0,
    "residual/backout_lambda": 1,
    "residual/skip_lambda": 2,
}  # after the 2L sa-lambdas


def _t(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.swapaxes(x, -1, -2))


def jax_to_torch(flat: Mapping[str, np.ndarray], num_scalars: int = 32) -> dict[str, np.ndarray]:
    """jaxrun's record-77 params (flat paths) -> the twin's state dict (numpy, source layouts)."""
    p = {k: np.asarray(v) for k, v in flat.items()}
    L = NUM_LAYERS
    state = {name: p[path].copy() for path, name in _SAME.items()}
    state |= {name: _t(p[path]) for path, name in _TRANSPOSED.items()}
    tables = p["value_embed/tables"]
    state["value_embeds"] = tables.reshape(-1, tables.shape[-1]).copy()
    state["attn_bank"] = np.concatenate([_t(p[f"blocks/attn/{w}"]) for w in _QKVO], axis=1)
    w_up, w_down = p["blocks/mlp/w_up"], p["blocks/mlp/w_down"]
    mlp = np.zeros((MLP_SLOTS, 2, *w_down.shape[1:]), dtype=w_down.dtype)
    mlp[:L, 0], mlp[:L, 1] = _t(w_up), w_down
    state["mlp_bank"] = mlp
    scalars = np.ones(num_scalars, dtype=p["blocks/attn/sa_lambdas"].dtype)
    scalars[: 2 * L] = p["blocks/attn/sa_lambdas"].reshape(-1)
    for path, offset in _SCALARS.items():
        scalars[2 * L + offset] = p[path]
    state["scalars"] = scalars
    return state


def torch_to_jax(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The twin's state dict (numpy) -> jaxrun's record-77 params, padding dropped."""
    s = {k: np.asarray(v) for k, v in state.items()}
    L = NUM_LAYERS
    flat = {path: s[name].copy() for path, name in _SAME.items()}
    flat |= {path: _t(s[name]) for path, name in _TRANSPOSED.items()}
    D = s["embed.weight"].shape[1]
    flat["value_embed/tables"] = s["value_embeds"].reshape(5, -1, D).copy()
    bank = s["attn_bank"]
    for j, w in enumerate(_QKVO):
        flat[f"blocks/attn/{w}"] = _t(bank[:, j * D : (j + 1) * D])
    flat["blocks/mlp/w_up"] = _t(s["mlp_bank"][:L, 0])
    flat["blocks/mlp/w_down"] = s["mlp_bank"][:L, 1].copy()
    scalars = s["scalars"]
    flat["blocks/attn/sa_lambdas"] = scalars[: 2 * L].reshape(L, 2).copy()
    for path, offset in _SCALARS.items():
        flat[path] = np.asarray(scalars[2 * L + offset]).copy()
    return flat
