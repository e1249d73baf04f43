"""The train streams: exact windows, BOS-aligned rows, stages, resume, processes."""

import numpy as np
import pytest

from jaxrun import data
from jaxrun.data import BOS


def _reference_contiguous(files, batch_tokens, local, rank):
    """train_gpt_simple.py's generator, flattened: yields rank's (inputs, targets) until data runs out."""
    it = iter(files)
    tokens, pos = np.asarray(data.read_shard(next(it))), 0
    while True:
        if pos + batch_tokens + 1 >= len(tokens):
            try:
                tokens, pos = np.asarray(data.read_shard(next(it))), 0
            except StopIteration:
                return
            continue
        buf = tokens[pos + rank * local :][: local + 1].astype(np.int32)
        yield buf[:-1], buf[1:]
        pos += batch_tokens


def _reference_documents(files, num_tokens_local, world, max_len):
    """records #26-#77 Shard.next_batch, as plain Python: yields per-rank flat buffers.

    The three arguments may be callables of the step, as the records `.send()` new
    sizes to their generator when a stage changes.
    """
    size_at, world_at, max_at = (
        a if callable(a) else (lambda step, a=a: a) for a in (num_tokens_local, world, max_len)
    )

    def next_batch(tokens, bos, idx, step):
        """One step's buffers and the next document index, or None when the shard runs out."""
        bufs = []
        for _ in range(world_at(step)):
            pieces, cur_len = [], 0
            while cur_len <= size_at(step):
                if idx >= len(bos):
                    return None
                cur = bos[idx]
                nxt = bos[idx + 1] if idx + 1 < len(bos) else len(tokens)
                end = min(nxt, cur + max_at(step), cur + size_at(step) - cur_len + 1)
                pieces.append(tokens[cur:end])
                cur_len += end - cur
                idx += 1
            bufs.append(np.concatenate(pieces).astype(np.int32))
        return bufs, idx

    step = 0
    for file in files:
        tokens = np.asarray(data.read_shard(file))
        bos, idx = np.flatnonzero(tokens == BOS), 0
        while (out := next_batch(tokens, bos, idx, step)) is not None:
            bufs, idx = out
            step += 1
            yield bufs


# ---- contiguous windows ----


@pytest.mark.parametrize("batch_seqs, seq_len, procs", [(2, 16, 1), (4, 8, 2), (3, 5, 3), (8, 32, 4)])
def test_contiguous_matches_reference(shards, batch_seqs, seq_len, procs):
    b = batch_seqs // procs
    for rank in range(procs):
        ref = list(_reference_contiguous(shards, batch_seqs * seq_len, b * seq_len, rank))
        assert len(ref) > 3
        with data.TokenStream(
            shards, batch_seqs=batch_seqs, seq_len=seq_len, process_index=rank, process_count=procs
        ) as stream:
            for inputs, targets in ref + ref[:3]:  # and wraps to a new epoch
                batch = next(stream)
                assert batch["inputs"].dtype == np.int32 and batch["inputs"].shape == (b, seq_len)
                np.testing.assert_array_equal(batch["inputs"].ravel(), inputs)
                np.testing.assert_array_equal(batch["targets"].ravel(), targets)


def test_shards_too_short_for_a_batch_are_skipped(tmp_path, shards):
    tiny = tmp_path / "toy_train_000001a.bin"
    data.write_shard(tiny, np.full(40, BOS, np.uint16))
    ref = list(_reference_contiguous(shards, 64, 64, 0))
    with data.TokenStream([shards[0], tiny, *shards[1:]], batch_seqs=2, seq_len=32) as stream:
        for inputs, _ in ref:
            np.testing.assert_array_equal(next(stream)["inputs"].ravel(), inputs)


def test_contiguous_first_windows_by_hand(tmp_path):
    data.write_shard(tmp_path / "s.bin", np.arange(100, dtype=np.uint16))
    with data.TokenStream([tmp_path / "s.bin"], batch_seqs=2, seq_len=10, prefetch=0) as stream:
        b0, b1 = next(stream), next(stream)
    np.testing.assert_array_equal(b0["inputs"], np.arange(20).reshape(2, 10))
    np.testing.assert_array_equal(b0["targets"], np.arange(1, 21).reshape(2, 10))
    np.testing.assert_array_equal(b1["inputs"], np.arange(20, 40).reshape(2, 10))


@pytest.mark.parametrize("kind", ["tokens", "documents"])
def test_processes_read_disjoint_slices(shards, kind):
    def make(**procs):
        if kind == "tokens":
            return data.TokenStream(shards, batch_seqs=8, seq_len=8, **procs)
        return data.DocumentStream(shards, batch_seqs=8, seq_len=8, max_doc_len=6, **procs)

    seen = []
    for rank in range(4):
        with make(process_index=rank, process_count=4) as s:
            seen.append([next(s) for _ in range(30)])
    with make() as whole:
        for step in range(30):
            full = next(whole)
            for key in full:
                np.testing.assert_array_equal(
                    np.concatenate([seen[r][step][key] for r in range(4)]), full[key]
                )


# ---- resume ----


@pytest.mark.parametrize("kind", ["tokens", "documents"])
@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_gives_identical_next_batch(shards, kind, prefetch):
    def make():
        if kind == "tokens":
            return data.TokenStream(shards, batch_seqs=4, seq_len=64, prefetch=prefetch)
        return data.DocumentStream(shards, batch_seqs=4, seq_len=64, max_doc_len=24, prefetch=prefetch)

    with make() as a:
        for _ in range(60):  # past the end of an epoch
            next(a)
        state = a.get_state()
        expected = [next(a) for _ in range(5)]
    with make() as b:
        next(b)
        b.set_state(state)
        for want in expected:
            got = next(b)
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])
    assert state["epoch"] >= 1


# ---- BOS-aligned documents ----


@pytest.mark.parametrize(
    "batch_seqs, seq_len, max_doc_len, procs", [(2, 32, 16, 1), (4, 48, 1000, 2), (3, 7, 5, 3)]
)
def test_documents_match_reference(shards, batch_seqs, seq_len, max_doc_len, procs):
    ref = list(_reference_documents(shards, seq_len, batch_seqs, max_doc_len))
    assert len(ref) > 3
    b = batch_seqs // procs
    for rank in range(procs):
        with data.DocumentStream(
            shards,
            batch_seqs=batch_seqs,
            seq_len=seq_len,
            max_doc_len=max_doc_len,
            process_index=rank,
            process_count=procs,
        ) as stream:
            for bufs in ref + ref[:2]:  # and wraps to a new epoch
                batch = next(stream)
                mine = np.stack(bufs[rank * b : (rank + 1) * b])
                np.testing.assert_array_equal(batch["inputs"], mine[:, :-1])
                np.testing.assert_array_equal(batch["targets"], mine[:, 1:])


def _doc_lengths(row):
    """Lengths of the documents in one row, split at its BOS tokens."""
    starts = np.flatnonzero(row == BOS)
    return np.diff(starts, append=len(row))


@pytest.mark.parametrize("max_doc_len", [1, 9, 40, None])
def test_documents_invariants(shards, max_doc_len):
    with data.DocumentStream(shards, batch_seqs=4, seq_len=32, max_doc_len=max_doc_len) as stream:
        for _ in range(50):
            batch = next(stream)
            assert set(batch) == {"inputs", "targets", "segment_ids"}
            for key, value in batch.items():
                assert value.dtype == np.int32 and value.shape == (4, 32), key
            assert (batch["inputs"][:, 0] == BOS).all()
            np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
            np.testing.assert_array_equal(batch["segment_ids"], data.segment_ids(batch["inputs"]))
            for row, seg in zip(batch["inputs"], batch["segment_ids"]):
                assert seg[0] == 1 and (np.diff(seg) >= 0).all()
                np.testing.assert_array_equal(
                    np.flatnonzero(np.diff(seg)) + 1, np.flatnonzero(row == BOS)[1:]
                )
                if max_doc_len is not None:
                    assert _doc_lengths(row).max() <= max_doc_len


def test_documents_are_whole_documents(tmp_path):
    """Documents shorter than max_doc_len arrive intact, in order; longer ones keep their head."""
    docs = [
        np.array([BOS, *range(1 + 10 * i, 1 + 10 * i + n)], np.uint16)
        for i, n in enumerate([3, 12, 5, 0, 7] * 4)
    ]
    data.write_shard(tmp_path / "d.bin", np.concatenate(docs))
    with data.DocumentStream([tmp_path / "d.bin"], batch_seqs=1, seq_len=15, max_doc_len=8, prefetch=0) as s:
        first, second = next(s), next(s)
    # 16 tokens: doc0 (4), doc1 cut to 8, doc2 cut to fit (4 of its 6); the next row starts at doc3.
    row = np.concatenate([docs[0], docs[1][:8], docs[2][:4]])
    np.testing.assert_array_equal(first["inputs"][0], row[:-1])
    np.testing.assert_array_equal(first["targets"][0], row[1:])
    np.testing.assert_array_equal(first["segment_ids"][0], [1] * 4 + [2] * 8 + [3] * 3)
    np.testing.assert_array_equal(second["inputs"][0, :2], [BOS, BOS])  # doc3 is empty: BOS alone


# ---- stages and order ----

STAGES = [
    data.Stage(step=4, batch_seqs=4, seq_len=24, max_doc_len=16),
    data.Stage(step=9, batch_seqs=2, seq_len=40, max_doc_len=1000),
]


def test_stage_at():
    stages = [data.Stage(batch_seqs=8, seq_len=16), *STAGES]
    assert [data.stage_at(s, stages).step for s in [0, 3, 4, 8, 9, 10**6]] == [0, 0, 4, 4, 9, 9]
    assert stages[1].tokens == 96
    with pytest.raises(ValueError, match="must increase"):
        data.TokenStream(["unused.bin"], batch_seqs=2, seq_len=8, stages=STAGES[::-1])


def test_document_stages_match_reference(shards):
    stages = [data.Stage(batch_seqs=6, seq_len=16, max_doc_len=8), *STAGES]
    at = lambda step: data.stage_at(step, stages)
    ref = _reference_documents(
        shards, lambda s: at(s).seq_len, lambda s: at(s).batch_seqs, lambda s: at(s).max_doc_len
    )
    with data.DocumentStream(
        shards, batch_seqs=6, seq_len=16, max_doc_len=8, stages=STAGES, process_index=1, process_count=2
    ) as stream:
        assert stream.stages == tuple(stages)
        for step in range(14):
            stage, batch, bufs = at(step), next(stream), next(ref)
            b = stage.batch_seqs // 2
            assert batch["inputs"].shape == (b, stage.seq_len)  # tokens per step are exact
            np.testing.assert_array_equal(batch["inputs"], np.stack(bufs[b : 2 * b])[:, :-1])
            for row in batch["inputs"]:
                assert _doc_lengths(row).max() <= stage.max_doc_len


def test_contiguous_stages(tmp_path):
    data.write_shard(tmp_path / "s.bin", np.arange(1000, dtype=np.uint16))
    stages = [data.Stage(step=2, batch_seqs=1, seq_len=5)]
    with data.TokenStream([tmp_path / "s.bin"], batch_seqs=2, seq_len=10, stages=stages) as stream:
        starts = [int(next(stream)["inputs"][0, 0]) for _ in range(4)]
    assert starts == [0, 20, 40, 45]


def test_resume_across_a_stage_change(shards):
    make = lambda: data.DocumentStream(shards, batch_seqs=6, seq_len=16, max_doc_len=8, stages=STAGES)
    with make() as a:
        for _ in range(3):
            next(a)
        state = a.get_state()
        expected = [next(a) for _ in range(8)]
    with make() as b:
        b.set_state(state)
        for want in expected:
            np.testing.assert_array_equal(next(b)["segment_ids"], want["segment_ids"])


def test_seeded_shard_order(shards):
    per_epoch = sum((len(data.read_shard(f)) - 2) // 50 for f in shards)

    def windows(seed, epochs=2):
        with data.TokenStream(shards, batch_seqs=1, seq_len=50, seed=seed) as s:
            out = [tuple(next(s)["inputs"][0]) for _ in range(epochs * per_epoch)]
            assert s.get_state()["epoch"] == epochs - 1  # at the end of the last epoch
            return out

    unseeded = windows(None)
    assert unseeded[:per_epoch] == unseeded[per_epoch:]
    assert unseeded[0] == tuple(data.read_shard(shards[0])[:50])
    seeded = windows(7)
    assert seeded == windows(7) and seeded != unseeded and seeded != windows(8)
    four = windows(7, epochs=4)
    assert len({tuple(four[e * per_epoch : (e + 1) * per_epoch]) for e in range(4)}) > 1  # orders per epoch
    assert sorted(seeded) == sorted(unseeded)  # the same windows, in another shard order


def test_too_little_data_is_an_error(shards):
    stream = data.TokenStream(shards, batch_seqs=64, seq_len=1024, prefetch=0)
    with stream, pytest.raises(ValueError, match="no shard .* holds one batch"):
        next(stream)


def test_orbax_saves_and_restores_the_stream(shards, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    import grain

    make = lambda: data.DocumentStream(shards, batch_seqs=4, seq_len=32, max_doc_len=16)
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    with make() as a:
        for _ in range(7):
            next(a)
        manager.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(a)))
        manager.wait_until_finished()
        want = next(a)
    with make() as b:
        manager.restore(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(b)))
        got = next(b)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    manager.close()


def test_wrapping_to_a_new_epoch_is_logged(shards, caplog):
    per_epoch = sum((len(data.read_shard(f)) - 2) // 50 for f in shards)
    with caplog.at_level("WARNING", logger="jaxrun.data"):
        with data.TokenStream(shards, batch_seqs=1, seq_len=50, prefetch=0) as stream:
            for _ in range(per_epoch):
                next(stream)
            assert not caplog.records
            next(stream)
    (record,) = caplog.records
    assert f"all 3 shards used after {per_epoch} batches" in record.getMessage()
    assert "(epoch 2)" in record.getMessage() and record.levelname == "WARNING"
