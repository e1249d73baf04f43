"""The GPT as pure functions over a nested dict of arrays, one module per component.

`init(key, cfg)` builds the params, `apply(params, tokens, cfg)` returns
softcapped logits and `loss(params, batch, cfg)` the mean token loss. The
components (`embeddings`, `attention`, `mlp`, `residual`, `head`) each own
their sub-config, params, forward and optimizer rows (`OPTIM_ROWS`);
`plan.layer_plan` says which layer uses which technique and `kernels` which
implementation runs. Per-layer weights are stacked on a leading axis, so Muon
sees an explicit batch of matrices.

Param paths say which optimizer owns a leaf (see `jaxrun.optim`): matrices
under `blocks/{attn,mlp}/w_*` go to Muon, everything else to Adam.

Shape legend for names such as `x_BTD`:
  B batch, T time (sequence), D model width, H heads, K head dim,
  F MLP width, L layers, V vocab, N tokens (B·T flattened).
"""

from jaxrun.model import attention, embeddings, head, kernels, mlp, residual
from jaxrun.model.attention import Mode, rotary_tables
from jaxrun.model.gpt import (
    apply,
    count_params,
    default_mode,
    flops_per_token,
    hidden_states,
    init,
    loss,
    token_losses,
)
from jaxrun.model.head import IGNORE_INDEX
from jaxrun.model.layers import Params
from jaxrun.model.plan import LayerPlan, layer_plan

COMPONENTS = (embeddings, attention, mlp, residual, head)
OPTIM_ROWS = tuple(row for component in COMPONENTS for row in component.OPTIM_ROWS)

__all__ = [
    "COMPONENTS",
    "IGNORE_INDEX",
    "OPTIM_ROWS",
    "LayerPlan",
    "Mode",
    "Params",
    "apply",
    "count_params",
    "default_mode",
    "flops_per_token",
    "hidden_states",
    "init",
    "kernels",
    "layer_plan",
    "loss",
    "rotary_tables",
    "token_losses",
]
