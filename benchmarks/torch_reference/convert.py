"""Weights both ways between jaxrun params and the PyTorch twin's state, in numpy.

jaxrun stores a linear layer as `[..., fan_in, fan_out]` (used as `x @ W`) and
stacks per-layer leaves on a leading `L` axis; torch's `nn.Linear` holds
`[out, in]` and the twin keeps one module per layer. The map between names is
fixed by the param paths of `jaxrun.model`:

  jaxrun path                        | torch name                          | layout
  embed/tokens                       | embed.weight                        | same
  embed/positions                    | pos_embed.weight                    | same
  {embed,final}_norm/{gain,bias}     | {embed,final}_norm.{weight,bias}    | same
  blocks/{attn,mlp}_norm/{gain,bias} | blocks.{i}.{attn,mlp}_norm.{...}    | slice i of L
  blocks/{attn,mlp}/w_{x}            | blocks.{i}.{attn,mlp}.{x}.weight    | slice i, transposed
  blocks/{attn,mlp}/b_{x}            | blocks.{i}.{attn,mlp}.{x}.bias      | slice i of L
  lm_head/w, lm_head/b               | lm_head.weight, lm_head.bias        | transposed, same

Nothing here imports torch or JAX, so both sides (and a torch interpreter
without JAX) share it. Param trees are handled flat, as `{"a/b/c": array}`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

_NORMS = ("embed_norm", "final_norm", "attn_norm", "mlp_norm")
_LEAF_ATTR = {"gain": "weight", "bias": "bias"}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """A nested dict of arrays as `{"a/b/c": array}`."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, path + "/")
        else:
            flat[path] = np.asarray(value)
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `flatten`."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def torch_name(path: str) -> tuple[str, bool]:
    """The torch name (with `{i}` for the layer) of a jaxrun path, and whether to transpose."""
    parts = path.split("/")
    if path == "embed/tokens":
        return "embed.weight", False
    if path == "embed/positions":
        return "pos_embed.weight", False
    if path == "lm_head/w":
        return "lm_head.weight", True
    if path == "lm_head/b":
        return "lm_head.bias", False
    if len(parts) == 2 and parts[0] in _NORMS and parts[1] in _LEAF_ATTR:
        return f"{parts[0]}.{_LEAF_ATTR[parts[1]]}", False
    if len(parts) == 3 and parts[0] == "blocks":
        _, module, leaf = parts
        if module in _NORMS and leaf in _LEAF_ATTR:
            return f"blocks.{{i}}.{module}.{_LEAF_ATTR[leaf]}", False
        match = re.fullmatch(r"([wb])_(\w+)", leaf)
        if module in ("attn", "mlp") and match:
            kind, sub = match.groups()
            return f"blocks.{{i}}.{module}.{sub}.{'weight' if kind == 'w' else 'bias'}", kind == "w"
    raise KeyError(f"no torch name for jaxrun param {path!r}")


def jax_path(name: str) -> tuple[str, int | None, bool]:
    """The jaxrun path of a torch name, its layer index (None outside blocks), and whether to transpose."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    layer, rest = (int(match.group(1)), match.group(2)) if match else (None, name)
    parts = rest.split(".")
    fixed = {
        "embed.weight": "embed/tokens",
        "pos_embed.weight": "embed/positions",
        "lm_head.weight": "lm_head/w",
        "lm_head.bias": "lm_head/b",
    }
    if layer is None and rest in fixed:
        return fixed[rest], None, rest == "lm_head.weight"
    attr_leaf = {"weight": "gain", "bias": "bias"}
    if len(parts) == 2 and parts[0] in _NORMS and parts[1] in attr_leaf:
        path = f"{parts[0]}/{attr_leaf[parts[1]]}"
        return (path if layer is None else f"blocks/{path}"), layer, False
    if layer is not None and len(parts) == 3 and parts[0] in ("attn", "mlp"):
        module, sub, attr = parts
        return f"blocks/{module}/{'w' if attr == 'weight' else 'b'}_{sub}", layer, attr == "weight"
    raise KeyError(f"no jaxrun path for torch param {name!r}")


def _t(x: np.ndarray) -> np.ndarray:
    return np.swapaxes(x, -1, -2)


def jax_to_torch(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """jaxrun params (flat paths) -> the twin's state dict, as numpy arrays in torch layout."""
    state = {}
    for path, value in flat.items():
        name, transpose = torch_name(path)
        value = np.asarray(value)
        if "{i}" in name:
            for i in range(value.shape[0]):
                state[name.format(i=i)] = np.ascontiguousarray(_t(value[i]) if transpose else value[i])
        else:
            state[name] = np.ascontiguousarray(_t(value) if transpose else value)
    return state


def torch_to_jax(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The twin's state dict (numpy, torch layout) -> jaxrun params (flat paths), layers re-stacked."""
    flat: dict[str, np.ndarray] = {}
    stacks: dict[str, dict[int, np.ndarray]] = {}
    for name, value in state.items():
        path, layer, transpose = jax_path(name)
        value = _t(np.asarray(value)) if transpose else np.asarray(value)
        if layer is None:
            flat[path] = value
        else:
            stacks.setdefault(path, {})[layer] = value
    for path, layers in stacks.items():
        if sorted(layers) != list(range(len(layers))):
            raise KeyError(f"{path}: layers {sorted(layers)} are not 0..{len(layers) - 1}")
        flat[path] = np.stack([layers[i] for i in range(len(layers))])
    return flat


def param_group(name: str, ndim: int) -> str:
    """The optimizer group of a twin param, by train_gpt_simple.py's rule.

    The token (and position) embedding is "embed", the head's matrix "head",
    the blocks' matrices "hidden" (Muon in the speedrun), everything of rank
    < 2 "scalar". tests/test_parity.py checks it against `jaxrun.optim.PARAM_TABLE`.
    """
    if name in ("embed.weight", "pos_embed.weight"):
        return "embed"
    if name == "lm_head.weight":
        return "head"
    if ndim < 2:
        return "scalar"
    if name.startswith("blocks."):
        return "hidden"
    raise KeyError(f"no optimizer group for torch param {name!r} of rank {ndim}")
