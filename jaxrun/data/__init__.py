"""Token data: llm.c/FineWeb shards, the train streams, validation tokens, and getting shards.

- `shards`: the shard file format (read, write, headers, find, unxz).
- `streams`: the train batchers, contiguous (`TokenStream`) and BOS-aligned
  documents (`DocumentStream`), with stages and exact resume.
- `record`: record #77's stream, planned rank by rank as its script does (`RecordStream`).
- `val`: the validation tokens.
- `fineweb`, `prepare`, `demo_corpus`, `cli`: FineWeb from the hub, your own
  text to shards, the embedded demo corpus, and `launch.py data`.
"""

from jaxrun.data.record import RecordStream
from jaxrun.data.shards import (
    BOS,
    HEADER_BYTES,
    HEADER_INTS,
    MAGIC,
    VERSION,
    ShardError,
    ShardSource,
    check_token_ids,
    find_shards,
    read_header,
    read_shard,
    unxz,
    write_shard,
)
from jaxrun.data.streams import Batch, DocumentStream, Stage, TokenStream, stage_at
from jaxrun.data.val import segment_ids, val_batches

__all__ = [
    "BOS",
    "HEADER_BYTES",
    "HEADER_INTS",
    "MAGIC",
    "VERSION",
    "Batch",
    "DocumentStream",
    "ShardError",
    "RecordStream",
    "ShardSource",
    "Stage",
    "TokenStream",
    "check_token_ids",
    "find_shards",
    "read_header",
    "read_shard",
    "segment_ids",
    "stage_at",
    "unxz",
    "val_batches",
    "write_shard",
]
