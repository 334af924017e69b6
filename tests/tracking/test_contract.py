"""Contract suite run over every registered diagnostic (new registrations are covered automatically).

For each diagnostic, on a tiny CPU model with dropout active and an attention over four tokens (so that
every diagnostic has something to measure, without a misuse report): records are finite and carry the
declared metric names; they survive a store round trip; monitoring leaves training bit-identical (parameters,
optimizer state, .grad, requires_grad, modes, global RNG); no hooks are left behind; and the numbers
are the same when the diagnostic runs alone as inside the full preset.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from diagnostics.metrics import available_diagnostics, get_diagnostic, preset_names, registry
from diagnostics.store import open_run
from diagnostics.store.records import expand_records
from diagnostics.tracking import Monitor

STEPS = 3
NUM_CLASSES = 4


class TinyAttention(nn.Module):
    """Parameter-free self-attention over the 16 features read as 4 tokens of 4 (for attention_stats)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        t = h.unflatten(-1, (4, 4))
        weights = torch.softmax(t @ t.transpose(-1, -2) / 2.0, dim=-1)
        return (weights @ t).flatten(-2)


class TinyNet(nn.Module):
    """Linear 12-16 / ReLU / attention / Dropout / Linear 16-4 in float64: small, but with dropout drawing
    random numbers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.attn = TinyAttention()
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.attn(torch.relu(self.fc1(x)))))


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def make_setup() -> tuple[nn.Module, torch.optim.Optimizer, list[Any]]:
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TinyNet().double()
    batches = [
        (torch.randn(16, 12, generator=gen, dtype=torch.float64), torch.randint(0, NUM_CLASSES, (16,), generator=gen))
        for _ in range(STEPS)
    ]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, opt, batches


def train(run_dir: Any = None, diagnostics: Any = None, check: bool = False, strict: bool = True) -> dict[str, Any]:
    """Train STEPS steps, with a Monitor when ``diagnostics`` is given; return the final state."""
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    model, opt, batches = make_setup()
    model.train()
    mon = None
    if diagnostics is not None:
        # Train-mode curvature: the model trains through dropout, and strict mode raises on the misuse of
        # comparing eval-mode curvature with the stability threshold of the train-mode loss.
        mon = Monitor(
            model, loss_fn, run=run_dir, diagnostics=diagnostics, optimizer=opt, strict=strict,
            num_classes=NUM_CLASSES, check_isolation=check, curvature_mode="train",
        )
    for step, batch in enumerate(batches):
        loss = loss_fn(model, batch)
        loss.backward()
        if mon is not None:
            mon.step(step, batch, loss)
        opt.step()
        if step < STEPS - 1:  # keep the last .grad to compare it
            opt.zero_grad()
    if mon is not None:
        mon.close()
    return {
        "model": model,
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "opt_state": {k: {kk: (vv.clone() if torch.is_tensor(vv) else vv) for kk, vv in v.items()} for k, v in enumerate(opt.state.values())},
        "opt": opt,
        "torch_rng": torch.get_rng_state(),
        "np_rng": np.random.get_state()[1].copy(),
        "py_rng": random.getstate(),
    }


def every_one(name: str) -> Any:
    """The diagnostic at every step, with the options its class asks the contract suite to use.

    A class may declare ``contract_options`` (e.g. a short warm-up so that it records within STEPS steps).
    """
    return get_diagnostic(name, every=1, **dict(getattr(registry()[name], "contract_options", {}) or {}))


def with_dependencies(name: str) -> list[Any]:
    """The diagnostic plus those it reads from (its ``after`` attribute), all at every step."""
    names: list[str] = []

    def add(n: str) -> None:
        for dep in getattr(registry()[n], "after", ()) or ():
            add(dep)
        if n not in names:
            names.append(n)

    add(name)
    return [every_one(n) for n in names]


NAMES = available_diagnostics()


def _series(run_dir: Any) -> Any:
    run = open_run(run_dir)
    try:
        return run.series(), run.status(), run.events()
    finally:
        run.close()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    run_dir = tmp_path_factory.mktemp("full") / "run"
    train(run_dir, [every_one(n) for n in preset_names("full")])
    return _series(run_dir)


@pytest.mark.parametrize("name", NAMES)
def test_finite_records_with_declared_names(name: str, tmp_path: Any) -> None:
    train(tmp_path / "run", with_dependencies(name))
    series, status, _ = _series(tmp_path / "run")
    own_metrics = set(getattr(registry()[name], "metrics", ()) or ())
    if len(with_dependencies(name)) > 1:
        assert own_metrics, f"{name} runs after others: declare its metrics so its records can be told apart"
        series = series[series.metric.isin(own_metrics | {"monitor_seconds"})]
    st = status[status.diagnostic == name]
    assert len(st) == STEPS and set(st.status) <= {"ok", "not_converged"}, st[["step", "status", "reason"]]
    own = series[series.metric != "monitor_seconds"]
    assert len(own) > 0, (
        f"{name} recorded nothing in {STEPS} steps; if it needs a warm-up, declare contract_options "
        f"(constructor options for this suite) on the class; statuses: {list(st.reason)}"
    )
    assert np.isfinite(own.value.to_numpy(float)).all()
    declared = getattr(registry()[name], "metrics", None)
    if declared:
        assert set(own.metric) <= set(declared), set(own.metric) - set(declared)
    cost = series[(series.metric == "monitor_seconds") & (series.key == name)]
    assert len(cost) == STEPS and (cost.value >= 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_store_round_trip(name: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from diagnostics.store import RunWriter

    written: list[tuple[int, Any]] = []
    original = RunWriter.write_step

    def spy(self: Any, step: int, records: Any = (), events: Any = (), statuses: Any = (), source: Any = None) -> None:
        records = list(records)
        written.extend((step, r) for r in expand_records(records))  # a VectorRecord is its rows
        original(self, step, records, events, statuses, source=source)

    monkeypatch.setattr(RunWriter, "write_step", spy)
    train(tmp_path / "run", with_dependencies(name))
    series, _, _ = _series(tmp_path / "run")
    stored = {(int(r.step), r.metric, r.key, int(r.index)): float(r.value) for r in series.itertuples()}
    assert len(stored) == len(written)
    for step, rec in written:
        got = stored[(step, rec.metric, rec.key, rec.index)]
        assert got == rec.value or (math.isnan(got) and math.isnan(rec.value))


@pytest.mark.parametrize("name", NAMES)
def test_state_isolation(name: str, tmp_path: Any) -> None:
    plain = train()
    monitored = train(tmp_path / "run", with_dependencies(name))
    # check=True also verifies, around every single call, params, buffers, .grad, requires_grad, modes,
    # hooks, RNG and optimizer state.
    train(tmp_path / "checked", with_dependencies(name), check=True)
    for key in ("params", "grads"):
        for n, v in plain[key].items():
            assert torch.equal(v, monitored[key][n]), f"{key}[{n}] differs"
    assert plain["requires_grad"] == monitored["requires_grad"]
    assert plain["modes"] == monitored["modes"]
    for k, st in plain["opt_state"].items():
        for kk, vv in st.items():
            other = monitored["opt_state"][k][kk]
            assert torch.equal(vv, other) if torch.is_tensor(vv) else vv == other
    assert torch.equal(plain["torch_rng"], monitored["torch_rng"])
    assert np.array_equal(plain["np_rng"], monitored["np_rng"])
    assert plain["py_rng"] == monitored["py_rng"]


@pytest.mark.parametrize("name", NAMES)
def test_no_hooks_left_behind(name: str, tmp_path: Any) -> None:
    out = train(tmp_path / "run", with_dependencies(name))
    for mod_name, m in out["model"].named_modules():
        assert not m._forward_hooks, mod_name
        assert not m._forward_pre_hooks, mod_name
        assert not m._backward_hooks, mod_name
        assert not getattr(m, "_backward_pre_hooks", None), mod_name
    for p in out["model"].parameters():
        assert not getattr(p, "_backward_hooks", None)
    assert not out["opt"]._optimizer_step_post_hooks
    assert not out["opt"]._optimizer_step_pre_hooks


@pytest.mark.parametrize("name", NAMES)
def test_same_numbers_alone_as_in_full_preset(name: str, tmp_path: Any, full_run: Any) -> None:
    train(tmp_path / "run", with_dependencies(name))
    alone, _, _ = _series(tmp_path / "run")
    full, _, _ = full_run
    alone = alone[alone.metric != "monitor_seconds"]
    own_metrics = set(getattr(registry()[name], "metrics", ()) or ())
    if own_metrics:
        alone = alone[alone.metric.isin(own_metrics)]
    cols = ["step", "metric", "key", "index"]
    together = full[full.metric.isin(set(alone.metric))].set_index(cols).value
    alone = alone.set_index(cols).value
    assert len(alone) > 0
    assert set(alone.index) == set(together.index)
    np.testing.assert_allclose(alone.sort_index().to_numpy(float), together.sort_index().to_numpy(float), rtol=1e-12, atol=0)
