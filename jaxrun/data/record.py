"""Record #77's train batches, planned rank by rank as its PyTorch script plans them.

The record runs 8 ranks (GPUs, or micro-batches of one GPU), each consuming one
flat sequence of T tokens per step. Its loader plans `world_size` rank buffers
at a time from a shared cursor over the shard's BOS positions: rank by rank,
each buffer takes whole documents from a BOS, cuts each to max_doc_len and the
last so the buffer holds exactly T + 1 tokens. If the shard runs out while
planning, the whole plan is rebuilt from the start of the next shard and the
old tail is dropped. On 8 GPUs one plan covers a step; on one GPU (world size
1, 8 micro-batches) each micro-batch is its own plan, so a shard's tail is
dropped per micro-batch. `ranks` picks which of these streams to reproduce.

`DocumentStream` already implements one plan (its rows are the rank buffers);
`RecordStream` strings `batch_seqs // ranks` plans into a step and keeps the
step schedule in the source's terms. When the shards run out, it wraps to the
first one with a warning, where the source would stop.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxrun.data.streams import Batch, Stage, _check_stages, _Documents, _stages, _Stream, stage_at


class RecordStream(_Stream):
    """Record #77's BOS-aligned train stream: `batch_seqs` rank buffers of `seq_len` per step.

    Args:
      files: shard paths, walked in sorted order (no shuffling), wrapping at the end.
      batch_seqs: rank buffers per step over all processes (the record: 8).
      seq_len: tokens per rank buffer, T (the record: 16384, then 32768, 49152).
      max_doc_len: documents are cut to this many tokens (the record: 896, then 2048).
      ranks: rank buffers planned together: the source's world size (8 on 8 GPUs,
        1 on one GPU with 8 micro-batches). Divides every stage's batch_seqs.
      stages: later `Stage`s, switching T and max_doc_len at their steps.
      process_index, process_count, prefetch, vocab_size: as for `DocumentStream`;
        each process gets its `ranks // process_count` buffers of every plan.

    Yields:
      `{"inputs", "targets", "segment_ids"}`, int32 `[b, T]`, plans in order and
      ranks in order within a plan. `inputs` is a buffer's first T tokens and
      `targets` its last T; `segment_ids` number its documents 1, 2, ... (the
      last one shortened by one, as the source's cu_seqlens are).
    """

    def __init__(
        self,
        files: Sequence[str | os.PathLike],
        *,
        batch_seqs: int,
        seq_len: int,
        max_doc_len: int | None,
        ranks: int = 8,
        process_index: int = 0,
        process_count: int = 1,
        stages: Sequence[Stage] = (),
        prefetch: int = 2,
        vocab_size: int | None = None,
    ):
        self._steps = _check_stages(_stages(batch_seqs, seq_len, max_doc_len, stages), process_count)
        if ranks <= 0 or ranks % process_count:
            raise ValueError(f"ranks={ranks} must be a positive multiple of {process_count} processes")
        for s in self._steps:
            if s.batch_seqs % ranks:
                raise ValueError(f"{s}: batch_seqs={s.batch_seqs} is not a multiple of ranks={ranks}")
        self.ranks = ranks
        plans = [
            dataclasses.replace(s, step=self._plans_before(s.step), batch_seqs=ranks) for s in self._steps
        ]
        super().__init__(_Documents(files, plans, process_index, process_count, None, vocab_size), prefetch)
        self._step = 0

    @property
    def stages(self) -> tuple[Stage, ...]:
        return self._steps

    def _plans_per_step(self, step: int) -> int:
        return stage_at(step, self._steps).batch_seqs // self.ranks

    def _plans_before(self, step: int) -> int:
        """Plans consumed by steps [0, step)."""
        ends = [s.step for s in self._steps[1:]] + [step]
        return sum(
            max(0, min(end, step) - s.step) * (s.batch_seqs // self.ranks)
            for s, end in zip(self._steps, ends)
        )

    def __next__(self) -> Batch:
        self._assert_not_closed()
        plans = [next(self._parent) for _ in range(self._plans_per_step(self._step))]
        self._step += 1
        return {key: np.concatenate([p[key] for p in plans]) for key in plans[0]}

    def get_state(self) -> dict[str, int]:
        """The position after the last step returned: epoch, shard, offset (a document), step."""
        return {**self._parent.get_state(), "step": self._step}

    def set_state(self, state: dict[str, Any]) -> None:
        """Resume so that the next batch is the one that followed `state`."""
        self._assert_not_closed()
        step = int(state["step"])
        self._parent.set_state({**state, "step": self._plans_before(step)})
        self._step = step
