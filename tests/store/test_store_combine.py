"""combine_runs: per-rank and per-job stores merged into one run."""

from __future__ import annotations

import pytest

from diagnostics.errors import StoreError
from diagnostics.store import Event, Record, RunWriter, Status, combine_runs, open_run


def _rank(path, rank, lr=0.1):
    with RunWriter(path, name=f"rank{rank}", meta={"config": {"lr": lr}, "world_size": 2, "rank": rank}) as w:
        for step in range(2):
            w.write_step(step, [Record("grad_norm", 10.0 * rank + step)], [Event("nonfinite", f"r{rank}")],
                         [Status("basics", seconds=0.5)])  # fmt: skip
    return path


def test_per_rank_rows_stay_apart_and_meta_conflicts_are_recorded(tmp_path):
    a, b = _rank(tmp_path / "r0", 0), _rank(tmp_path / "r1", 1, lr=0.2)
    run = combine_runs([a, b], tmp_path / "all", name="combined")
    assert run.name == "combined"
    s = run.series("grad_norm")
    assert sorted(zip(s.source, s.step, s.value)) == [
        ("rank0", 0, 0.0),
        ("rank0", 1, 1.0),
        ("rank1", 0, 10.0),
        ("rank1", 1, 11.0),
    ]
    assert len(run.events()) == 4 and len(run.status()) == 4
    meta = run.meta
    assert meta["world_size"] == 2 and meta["config"] == {"lr": 0.1}  # first input wins
    assert meta["combine_conflicts"] == {"config": {"rank0": {"lr": 0.1}, "rank1": {"lr": 0.2}},
                                         "rank": {"rank0": 0, "rank1": 1}}  # fmt: skip
    assert [r["name"] for r in meta["combined_from"]] == ["rank0", "rank1"]
    assert meta["combine_duplicates"] == {"series": 0, "events": 0, "status": 0, "sources": 0, "vectors": 0}


def test_per_job_checkpoint_runs_keep_sources_and_drop_duplicates(tmp_path):
    with RunWriter(tmp_path / "job1") as w:
        for step in (100, 200):
            w.write_step(step, [Record("sharpness", step / 10)], source=f"ckpt/{step}.pt")
    with RunWriter(tmp_path / "job2") as w:
        for step in (200, 300):  # 200 analysed twice: a duplicate
            w.write_step(step, [Record("sharpness", step / 10 + 1)], source=f"ckpt/{step}.pt")
    run = combine_runs([tmp_path / "job1", tmp_path / "job2"], tmp_path / "all")
    s = run.series()
    assert s[["step", "value", "source"]].values.tolist() == [
        [100, 10.0, "ckpt/100.pt"],
        [200, 20.0, "ckpt/200.pt"],
        [300, 31.0, "ckpt/300.pt"],
    ]
    assert run.meta["combine_duplicates"]["series"] == 1
    with RunWriter(tmp_path / "all") as w:  # an analysis can resume into the merged run
        assert w.completed_sources() == {"ckpt/100.pt", "ckpt/200.pt", "ckpt/300.pt"}


def test_combine_errors(tmp_path):
    a = _rank(tmp_path / "r0", 0)
    _rank(tmp_path / "r1", 1)
    combine_runs([a], tmp_path / "out")
    with pytest.raises(StoreError, match="already holds a run"):
        combine_runs([a], tmp_path / "out")
    assert len(combine_runs([a, tmp_path / "r1"], tmp_path / "out", overwrite=True).series()) == 4
    with pytest.raises(StoreError, match="also one of its inputs"):
        combine_runs([a], a)
    with pytest.raises(StoreError, match="no run store"):
        combine_runs([tmp_path / "missing"], tmp_path / "out2")
    assert open_run(a).steps() == [0, 1]
