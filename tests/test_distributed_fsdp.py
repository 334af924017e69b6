"""FSDP2 (``fully_shard``) on 2 gloo ranks on CPU: the same numbers as one process, rank 0 writes.

Uses the launcher of tests/test_distributed.py. The model has an odd layer width so that FSDP's shards
are uneven (3 rows over 2 ranks). Single-process references: the norms and the Hessian of the
concatenated batch (FSDP averages gradients over the ranks, the curvature operators all-reduce their
products), the per-sample statistics of rank 0's shard.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.test_distributed import WORLD, _data, _net, _shard, launch

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):  # pragma: no cover
    pytest.skip("torch without FSDP2 (fully_shard)", allow_module_level=True)

STEPS = 3


def _diagnostics() -> list:
    from diagnostics.metrics import get_diagnostic

    return ["cheap", get_diagnostic("gsnr", every=1), get_diagnostic("spectral_alignment", init_iters=50, init_tol=0.0),
            get_diagnostic("hessian_top", k=2, every=2, tol=1e-10, max_matvecs=None)]


def _train(model: nn.Module, batches, run: Path) -> None:  # noqa: ANN001
    from diagnostics import Monitor
    from diagnostics.metrics import resolve_diagnostics

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    diags = resolve_diagnostics(["cheap"]) + _diagnostics()[1:]
    with Monitor(model, run=run, diagnostics=diags, optimizer=opt, strict=True) as mon:
        for step, (x, y) in enumerate(batches):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            mon.step(step, (x, y), loss)
            opt.step()


def _sharded() -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _net()
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    return model


def _fsdp_worker(rank: int, out: Path) -> None:
    from diagnostics import Monitor
    from diagnostics.errors import ConfigError

    result: dict = {}
    model = _sharded()
    result["sharded"] = [type(p).__name__ for p in model.parameters()]
    # Spectral alignment alone: its forward through the sharded model, weights gathered layer by layer.
    x, y = _shard(_data()[0], rank)
    with Monitor(model, run=out / "sa", diagnostics=[_diagnostics()[2]], strict=True) as mon:
        assert not mon.observe_training_forward
        nn.functional.cross_entropy(model(x), y).backward()
        mon.step(0, (x, y), None)
    model.zero_grad()
    _train(model, [_shard(b, rank) for b in _data(STEPS)], out / "run")
    try:
        Monitor(model, run=out / "refused", diagnostics=["grad_norm", "adam_state", "weight_rank"])
        result["refused"] = None
    except ConfigError as exc:
        result["refused"] = str(exc)
    (out / f"fsdp{rank}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def fsdp_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    launch(_fsdp_worker, out, deadline=100)
    return out


def _series(run: Path, metrics=None):  # noqa: ANN001, ANN202
    from diagnostics.store import open_run

    s = open_run(run).series()
    s = s[s.metric != "monitor_seconds"]
    if metrics is not None:
        s = s[s.metric.isin(metrics)]
    return s.set_index(["step", "metric", "key", "index"]).value.sort_index()


@pytest.mark.timeout(150)
def test_fsdp2_matches_one_process(fsdp_out: Path, tmp_path: Path) -> None:
    r0 = json.loads((fsdp_out / "fsdp0.json").read_text())
    assert set(r0["sharded"]) == {"DTensor"}
    # Written once, by rank 0.
    assert (fsdp_out / "run").is_dir() and not list(fsdp_out.glob("run-rank*"))
    from diagnostics.store import open_run

    status = open_run(fsdp_out / "run").status()
    assert set(status.status) == {"ok"}, status[status.status != "ok"]
    got = _series(fsdp_out / "run")

    # Global quantities: one process on the concatenated batches (same SGD trajectory).
    _train(_net(), _data(STEPS), tmp_path / "global")
    want = _series(tmp_path / "global")
    global_metrics = ["grad_norm", "weight_norm", "update_ratio", "nonfinite_grads", "learning_rate",
                      "hessian_eigenvalue"]
    g, w = got[got.index.get_level_values("metric").isin(global_metrics)], want[want.index.get_level_values("metric").isin(global_metrics)]
    assert list(g.index) == list(w.index)
    bad = ((g - w).abs() > 1e-6 * w.abs() + 1e-12)
    assert not bad.any(), (g[bad], w[bad])
    assert len(g[g.index.get_level_values("metric") == "hessian_eigenvalue"]) == 4  # steps 0 and 2, k = 2

    # Per-rank quantities (loss, GSNR, spectral alignment) are rank 0's batch, at the global trajectory's
    # weights: one process trained on the whole batch but measuring rank 0's shard at each step.
    local_metrics = ["loss", "gsnr_mean", "gsnr_median", "sa_sigma1", "sa_mean", "sa_positive_fraction"]
    _train_measuring_shard(tmp_path / "local")
    lw = _series(tmp_path / "local", local_metrics)
    lg = got[got.index.get_level_values("metric").isin(local_metrics)]
    assert list(lg.index) == list(lw.index)
    bad = (lg - lw).abs() > 1e-6 * lw.abs() + 1e-9
    assert not bad.any(), (lg[bad], lw[bad])


def _train_measuring_shard(run: Path) -> None:
    from diagnostics import Monitor

    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    diags = _diagnostics()[1:3] + ["loss"]
    # Under FSDP the training forward is not observed: spectral alignment runs its own forward.
    with Monitor(model, run=run, diagnostics=diags, optimizer=opt, strict=True, observe_training_forward=False) as mon:
        for step, (x, y) in enumerate(_data(STEPS)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()  # the global batch's step
            xs, ys = _shard((x, y), 0)
            with torch.no_grad():
                loss = nn.functional.cross_entropy(model(xs), ys)
            mon.step(step, (xs, ys), loss)  # measured on rank 0's shard
            opt.step()


def test_fsdp2_spectral_alignment_without_replica(fsdp_out: Path, tmp_path: Path) -> None:
    from diagnostics import Monitor

    x, y = _shard(_data()[0], 0)
    with Monitor(_net(), run=tmp_path / "sa", diagnostics=[_diagnostics()[2]], observe_training_forward=False) as mon:
        mon.step(0, (x, y), None)
    got, want = _series(fsdp_out / "sa"), _series(tmp_path / "sa")
    assert list(got.index) == list(want.index) and "sa_sigma1" in set(got.index.get_level_values("metric"))
    assert torch.allclose(torch.tensor(got.to_numpy()), torch.tensor(want.to_numpy()), rtol=1e-6, atol=1e-9)


def test_fsdp2_refuses_unsupported_diagnostics_in_one_line(fsdp_out: Path) -> None:
    for r in range(WORLD):
        reason = json.loads((fsdp_out / f"fsdp{r}.json").read_text())["refused"]
        assert reason is not None and "\n" not in reason
        assert reason.startswith("adam_state, weight_rank cannot run on an FSDP2 (fully_shard) model")


def _raises_worker(rank: int, out: Path) -> None:
    from diagnostics import Monitor
    from diagnostics.metrics import get_diagnostic
    from diagnostics.metrics.base import Diagnostic

    class Boom(Diagnostic):
        name = "gsnr"  # runs where gsnr would, on the gathered replica
        requires = frozenset({"per_sample_grads"})

        def compute(self, ctx):  # noqa: ANN001, ANN202
            if rank == 1:
                raise ValueError("boom on rank 1")
            return []

    model = _sharded()
    x, y = _shard(_data()[0], rank)
    diags = ["grad_norm", Boom(), get_diagnostic("hessian_top", k=2, every=1)]
    with Monitor(model, run=out / "run", diagnostics=diags, strict=True) as mon:
        for step in range(2):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            mon.step(step, (x, y), loss)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_fsdp2_exception_on_one_rank_ends_both(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="boom on rank 1|failed on another rank"):
        launch(_raises_worker, tmp_path, deadline=90)
