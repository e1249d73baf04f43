"""Validation tokens: the first val_tokens positions, and their document ids."""

import numpy as np
import pytest

from jaxrun import data
from jaxrun.config import ConfigError


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
    with pytest.raises(ConfigError, match="multiple of the val row length 16"):
        data.val_batches(shards, num_tokens=60, seq_len=16)


def test_val_errors_name_the_setting(tmp_path, shards):
    with pytest.raises(ConfigError, match=r"data.val_tokens=5000 must be a positive multiple of .* 64"):
        data.val_batches(shards, num_tokens=5000, seq_len=64)
    bad = tmp_path / "val_000000.bin"
    data.write_shard(bad, np.array([data.BOS, 1, 2, 50400, 3, 4], np.uint16))
    with pytest.raises(data.ShardError, match="val_000000.bin: token id 50400"):
        data.val_batches([bad], num_tokens=4, seq_len=2, vocab_size=50304)
