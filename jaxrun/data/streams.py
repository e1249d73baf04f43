"""Train batches from token shards, through a grain pipeline.

Two batchers walk the shards in order and wrap to a new epoch at the end,
logging a warning each time (the reference scripts stop instead):

- `TokenStream` cuts the stream into contiguous `[B, T]` windows, exactly as
  `train_gpt_simple.py` and llm.c read it.
- `DocumentStream` builds BOS-aligned rows, as records #26-#77 do: every row
  starts at a BOS, documents are cut to `max_doc_len`, and `segment_ids` mark
  the documents so attention can mask across them.

Both follow a schedule of `Stage`s (batch size, row length, max document
length) that switch at given steps, give each process only its own rows, and
checkpoint as a small dict (`get_state`/`set_state`). A grain thread prefetches
batches in the background.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import logging
import os
import weakref
from collections.abc import Sequence
from typing import Any, Self

import grain
import numpy as np

from jaxrun.data.shards import BOS, ShardSource, cached

Batch = dict[str, np.ndarray]
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stage:
    """Batch shape from `step` on: `batch_seqs` rows of `seq_len` over all processes."""

    step: int = 0
    batch_seqs: int
    seq_len: int
    max_doc_len: int | None = None  # documents longer than this are cut (DocumentStream only)

    @property
    def tokens(self) -> int:
        return self.batch_seqs * self.seq_len


def stage_at(step: int, stages: Sequence[Stage]) -> Stage:
    """The stage in force at `step`: the last one whose `step` is <= it."""
    current = stages[0]
    for stage in stages[1:]:
        if stage.step > step:
            break
        current = stage
    return current


def _check_stages(stages: Sequence[Stage], process_count: int) -> tuple[Stage, ...]:
    stages = tuple(stages)
    if not stages or stages[0].step != 0:
        raise ValueError("the first stage must start at step 0")
    for a, b in itertools.pairwise(stages):
        if b.step <= a.step:
            raise ValueError(f"stage steps must increase, got {a.step} then {b.step}")
    for s in stages:
        if s.seq_len <= 0 or s.batch_seqs <= 0:
            raise ValueError(f"{s}: batch_seqs and seq_len must be positive")
        if s.batch_seqs % process_count:
            raise ValueError(f"{s}: batch_seqs={s.batch_seqs} is not a multiple of {process_count} processes")
        if s.max_doc_len is not None and s.max_doc_len <= 0:
            raise ValueError(f"{s}: max_doc_len must be positive or None")
    return stages


@dataclasses.dataclass
class _Cursor:
    """Where the walk is: epoch, shard position in that epoch's order, offset in the shard, step.

    The offset is a token position (contiguous) or a document index (documents).
    """

    epoch: int = 0
    shard: int = 0
    offset: int = 0
    step: int = 0


class _BatchIterator(grain.DatasetIterator):
    """Walks the shards one batch at a time; the batch rule comes from the owning dataset."""

    def __init__(self, dataset: _BatchDataset):
        super().__init__()
        self._ds = dataset
        self._cur = _Cursor()

    def _shard_id(self) -> int:
        n = len(self._ds.source)
        if self._ds.seed is None:
            return self._cur.shard
        return int(np.random.default_rng([self._ds.seed, self._cur.epoch]).permutation(n)[self._cur.shard])

    def __next__(self) -> Batch:
        stage = stage_at(self._cur.step, self._ds.stages)
        for _ in range(len(self._ds.source) + 1):
            shard = self._shard_id()
            out = self._ds.make_batch(shard, self._cur.offset, stage)
            if out is not None:
                batch, self._cur.offset = out
                self._cur.step += 1
                return batch
            self._cur.offset = 0
            self._cur.shard += 1
            if self._cur.shard == len(self._ds.source):
                self._cur.shard, self._cur.epoch = 0, self._cur.epoch + 1
                log.warning(
                    "train data: all %d shards used after %d batches; starting over from the first "
                    "shard (epoch %d). The reference script would stop here.",
                    len(self._ds.source),
                    self._cur.step,
                    self._cur.epoch + 1,
                )
        raise ValueError(
            f"no shard of {self._ds.source} holds one batch of {stage}; use smaller batches or more data"
        )

    def get_state(self) -> dict[str, Any]:
        return dataclasses.asdict(self._cur)

    def set_state(self, state: dict[str, Any]) -> None:
        self._cur = _Cursor(**{f.name: int(state[f.name]) for f in dataclasses.fields(_Cursor)})


class _BatchDataset(grain.IterDataset):
    """A grain IterDataset of batches; subclasses define `make_batch`."""

    def __init__(
        self,
        files: Sequence[str | os.PathLike],
        stages: Sequence[Stage],
        process_index: int,
        process_count: int,
        seed: int | None,
        vocab_size: int | None = None,
    ):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        self.stages = _check_stages(stages, process_count)
        self.source = ShardSource(files, vocab_size)
        super().__init__(grain.MapDataset.source(self.source))
        self.process_index, self.process_count, self.seed = process_index, process_count, seed

    def __iter__(self) -> _BatchIterator:
        return _BatchIterator(self)

    def make_batch(self, shard: int, offset: int, stage: Stage) -> tuple[Batch, int] | None:
        """This process's batch at `offset` of `shard` and the next offset, or None if it doesn't fit."""
        raise NotImplementedError


class _Contiguous(_BatchDataset):
    def make_batch(self, shard: int, offset: int, stage: Stage) -> tuple[Batch, int] | None:
        # train_gpt_simple.py's rule: move on once pos + B + 1 >= len(shard), dropping the tail.
        if offset + stage.tokens + 1 >= self.source.num_tokens[shard]:
            return None
        b = stage.batch_seqs // self.process_count
        local = b * stage.seq_len
        start = offset + self.process_index * local
        buf = np.asarray(self.source[shard][start : start + local + 1], dtype=np.int32)
        batch = {"inputs": buf[:-1].reshape(b, stage.seq_len), "targets": buf[1:].reshape(b, stage.seq_len)}
        return batch, offset + stage.tokens


class _Documents(_BatchDataset):
    def __init__(self, *args):
        super().__init__(*args)
        self._ends: dict[tuple[int, int | None], tuple[np.ndarray, np.ndarray]] = {}

    def _piece_ends(self, shard: int, max_doc_len: int | None) -> tuple[np.ndarray, np.ndarray]:
        """BOS offsets and the running total of document lengths after the max_doc_len cut."""

        def compute():
            starts = self.source.bos_positions(shard)
            lengths = np.diff(starts, append=self.source.num_tokens[shard])
            if max_doc_len is not None:
                lengths = np.minimum(lengths, max_doc_len)
            return starts, np.concatenate([[0], np.cumsum(lengths)])

        return cached(self._ends, (shard, max_doc_len), compute)

    def make_batch(self, shard: int, offset: int, stage: Stage) -> tuple[Batch, int] | None:
        # Each row is the records' per-rank buffer: whole documents from BOS, each cut to
        # max_doc_len, the last one cut so the row holds exactly seq_len + 1 tokens.
        starts, total = self._piece_ends(shard, stage.max_doc_len)
        need = stage.seq_len + 1
        b = stage.batch_seqs // self.process_count
        first_row = self.process_index * b
        doc, rows = offset, []
        for row in range(stage.batch_seqs):
            end = int(np.searchsorted(total, total[doc] + need, side="left"))
            if end >= len(total):
                return None  # the shard is exhausted: drop its tail, as the records do
            if first_row <= row < first_row + b:
                rows.append((doc, end))
            doc = end
        tokens = self.source[shard]
        gather = np.concatenate([self._row_index(starts, total, d, e, need) for d, e in rows])
        buf = np.asarray(tokens[gather], dtype=np.int32).reshape(b, need)
        seg = np.cumsum(buf == BOS, axis=1, dtype=np.int32)
        batch = {"inputs": buf[:, :-1], "targets": buf[:, 1:], "segment_ids": seg[:, :-1]}
        return batch, doc

    @staticmethod
    def _row_index(starts: np.ndarray, total: np.ndarray, doc: int, end: int, need: int) -> np.ndarray:
        """Token offsets of one row: documents doc..end-1 laid end to end, `need` in all."""
        before = total[doc:end] - total[doc]  # where each document begins in the row
        lengths = np.diff(total[doc : end + 1])
        shift = np.repeat(starts[doc:end] - before, lengths)[:need]
        return shift + np.arange(need)


_OPEN_STREAMS: weakref.WeakSet[_Stream] = weakref.WeakSet()


@atexit.register
def _close_open_streams() -> None:
    """Stop prefetch threads before interpreter teardown, which grain's own cleanup trips over."""
    for stream in list(_OPEN_STREAMS):
        stream.close()


class _Stream(grain.DatasetIterator):
    """A grain iterator of batches, prefetched in a background thread, checkpointable.

    Being a `grain.DatasetIterator`, it can go straight to orbax through
    `grain.checkpoint.CheckpointSave` / `CheckpointRestore`.
    """

    def __init__(self, dataset: _BatchDataset, prefetch: int):
        self.dataset = dataset
        if prefetch > 0:
            dataset = grain.experimental.ThreadPrefetchIterDataset(dataset, prefetch_buffer_size=prefetch)
        super().__init__(iter(dataset))
        _OPEN_STREAMS.add(self)

    @property
    def stages(self) -> tuple[Stage, ...]:
        return self.dataset.stages

    def __next__(self) -> Batch:
        self._assert_not_closed()
        return next(self._parent)

    def get_state(self) -> dict[str, int]:
        """The position after the last batch returned: epoch, shard, offset, step."""
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        """Resume so that the next batch is the one that followed `state`."""
        self._assert_not_closed()
        self._parent.set_state(state)

    def close(self) -> None:
        """Stop the prefetch thread; the stream cannot be used afterwards."""
        if not getattr(self, "_closed", True):  # (__del__ also runs when __init__ raised)
            super().close()
            self._parents = ()  # let the prefetcher go now, while grain's modules are alive
            _OPEN_STREAMS.discard(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _stages(batch_seqs: int, seq_len: int, max_doc_len: int | None, stages: Sequence[Stage]) -> list[Stage]:
    return [Stage(batch_seqs=batch_seqs, seq_len=seq_len, max_doc_len=max_doc_len), *stages]


class TokenStream(_Stream):
    """Contiguous `[b, T]` windows of the token stream, as train_gpt_simple.py reads them.

    Each step takes the next `batch_seqs * seq_len + 1` tokens at `pos`; process r
    gets the r-th contiguous slice (with its own +1 token for the targets) and `pos`
    advances by `batch_seqs * seq_len`. A shard is left once `pos + B + 1 >=
    len(shard)` (its tail is dropped), and after the last shard the walk wraps to
    the first: a new epoch.

    Args:
      files: shard paths (see `find_shards`); every header is checked here.
      batch_seqs: rows per step over all processes; each yields `batch_seqs //
        process_count` rows.
      seq_len: tokens per row.
      stages: later `Stage`s (with `step` > 0) that change the batch shape.
      seed: None walks shards in sorted order every epoch; an int permutes them
        per epoch, deterministically.
      prefetch: batches prepared ahead in a background thread (0: none).
      vocab_size: if given, a shard holding an id >= it raises ShardError when
        the walk first reaches it.

    Yields:
      `{"inputs", "targets"}`, int32 `[b, T]`.
    """

    def __init__(
        self,
        files: Sequence[str | os.PathLike],
        *,
        batch_seqs: int,
        seq_len: int,
        process_index: int = 0,
        process_count: int = 1,
        stages: Sequence[Stage] = (),
        seed: int | None = None,
        prefetch: int = 2,
        vocab_size: int | None = None,
    ):
        stages = _stages(batch_seqs, seq_len, None, stages)
        super().__init__(_Contiguous(files, stages, process_index, process_count, seed, vocab_size), prefetch)


class DocumentStream(_Stream):
    """BOS-aligned rows with document boundaries, as records #26-#77 read the data.

    Each row starts at a BOS and lays whole documents end to end, each cut to
    `max_doc_len` tokens (the rest of a longer document is skipped); the last one
    is cut so the row holds exactly `seq_len + 1` tokens. Rows are therefore always
    full: shapes are fixed per stage with no padding tokens at all. Rows are filled
    in order for all processes; every process walks the document boundaries, but
    process r reads only the tokens of its rows `[r*b, (r+1)*b)`. When a shard
    cannot fill a whole step, its tail is dropped and the next shard begins
    (wrapping after the last).

    Args:
      files, batch_seqs, seq_len, process_index, process_count, stages, seed,
        prefetch, vocab_size: as for `TokenStream`.
      max_doc_len: longest document piece at stage 0 (None: uncut).

    Yields:
      `{"inputs", "targets", "segment_ids"}`, int32 `[b, T]`. `segment_ids` count
      the BOS tokens in `inputs` up to and including each position (1, 2, ... per
      row), so two positions may attend to each other iff their ids are equal.
    """

    def __init__(
        self,
        files: Sequence[str | os.PathLike],
        *,
        batch_seqs: int,
        seq_len: int,
        max_doc_len: int | None,
        process_index: int = 0,
        process_count: int = 1,
        stages: Sequence[Stage] = (),
        seed: int | None = None,
        prefetch: int = 2,
        vocab_size: int | None = None,
    ):
        stages = _stages(batch_seqs, seq_len, max_doc_len, stages)
        super().__init__(_Documents(files, stages, process_index, process_count, seed, vocab_size), prefetch)
