"""The GPT-2 tokenizer (tiktoken's r50k_base), loaded offline from a vendored file.

The BPE ranks ship as `jaxrun/assets/gpt2.tiktoken` (the same file the
`openai-whisper` sdist carries), checked against its published sha256. The
encoding is assembled from tiktoken's own pieces exactly as
`tiktoken_ext.openai_public` defines `gpt2`, so ids match `get_encoding("gpt2")`
without touching the network.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

RANKS_FILE = Path(__file__).parent / "assets" / "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT_ID = 50256  # <|endoftext|>, which the speedrun shards use as BOS
VOCAB_SIZE = 50257


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 BPE (r50k_base with `<|endoftext|>` = 50256), built offline.

    Raises:
      FileNotFoundError: if the vendored ranks file is missing.
      ValueError: if its sha256 is not the published one.
    """
    if not RANKS_FILE.is_file():
        raise FileNotFoundError(f"GPT-2 BPE ranks not found at {RANKS_FILE}; reinstall jaxrun")
    digest = hashlib.sha256(RANKS_FILE.read_bytes()).hexdigest()
    if digest != RANKS_SHA256:
        raise ValueError(f"{RANKS_FILE}: sha256 {digest} is not the r50k_base hash {RANKS_SHA256}")
    ranks = load_tiktoken_bpe(str(RANKS_FILE), expected_hash=RANKS_SHA256)
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: EOT_ID},
        explicit_n_vocab=VOCAB_SIZE,
    )


def encode_documents(texts: list[str]) -> list[np.ndarray]:
    """Each text as the speedrun stores a document: BOS (`<|endoftext|>`) then its ids, uint16.

    Special-token text inside a document is encoded as ordinary text, so decoding
    gives the document back exactly. Light to import: tokenizer worker processes run it.
    """
    enc = get_tokenizer()
    return [
        np.array([EOT_ID, *ids], dtype=np.uint16) for ids in enc.encode_ordinary_batch(texts, num_threads=1)
    ]
