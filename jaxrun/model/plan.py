"""The layer plan: which techniques each layer uses, derived once from the config.

Every per-layer difference (attention or not, paired heads, which window, key
offset, which value-embedding table, where the attention input comes from,
which bank slot holds the weights) is read from this table, never decided by
conditions spread through the forward.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

from jaxrun.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    index: int
    attn_slot: int | None  # row of the stacked attention weights; None: no attention (MLP only)
    paired: bool  # head pairs attend over the doubled sequence
    window: Literal["short", "long"] | None  # None: full causal
    key_offset: bool
    value_table: int | None  # value-embedding table added to v
    reads_saved: bool  # attention input is the saved activation, not the current residual
    skip_in: bool  # adds the gated skip connection in place of attention


@functools.cache
def layer_plan(cfg: ModelConfig) -> tuple[LayerPlan, ...]:
    a, r = cfg.attn, cfg.residual
    value_layers = cfg.embed.value.layers if cfg.embed.value is not None else ()
    long_layers = a.windows.long_layers if a.windows is not None else ()
    plan, slot = [], 0
    for i in range(cfg.num_layers):
        has_attn = i not in a.skip_layers
        window = None if a.windows is None or not has_attn else ("long" if i in long_layers else "short")
        plan.append(
            LayerPlan(
                index=i,
                attn_slot=slot if has_attn else None,
                paired=i in a.paired_layers,
                window=window,
                key_offset=a.key_offset and window == "long",
                value_table=value_layers.index(i) if i in value_layers else None,
                reads_saved=has_attn and r.saved_layer is not None and i > r.saved_layer,
                skip_in=r.skip is not None and i == r.skip.target,
            )
        )
        slot += has_attn
    return tuple(plan)
