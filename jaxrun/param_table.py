"""Rows that say which optimizer owns a param, declared by the component that owns the param.

Each module of `jaxrun.model` exports `OPTIM_ROWS`; `jaxrun.optim` joins them into
one table and labels every leaf by the single row its path matches.
"""

from __future__ import annotations

import dataclasses
import re

from jaxrun.config import ConfigError


@dataclasses.dataclass(frozen=True)
class OptimRow:
    """A path pattern (regex, full match on "/"-joined keys) and how its params are optimized.

    `group` picks the optimizer and, for the group optimizers of `simple` and `gpt2_llmc`, the
    base learning rate in `OptimConfig`: "hidden" leaves go to Muon, the rest to Adam. The
    multipliers, betas and `shape_mult` are record #77's per-param settings, read by the
    per-param optimizer (`jaxrun.record_optim`): lr = base·s(step)·lr_mul (× shape_mult for
    NorMuon, the √(max(1, rows/cols)) of the source's stored matrix), and the cautious decay
    scales with wd_mul. The group optimizers compute Muon's shape factor from the shape instead.
    """

    pattern: str
    group: str
    lr_mul: float = 1.0
    wd_mul: float = 1.0
    betas: tuple[float, float] | None = None  # Adam only
    shape_mult: float = 1.0  # NorMuon only

    def __post_init__(self):
        re.compile(self.pattern)
        where = f"OptimRow({self.pattern!r})"
        if self.betas is not None and (self.kind != "adam" or not all(0 <= b < 1 for b in self.betas)):
            raise ConfigError(f"{where}.betas={self.betas} must be Adam betas in [0, 1), on an Adam row")
        if self.kind == "adam" and self.shape_mult != 1.0:
            raise ConfigError(f"{where}.shape_mult={self.shape_mult} is for NorMuon rows only")
        if min(self.lr_mul, self.wd_mul) < 0 or self.shape_mult <= 0:
            raise ConfigError(f"{where}: lr_mul, wd_mul must be >= 0 and shape_mult > 0")

    @property
    def kind(self) -> str:
        """ "normuon" for the hidden matrices, "adam" for everything else."""
        return "normuon" if self.group == "hidden" else "adam"
