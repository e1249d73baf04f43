"""Validation tokens, read as the references score them."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from jaxrun.config import ConfigError
from jaxrun.data.shards import BOS, ShardError, ShardSource, check_token_ids


def segment_ids(inputs: np.ndarray) -> np.ndarray:
    """Document ids per position: the number of BOS tokens up to and including it, per row."""
    return np.cumsum(inputs == BOS, axis=-1, dtype=np.int32)


def val_batches(
    files: Sequence[str | os.PathLike], *, num_tokens: int, seq_len: int, vocab_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The first `num_tokens` validation positions, scored as the reference scores them.

    Inputs are stream tokens `[0, num_tokens)` and targets `[1, num_tokens + 1)`,
    as `train_gpt_simple.py` reads its one val batch (identical whenever the first
    file holds more than `num_tokens + 1` tokens, as FineWeb's does). Record #77
    scores the same positions in rows of 262,144: its rank-chunks are contiguous,
    so a chunk's last target is the next chunk's first input.

    Returns:
      `(inputs, targets)`, int32 `[num_tokens // seq_len, seq_len]`. For document
      masking, `segment_ids(inputs)` numbers the documents (0 for a row's leading
      partial document), as the records derive cu_seqlens from BOS positions.

    Raises:
      ConfigError: if `num_tokens` is not a positive multiple of `seq_len`.
      ShardError: if the files hold too few tokens, or (given `vocab_size`) an id
        outside the vocabulary.
    """
    if seq_len <= 0 or num_tokens <= 0 or num_tokens % seq_len:
        raise ConfigError(
            f"data.val_tokens={num_tokens} must be a positive multiple of the val row length {seq_len} "
            f"(data.val_seq_len, or data.seq_len if that is None), e.g. {max(1, num_tokens // seq_len) * seq_len:,}"
        )
    source = ShardSource(files)
    have = sum(source.num_tokens)
    if have < num_tokens + 1:
        raise ShardError(
            f"the val files ({', '.join(str(f) for f in source.files)}) hold {have:,} tokens, "
            f"fewer than the {num_tokens + 1:,} needed to score {num_tokens:,}; "
            f"set data.val_tokens to at most {(have - 1) // seq_len * seq_len:,}"
        )
    parts, need = [], num_tokens + 1
    for i in range(len(source)):
        take = min(need, source.num_tokens[i])
        parts.append(np.asarray(source[i][:take], dtype=np.int32))
        if vocab_size is not None:
            check_token_ids(parts[-1], vocab_size, source.files[i])
        need -= take
        if need == 0:
            break
    buf = np.concatenate(parts)
    return buf[:-1].reshape(-1, seq_len), buf[1:].reshape(-1, seq_len)
