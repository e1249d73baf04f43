"""Small synthetic shards for the data tests."""

import numpy as np
import pytest

from jaxrun import data
from jaxrun.data import BOS


def _docs(rng, n_docs, max_len=60):
    """A token stream of n_docs documents, each a BOS then 0..max_len ordinary ids."""
    parts = []
    for _ in range(n_docs):
        parts.append([BOS, *rng.integers(0, 50000, rng.integers(0, max_len + 1))])
    return np.concatenate(parts).astype(np.uint16)


@pytest.fixture
def shards(tmp_path):
    rng = np.random.default_rng(0)
    files = []
    for i, n_docs in enumerate([120, 90, 150]):
        path = tmp_path / f"toy_train_{i:06d}.bin"
        data.write_shard(path, _docs(rng, n_docs))
        files.append(path)
    return files
