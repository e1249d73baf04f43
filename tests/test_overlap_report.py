"""benchmarks/overlap_report: the scheduled-HLO parser, and the real path on 8 host CPU devices."""

import json

import jax
import numpy as np

from benchmarks import overlap_report
from jaxrun import sharding, train
from jaxrun.config import apply_overrides

# As a GPU compile prints it: an async all-gather with two fusions (and a get-tuple-element, not
# compute) before its done, a generic async-start around a reduce-scatter with one fusion, and a
# synchronous all-reduce. The wrapped reduce-scatter is part of the async pair, not a sync one.
GPU_HLO = """\
HloModule jit_step, is_scheduled=true, entry_computation_layout={(f32[1,16]{1,0})->(f32[1,16]{1,0}, f32[])}, \
num_partitions=8

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%fused_square (p0: f32[8,16]) -> f32[8,16] {
  %p0 = f32[8,16]{1,0} parameter(0)
  ROOT %multiply.0 = f32[8,16]{1,0} multiply(%p0, %p0)
}

%wrapped_reduce_scatter_computation (a0: f32[8,16]) -> f32[1,16] {
  %a0 = f32[8,16]{1,0} parameter(0)
  ROOT %reduce-scatter.1 = f32[1,16]{1,0} reduce-scatter(%a0), channel_id=2, replica_groups=[1,8]<=[8], \
dimensions={0}, to_apply=%add
}

ENTRY %main.42_spmd (param.1: f32[1,16], param.2: f32[8,16]) -> (f32[1,16], f32[]) {
  %param.1 = f32[1,16]{1,0} parameter(0), sharding={replicated}
  %param.2 = f32[8,16]{1,0} parameter(1), sharding={replicated}
  %all-gather-start = (f32[1,16]{1,0}, f32[8,16]{1,0}) all-gather-start(%param.1), channel_id=1, \
replica_groups=[1,8]<=[8], dimensions={0}, backend_config={"collective_backend_config":{"is_sync":false}}
  %fusion.1 = f32[8,16]{1,0} fusion(%param.2), kind=kLoop, calls=%fused_square
  %get-tuple-element.3 = f32[1,16]{1,0} get-tuple-element(%all-gather-start), index=0
  %fusion.2 = f32[8,16]{1,0} fusion(%fusion.1), kind=kLoop, calls=%fused_square
  %all-gather-done = f32[8,16]{1,0} all-gather-done(%all-gather-start)
  %async-start = ((f32[8,16]{1,0}), f32[1,16]{1,0}) async-start(%all-gather-done), \
calls=%wrapped_reduce_scatter_computation
  %fusion.3 = f32[8,16]{1,0} fusion(%fusion.2), kind=kLoop, calls=%fused_square
  %async-done = f32[1,16]{1,0} async-done(%async-start)
  %bitcast.7 = f32[128]{0} bitcast(%fusion.3)
  %all-reduce = f32[] all-reduce(%bitcast.7), channel_id=3, replica_groups=[1,8]<=[8], to_apply=%add
  ROOT %tuple.9 = (f32[1,16]{1,0}, f32[]) tuple(%async-done, %all-reduce)
}
"""

# The other spellings: the sugared async reduce-scatter with an update, inside a while body
# (lax.scan), nothing between start and done and marked to run synchronously; operands with shapes.
WHILE_HLO = """\
HloModule m, is_scheduled=true

%body (carry: (s32[], f32[8])) -> (s32[], f32[8]) {
  %carry = (s32[], f32[8]{0}) parameter(0)
  %gte.0 = f32[8]{0} get-tuple-element((s32[], f32[8]{0}) %carry), index=1
  %reduce-scatter-start.5 = ((f32[8]{0}), f32[1]{0}) reduce-scatter-start(f32[8]{0} %gte.0), \
channel_id=4, dimensions={0}, to_apply=%add, backend_config={"collective_backend_config":{"is_sync":true}}
  %reduce-scatter-update.5 = ((f32[8]{0}), f32[1]{0}) reduce-scatter-update(%reduce-scatter-start.5)
  %reduce-scatter-done.5 = f32[1]{0} reduce-scatter-done(%reduce-scatter-update.5)
  %collective-permute-start = (f32[8]{0}, f32[8]{0}) collective-permute-start(%gte.0), \
source_target_pairs={{0,1}}
  %custom-call.2 = f32[8]{0} custom-call(%gte.0), custom_call_target="__cublas$gemm"
  ROOT %tuple = (s32[], f32[8]{0}) tuple(%gte.0, %custom-call.2)
}

ENTRY %main (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  ROOT %while = (s32[], f32[8]{0}) while(%p), condition=%cond, body=%body
}
"""


def test_parse_gpu_schedule():
    report = overlap_report.parse_schedule(GPU_HLO)
    assert report.entry == "main.42_spmd"
    pairs = {p.kind: p for p in report.pairs}
    assert sorted(pairs) == ["all-gather", "reduce-scatter"]
    assert (pairs["all-gather"].name, pairs["all-gather"].compute_between) == ("all-gather-start", 2)
    assert (pairs["reduce-scatter"].name, pairs["reduce-scatter"].compute_between) == ("async-start", 1)
    assert not any(p.marked_sync for p in report.pairs)
    assert report.sync_collectives == {"all-reduce": 1}
    assert report.unmatched == 0
    s = report.summary()
    assert (s["async_pairs"], s["overlapped_pairs"], s["sync_collectives"]) == (2, 2, 1)
    assert s["by_kind"]["all-gather"]["max_ops_between"] == 2
    assert s["by_kind"]["all-reduce"] == {
        "async_pairs": 0,
        "overlapped": 0,
        "median_ops_between": 0,
        "max_ops_between": 0,
        "marked_sync": 0,
        "sync_collectives": 1,
    }
    assert "| all-gather | 1 | 1 | 2 | 2 | 0 | 0 |" in report.table()
    excerpt = report.excerpts()
    assert "all-gather `all-gather-start` in `main.42_spmd`" in excerpt
    assert "fusion.2" in excerpt and "async-done" in excerpt


def test_parse_sugared_async_in_while_body():
    report = overlap_report.parse_schedule(WHILE_HLO)
    [pair] = report.pairs
    assert (pair.kind, pair.computation, pair.compute_between, pair.marked_sync) == (
        "reduce-scatter",
        "body",
        0,
        True,
    )
    assert (pair.start, pair.done) == (2, 4)
    assert report.unmatched == 1  # the collective-permute-start has no done
    assert not report.sync_collectives


def test_abstract_state_matches_init_state(tiny_cfg):
    cfg = apply_overrides(tiny_cfg, ["model.num_layers=3"])  # layer padding on 8 devices
    mesh = sharding.make_mesh(cfg.mesh)
    real = train.init_state(cfg, jax.random.key(0), mesh)
    abstract = overlap_report.abstract_state(cfg, mesh)
    assert jax.tree.structure(real) == jax.tree.structure(abstract)
    for r, a in zip(jax.tree.leaves(real), jax.tree.leaves(abstract), strict=True):
        assert (r.shape, r.dtype) == (a.shape, a.dtype)
        assert r.sharding.spec == a.sharding.spec and r.sharding.mesh == a.sharding.mesh
        assert r.sharding.is_equivalent_to(a.sharding, r.ndim)
    assert any(a.sharding.spec == jax.P("dp") for a in jax.tree.leaves(abstract.opt_state))


def test_cpu_run_finds_sync_collectives(tmp_path, capsys):
    """CPU XLA emits synchronous collectives only: found, counted, and no async pairs."""
    out, plot, summary = tmp_path / "hlo.txt", tmp_path / "schedule.png", tmp_path / "overlap.json"
    result = overlap_report.main(["--small", "--out", str(out), "--plot", str(plot), "--json", str(summary)])
    assert result["devices"] == 8 and result["device_kind"] == "cpu"
    assert result["async_pairs"] == 0 and result["unmatched"] == 0
    for kind in ("all-gather", "reduce-scatter", "all-reduce"):
        assert result["by_kind"][kind]["sync_collectives"] > 0, kind
    hlo = out.read_text()
    for kind in ("all-gather", "reduce-scatter", "all-reduce"):  # every one in the text, none twice
        assert result["by_kind"][kind]["sync_collectives"] == hlo.count(f" {kind}("), kind
    assert "is_scheduled=true" in hlo
    assert plot.stat().st_size > 0
    assert json.loads(summary.read_text())["sync_collectives"] == result["sync_collectives"]
    printed = capsys.readouterr().out
    assert "| reduce-scatter | 0 | 0 | 0 | 0 | 0 |" in printed
    np.testing.assert_equal(result["batch_shape"], [1, 16, 128])
