"""FineWeb from the Hugging Face hub: `kjj0/fineweb10B-gpt2`, resumably.

The val shard and N train shards of 100M tokens each are fetched with
`huggingface_hub`, dropped transfers resumed and finished shards kept, and every
header is checked.
"""

from __future__ import annotations

import os
from pathlib import Path

from tqdm import tqdm

from jaxrun.data.shards import ShardError, read_header

FINEWEB_REPO = "kjj0/fineweb10B-gpt2"
FINEWEB_MAX_TRAIN = 103  # fineweb10B: 103 train shards of 100M tokens


class DownloadError(RuntimeError):
    """A shard could not be fetched from the hub; the message names it."""


def fineweb_files(train_shards: int) -> list[str]:
    """The val shard and the first `train_shards` train shards, as named on the hub."""
    if not 0 <= train_shards <= FINEWEB_MAX_TRAIN:
        raise ValueError(f"--train-shards={train_shards} must be in [0, {FINEWEB_MAX_TRAIN}]")
    return ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, train_shards + 1)]


def download_fineweb(
    out_dir: str | os.PathLike,
    train_shards: int,
    *,
    repo_id: str = FINEWEB_REPO,
    endpoint: str | None = None,
) -> list[Path]:
    """Download FineWeb shards into `out_dir`, resumably, and validate their headers.

    Resuming works at two levels: within a run, `huggingface_hub` retries a dropped
    transfer from the byte where it stopped; across runs, shards already present
    with a valid header are kept and only missing or damaged ones are fetched.
    `endpoint` is a hub mirror's URL (default: `HF_ENDPOINT` or huggingface.co).
    """
    from huggingface_hub import hf_hub_download  # imported here: only this command needs it

    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    bar = tqdm(fineweb_files(train_shards), desc="fineweb shards", unit="shard")
    for name in bar:
        path = out_dir / name
        try:
            read_header(path)
            paths.append(path)
            continue
        except ShardError:
            force = path.exists()  # damaged: the hub's cache metadata may call it complete
        bar.set_postfix_str(name)
        try:
            hf_hub_download(
                repo_id=repo_id,
                filename=name,
                repo_type="dataset",
                local_dir=out_dir,
                force_download=force,
                endpoint=endpoint,
            )
        except Exception as e:  # network or hub trouble: name the file; a rerun resumes
            raise DownloadError(
                f"downloading {repo_id}/{name} failed ({type(e).__name__}: {e}); run the command again to resume"
            ) from e
        read_header(path)  # a bad download raises ShardError naming the file
        paths.append(path)
    bar.close()
    return paths
