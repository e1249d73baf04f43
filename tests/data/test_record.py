"""Record #77's stream against a plain re-implementation of its PyTorch loader."""

import itertools
import logging

import numpy as np
import pytest

from jaxrun import data
from jaxrun.data import BOS

T0, MAX0 = 64, 24  # stage 0: rank buffer length and max_doc_len
STAGES = [data.Stage(step=4, batch_seqs=8, seq_len=96, max_doc_len=48)]


@pytest.fixture
def record_shards(tmp_path):
    """Three shards of documents of 1-150 tokens (ids < 1000), a few rank-steps each."""
    rng = np.random.default_rng(77)
    files = []
    for i, n_docs in enumerate([40, 25, 55]):
        lengths = rng.integers(0, 150, n_docs)
        docs = [[BOS, *rng.integers(0, 1000, n)] for n in lengths]
        files.append(tmp_path / f"rec_train_{i:06d}.bin")
        data.write_shard(files[-1], np.concatenate(docs).astype(np.uint16))
    return files


def _source_loader(files, ranks, stage_at):
    """The record's distributed_data_generator + Shard.next_batch, for all ranks, cycling the files.

    Yields one step at a time: a list of (buffer of T+1 tokens, cu_seqlens) per rank
    buffer, plans in order and ranks within a plan.
    """
    file_iter = itertools.cycle(files)
    tokens = np.asarray(data.read_shard(next(file_iter)))
    bos, i = np.flatnonzero(tokens == BOS), 0
    for step in itertools.count():
        stage = stage_at(step)
        T, max_len = stage.seq_len, stage.max_doc_len
        out = []
        while len(out) < stage.batch_seqs:
            plan, idx = [], i
            try:
                for _ in range(ranks):
                    starts, ends, cur_len = [], [], 0
                    while cur_len <= T:
                        if idx >= len(bos):
                            raise StopIteration
                        cur = bos[idx]
                        nxt = bos[idx + 1] if idx + 1 < len(bos) else len(tokens)
                        end = min(nxt, cur + max_len, cur + T - cur_len + 1)
                        starts.append(cur)
                        ends.append(end)
                        cur_len += end - cur
                        idx += 1
                    plan.append((starts, ends))
            except StopIteration:
                tokens = np.asarray(data.read_shard(next(file_iter)))
                bos, i = np.flatnonzero(tokens == BOS), 0
                continue
            i = idx
            for starts, ends in plan:
                buf = np.concatenate([tokens[a:b] for a, b in zip(starts, ends)]).astype(np.int32)
                ends = list(ends)
                ends[-1] -= 1  # the last document loses its final token to the targets
                cu = np.concatenate([[0], np.cumsum(np.subtract(ends, starts))])
                out.append((buf, cu))
        yield out


def _ids_from_cu_seqlens(cu, T):
    """Document number (1, 2, ...) of each of T positions, from cu_seqlens."""
    return np.searchsorted(cu, np.arange(T), side="right").astype(np.int32)


def _make(files, ranks=8, batch_seqs=8, stages=STAGES, **kw):
    return data.RecordStream(
        files, batch_seqs=batch_seqs, seq_len=T0, max_doc_len=MAX0, ranks=ranks, stages=stages, **kw
    )


@pytest.mark.parametrize("ranks", [8, 1])
def test_record_stream_matches_the_source(record_shards, ranks, caplog):
    all_stages = [data.Stage(batch_seqs=8, seq_len=T0, max_doc_len=MAX0), *STAGES]
    ref = _source_loader(record_shards, ranks, lambda step: data.stage_at(step, all_stages))
    caplog.set_level(logging.WARNING, logger="jaxrun.data")
    with _make(record_shards, ranks=ranks, prefetch=0) as stream:
        for step in range(24):
            batch, want = next(stream), next(ref)
            T = data.stage_at(step, all_stages).seq_len
            for key in ("inputs", "targets", "segment_ids"):
                assert batch[key].dtype == np.int32 and batch[key].shape == (8, T), key
            for row, (buf, cu) in enumerate(want):
                np.testing.assert_array_equal(batch["inputs"][row], buf[:-1])
                np.testing.assert_array_equal(batch["targets"][row], buf[1:])
                np.testing.assert_array_equal(batch["segment_ids"][row], _ids_from_cu_seqlens(cu, T))
        epochs = stream.get_state()["epoch"]
    assert epochs >= 2  # the run went through a stage change, shard changes and wraps
    wraps = [r.getMessage() for r in caplog.records if "starting over from the first shard" in r.getMessage()]
    assert len(wraps) == epochs and f"(epoch {epochs + 1})" in wraps[-1]


def test_ranks_change_where_a_shard_ends(record_shards):
    """8 GPUs drop a shard's tail per step, one GPU per micro-batch: the streams part there."""
    with _make(record_shards, ranks=8, prefetch=0) as eight, _make(record_shards, ranks=1, prefetch=0) as one:
        same = [np.array_equal(next(eight)["inputs"], next(one)["inputs"]) for _ in range(6)]
    assert same[0] and not all(same)


def test_record_resume_is_exact(record_shards):
    stages = [data.Stage(step=3, batch_seqs=16, seq_len=48, max_doc_len=16)]
    for ranks in (8, 2):
        with _make(record_shards, ranks=ranks, stages=stages) as a:
            for _ in range(9):  # past the stage change, where plans per step double
                next(a)
            state = a.get_state()
            want = [next(a) for _ in range(6)]
        with _make(record_shards, ranks=ranks, stages=stages) as b:
            next(b)
            b.set_state(state)
            for expected in want:
                got = next(b)
                for key in expected:
                    np.testing.assert_array_equal(got[key], expected[key])
        assert state["step"] == 9


def test_record_rejects_ranks_that_do_not_divide(record_shards):
    with pytest.raises(ValueError, match="not a multiple of ranks=3"):
        _make(record_shards, ranks=3)


def test_record_val_chunks_match_the_source(record_shards):
    """Contiguous rank-chunks, not BOS-aligned; documents from BOS positions inside each chunk."""
    T_val, chunks = 100, 7
    tokens = np.asarray(data.read_shard(record_shards[0])).astype(np.int32)
    inputs, targets = data.val_batches(record_shards[:1], num_tokens=chunks * T_val, seq_len=T_val)
    seg = data.segment_ids(inputs)
    for r in range(chunks):
        buf = tokens[r * T_val : r * T_val + T_val + 1]  # the source's unaligned branch
        np.testing.assert_array_equal(inputs[r], buf[:-1])
        np.testing.assert_array_equal(targets[r], buf[1:])
        cu = np.concatenate([[0], np.flatnonzero(buf[:-1] == BOS), [T_val]])
        ref = _ids_from_cu_seqlens(cu, T_val)
        # Same documents: the ids change exactly where the source's do (the labels may differ by one).
        np.testing.assert_array_equal(np.diff(seg[r]) != 0, np.diff(ref) != 0)
        assert seg[r][0] == (buf[0] == BOS)  # a leading partial document is document 0
