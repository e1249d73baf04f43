"""Validation tokens: the first val_tokens positions, and their document ids."""

import numpy as np
import pytest

from jaxrun import data


def test_val_batches(shards):
    stream = np.concatenate([np.asarray(data.read_shard(f)) for f in shards]).astype(np.int32)
    inputs, targets = data.val_batches(shards, num_tokens=64, seq_len=16)
    assert inputs.shape == targets.shape == (4, 16) and inputs.dtype == np.int32
    np.testing.assert_array_equal(inputs.ravel(), stream[:64])
    np.testing.assert_array_equal(targets.ravel(), stream[1:65])
    # Crossing into the second file.
    n = (len(stream) - 1) // 16 * 16
    inputs, targets = data.val_batches(shards, num_tokens=n, seq_len=16)
    np.testing.assert_array_equal(targets.ravel(), stream[1 : n + 1])


def test_val_batches_too_few_tokens(shards):
    have = sum(len(data.read_shard(f)) for f in shards)
    with pytest.raises(data.ShardError, match=f"hold {have:,} tokens.*data.val_tokens"):
        data.val_batches(shards, num_tokens=have // 16 * 16 + 16, seq_len=16)
    with pytest.raises(ValueError, match="multiple of seq_len"):
        data.val_batches(shards, num_tokens=60, seq_len=16)
