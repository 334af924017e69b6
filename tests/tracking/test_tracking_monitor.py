"""Monitor behaviour: failures, actions, update hooks, resuming, bad input, crash safety, end to end."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from diagnostics.errors import ConfigError, DataError, LossError, SchemaVersionError, StopTraining, StoreError
from diagnostics.metrics import Diagnostic, Output
from diagnostics.store import open_run
from diagnostics.store.records import Event, Record
from diagnostics.tracking import Monitor


def make(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, list[Any]]:
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    batches = [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(4)]
    return model, torch.optim.SGD(model.parameters(), lr=0.1), batches


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def loop(mon: Monitor | None, model: nn.Module, opt: Any, batches: list[Any], start: int = 0) -> None:
    for i, batch in enumerate(batches):
        loss = loss_fn(model, batch)
        loss.backward()
        if mon is not None:
            mon.step(start + i, batch, loss)
        if opt is not None:
            opt.step()
            opt.zero_grad()
        else:
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
                    p.grad = None


class Boom(Diagnostic):
    name = "boom"
    metrics: ClassVar[tuple[str, ...]] = ("boom",)

    def compute(self, ctx: Any) -> list[Record]:
        raise RuntimeError("kaboom")


class NaNMaker(Diagnostic):
    name = "nan_maker"

    def compute(self, ctx: Any) -> list[Record]:
        return [Record("nan_maker", float("nan"))]


class Alarm(Diagnostic):
    """Warns at every step; counts its calls and remembers the last step in its declared state."""

    name = "alarm"

    @property
    def calls(self) -> int:
        return self.state.get("calls", 0)

    def compute(self, ctx: Any) -> Output:
        self.state["calls"] = self.calls + 1
        self.state["last"] = ctx.step
        return Output(
            records=[Record("alarm_value", float(ctx.step))],
            events=[Event("explosion_warning", f"alarm at {ctx.step}", severity="warning")],
        )


def test_failing_diagnostic_is_recorded_not_raised(tmp_path: Path) -> None:
    model, opt, batches = make()
    with Monitor(model, loss_fn, run=tmp_path / "r", diagnostics=[Boom(), NaNMaker(), "loss"], optimizer=opt) as mon:
        loop(mon, model, opt, batches)
    run = open_run(tmp_path / "r")
    st = run.status()
    assert set(st[st.diagnostic == "boom"].status) == {"failed"}
    assert "kaboom" in st[st.diagnostic == "boom"].reason.iloc[0]
    assert set(st[st.diagnostic == "nan_maker"].status) == {"failed"}
    ev = run.events()
    assert (ev.kind == "estimator_failed").sum() == 2 * len(batches)
    assert "nan_maker" not in set(run.series().metric)
    assert len(run.series(metric="loss")) == len(batches)


def test_strict_mode_raises(tmp_path: Path) -> None:
    model, opt, batches = make()
    with Monitor(model, loss_fn, run=tmp_path / "r", diagnostics=[Boom()], optimizer=opt, strict=True) as mon:
        with pytest.raises(RuntimeError, match="kaboom"):
            loop(mon, model, opt, batches)


def test_stop_action_raises_after_commit(tmp_path: Path) -> None:
    model, opt, batches = make()
    mon = Monitor(model, loss_fn, run=tmp_path / "r", diagnostics=[Alarm(), "loss"], optimizer=opt, actions={"alarm": "stop"})
    with pytest.raises(StopTraining) as info:
        loop(mon, model, opt, batches)
    assert info.value.event.kind == "explosion_warning"
    # committed before the raise: readable while the monitor is still open
    run = open_run(tmp_path / "r")
    assert run.steps() == [0]
    assert set(run.series().metric) >= {"alarm_value", "loss"}
    mon.close()


def test_warn_callable_and_checkpoint_actions(tmp_path: Path) -> None:
    model, opt, batches = make()
    seen: list[tuple[str, int]] = []
    diags = [Alarm()]
    with pytest.warns(RuntimeWarning, match="alarm at 0"):
        with Monitor(model, loss_fn, run=tmp_path / "a", diagnostics=diags, optimizer=opt, actions="warn") as mon:
            loop(mon, model, opt, batches[:1])
    with Monitor(model, loss_fn, run=tmp_path / "b", diagnostics=[Alarm()], optimizer=opt,
                 actions=lambda e, s: seen.append((e.kind, s))) as mon:
        loop(mon, model, opt, batches[:2])
    assert seen == [("explosion_warning", 0), ("explosion_warning", 1)]
    from diagnostics.metrics import get_diagnostic

    alarm = Alarm()
    alarm.action = "checkpoint"
    with Monitor(model, loss_fn, run=tmp_path / "c", diagnostics=[alarm, get_diagnostic("loss", action="stop")], optimizer=opt) as mon:
        loop(mon, model, opt, batches[:1])
    assert (tmp_path / "c" / "checkpoints" / "step_0.pt").is_file()
    with pytest.raises(ConfigError, match="action"):
        Monitor(model, loss_fn, run=tmp_path / "d", diagnostics=["loss"], actions="explode")


def test_update_hook_only_on_due_steps_and_removed(tmp_path: Path) -> None:
    model, opt, batches = make()
    from diagnostics.metrics import get_diagnostic

    with Monitor(model, loss_fn, run=tmp_path / "r", diagnostics=[get_diagnostic("update_ratio", every=2)], optimizer=opt) as mon:
        for i, batch in enumerate(batches):
            loss_fn(model, batch).backward()
            mon.step(i, batch)
            assert len(opt._optimizer_step_post_hooks) == (1 if i % 2 == 0 else 0)
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
            assert not opt._optimizer_step_post_hooks
            expected = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
            expected /= torch.sqrt(sum((b**2).sum() for b in before))
            opt.zero_grad()
            if i % 2 == 0:
                mon._wait_writes()
                got = open_run(tmp_path / "r").series(metric="update_ratio", key="all")
                assert got.value.iloc[-1] == pytest.approx(float(expected), rel=1e-6)
    assert open_run(tmp_path / "r").steps() == [0, 2]


def test_update_without_optimizer_is_taken_at_next_step(tmp_path: Path) -> None:
    model, _, batches = make()
    with Monitor(model, loss_fn, run=tmp_path / "r", diagnostics=["update_ratio", "grad_norm"]) as mon:
        loop(mon, model, None, batches)
    s = open_run(tmp_path / "r").series(metric="update_ratio", key="all")
    assert len(s) == len(batches) and (s.value > 0).all()


def test_resume_restores_state_and_refuses_other_model(tmp_path: Path) -> None:
    model, opt, batches = make()
    alarm = Alarm()
    with Monitor(model, loss_fn, run=tmp_path / "r", diagnostics=[alarm], optimizer=opt) as mon:
        loop(mon, model, opt, batches[:2])
    resumed = Alarm()
    with Monitor(model, loss_fn, run=tmp_path / "r", diagnostics=[resumed], optimizer=opt) as mon:
        assert resumed.calls == 2 and resumed.state["last"] == 1
        loop(mon, model, opt, batches[2:], start=2)
    assert open_run(tmp_path / "r").steps() == [0, 1, 2, 3]
    other = nn.Linear(3, 3)
    with pytest.raises(StoreError, match="belongs to another model"):
        Monitor(other, loss_fn, run=tmp_path / "r", diagnostics=["loss"])


def test_resume_reads_state_saved_in_the_attrs_ctx_layout(tmp_path: Path) -> None:
    from diagnostics.store import RunWriter

    model, opt, batches = make()
    with Monitor(model, loss_fn, run=tmp_path / "r", diagnostics=[Alarm()], optimizer=opt) as mon:
        loop(mon, model, opt, batches[:2])
    with RunWriter(tmp_path / "r", resume=True) as writer:  # as runs saved before state lived on diagnostics
        writer.set_meta("diagnostic_state", {"alarm": {"attrs": {"calls": 2}, "ctx": {"last": 1}}})
    resumed = Alarm()
    with Monitor(model, loss_fn, run=tmp_path / "r", diagnostics=[resumed], optimizer=opt) as mon:
        assert resumed.calls == 2 and resumed.state["last"] == 1
        loop(mon, model, opt, batches[2:3], start=2)
    assert open_run(tmp_path / "r").meta["diagnostic_state"]["alarm"] == {"calls": 3, "last": 2}


def test_per_sample_gradients_computed_once_per_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import diagnostics.gradients as grads

    calls = []

    def fake(model: Any, loss_fn: Any, batch: Any, params: Any = None, max_memory_bytes: Any = None,
             mode: str = "eval") -> dict:
        calls.append(1)
        return {n: torch.zeros(8, *p.shape) for n, p in model.named_parameters()}

    monkeypatch.setattr(grads, "per_sample_gradients", fake, raising=False)

    class UsesPS(Diagnostic):
        requires = frozenset({"per_sample_grads"})

        def compute(self, ctx: Any) -> list[Record]:
            ps = ctx.per_sample_grads()
            return [Record(self.name, float(len(ps)))]

    a, b, c = (type(f"PS{i}", (UsesPS,), {"name": f"ps_{i}"})() for i in range(3))
    model, opt, batches = make()
    with Monitor(model, loss_fn, run=tmp_path / "r", diagnostics=[a, b, c], optimizer=opt) as mon:
        loop(mon, model, opt, batches[:2])
    assert len(calls) == 2


# --- bad input: each a clear error, nothing written half-way ----------------------------------------
def test_loss_not_scalar(tmp_path: Path) -> None:
    model, opt, batches = make()
    with Monitor(model, loss_fn, run=tmp_path / "r", diagnostics="cheap", optimizer=opt) as mon:
        x, y = batches[0]
        per_sample = nn.functional.cross_entropy(model(x), y, reduction="none")
        per_sample.mean().backward()
        with pytest.raises(LossError, match="scalar"):
            mon.step(0, batches[0], per_sample)
    assert open_run(tmp_path / "r").steps() == []


def test_batch_the_loss_cannot_consume(tmp_path: Path) -> None:
    model, opt, batches = make()
    with Monitor(model, loss_fn, run=tmp_path / "r", diagnostics="cheap", optimizer=opt) as mon:
        loss_fn(model, batches[0]).backward()
        with pytest.raises(DataError, match="cannot consume"):
            mon.step(0, (torch.randn(8, 5), batches[0][1]))
    assert open_run(tmp_path / "r").steps() == []
    with pytest.raises(DataError, match="probe_data"):
        Monitor(model, loss_fn, run=tmp_path / "p", probe_data=[(torch.randn(2, 9), torch.zeros(2).long())])
    assert not (tmp_path / "p").exists()


def test_unknown_diagnostic_lists_valid_names(tmp_path: Path) -> None:
    model, _, _ = make()
    with pytest.raises(ConfigError, match="valid names: .*grad_norm.*weight_norm"):
        Monitor(model, run=tmp_path / "r", diagnostics=["loss", "hessian_sparkle"])
    assert not (tmp_path / "r").exists()


def test_unwritable_run_dir(tmp_path: Path) -> None:
    model, _, _ = make()
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="run dir"):
        Monitor(model, run=blocker / "run", diagnostics="cheap")


def test_newer_schema_version_refused(tmp_path: Path) -> None:
    model, opt, batches = make()
    with Monitor(model, loss_fn, run=tmp_path / "r", diagnostics="cheap", optimizer=opt) as mon:
        loop(mon, model, opt, batches[:1])
    db = tmp_path / "r" / "run.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    size = db.stat().st_size
    with pytest.raises(SchemaVersionError):
        Monitor(model, loss_fn, run=tmp_path / "r", diagnostics="cheap")
    assert db.stat().st_size == size


def test_every_override_and_bad_every(tmp_path: Path) -> None:
    model, opt, batches = make()
    with Monitor(model, loss_fn, run=tmp_path / "r", diagnostics="cheap", optimizer=opt, every={"loss": 2}) as mon:
        loop(mon, model, opt, batches)
    assert list(open_run(tmp_path / "r").series(metric="loss").step) == [0, 2]
    with pytest.raises(ConfigError, match="names no selected diagnostic"):
        Monitor(model, run=tmp_path / "x", diagnostics="cheap", every={"gsnr": 2})


# --- crash safety -------------------------------------------------------------------------------
CHILD = textwrap.dedent(
    """
    import sys, time, torch
    from torch import nn
    from diagnostics.tracking import Monitor
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, run=sys.argv[1], diagnostics="cheap", optimizer=opt)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    for step in range(100000):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        mon.step(step, (x, y), loss)
        opt.step()
        opt.zero_grad()
        time.sleep(0.01)
    """
)


def test_sigkill_mid_run_keeps_every_step_before_the_last(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(run_dir)], env=env)
    try:
        deadline = time.time() + 180  # a loaded machine can take long to import torch
        while time.time() < deadline:
            try:
                if len(open_run(run_dir).steps()) >= 5:
                    break
            except StoreError:
                pass
            time.sleep(0.05)
        else:
            pytest.fail("child never wrote 5 steps")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    run = open_run(run_dir)
    steps = run.steps()
    assert steps == list(range(len(steps))) and len(steps) >= 5
    series = run.series(metric="loss")
    assert list(series.step) == steps[: len(series)] and len(series) >= len(steps) - 1
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, loss_fn, run=run_dir, diagnostics="cheap", optimizer=opt) as mon:
        assert mon.resumed
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        loss = loss_fn(model, (x, y))
        loss.backward()
        mon.step(steps[-1] + 1, (x, y), loss)
        opt.step()
    assert open_run(run_dir).steps()[-1] == steps[-1] + 1


# --- end to end -------------------------------------------------------------------------------------
def test_plain_pytorch_loop_end_to_end(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 10, generator=gen), torch.randint(0, 4, (32,), generator=gen)) for _ in range(6)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with Monitor(model, run=tmp_path / "run", diagnostics="standard", optimizer=opt, every={"gsnr": 3, "weight_rank": 3,
                     "grad_rank": 3, "activation_rank": 3}, num_classes=4, meta={"lr": 1e-2}) as monitor:
            for step, (x, y) in enumerate(data):
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                monitor.step(step, (x, y), loss)
                opt.step()
    run = open_run(tmp_path / "run")
    metrics = set(run.series().metric)
    assert {"loss", "learning_rate", "grad_norm", "weight_norm", "update_ratio", "nonfinite_grads"} <= metrics
    assert {"weight_effective_rank", "grad_stable_rank", "activation_effective_rank"} <= metrics
    st = run.status()
    failed = st[st.status == "failed"]
    assert failed.empty or set(failed.diagnostic) <= {"gsnr"}, failed[["diagnostic", "reason"]]
    meta = run.meta
    assert meta["config"] == {"lr": 1e-2}
    assert meta["model_summary"]["num_params"] == sum(p.numel() for p in model.parameters())
    assert meta["loss_reduction"] == "mean" and "model_fingerprint" in meta and "torch" in meta["versions"]
    assert set(meta["diagnostics"]) >= {"loss", "gsnr", "activation_rank"}


def test_parameter_list_follows_changes_and_update_stays_exact(tmp_path: Path) -> None:
    model, opt, batches = make()
    with Monitor(model, loss_fn, run=tmp_path / "r", diagnostics=["update_ratio"], optimizer=opt) as mon:
        loop(mon, model, opt, batches[:3])
        names = [n for n, _ in mon._named_parameters()]
        assert names == [n for n, p in model.named_parameters() if p.requires_grad]
        model[0].bias.requires_grad_(False)
        assert "0.bias" not in dict(mon._named_parameters())
        model[0].bias.requires_grad_(True)
        model[0] = nn.Linear(model[0].in_features, model[0].out_features)  # a replaced module is noticed
        opt.add_param_group({"params": list(model[0].parameters())})
        assert dict(mon._named_parameters())["0.weight"] is model[0].weight
        loop(mon, model, opt, batches[3:4], start=3)
    s = open_run(tmp_path / "r").series(metric="update_ratio", key="all")
    assert len(s) == 4 and (s.value > 0).all()


class UpdateMode(Diagnostic):
    """Records whether its update phase ran in inference mode or without grad."""

    name = "update_mode"
    requires = frozenset({"update"})

    def compute(self, ctx: Any) -> list[Record]:
        return []

    def compute_after_update(self, ctx: Any) -> list[Record]:
        inference = torch.is_inference_mode_enabled() or not torch.is_grad_enabled()
        return [Record("update_norm_seen", float(sum(float(u.norm()) for u in ctx.update().values()))),
                Record("update_in_inference", float(inference))]


def test_close_from_inference_mode_computes_the_pending_update(tmp_path: Path) -> None:
    model, opt, batches = make()
    mon = Monitor(model, loss_fn, run=tmp_path / "r", diagnostics=[UpdateMode()])
    loop(mon, model, opt, batches[:1])
    with torch.inference_mode():  # as frameworks close at the end of fit
        mon.close()
    assert torch.is_grad_enabled()
    s = open_run(tmp_path / "r").series().set_index("metric").value
    assert s["update_norm_seen"] > 0 and s["update_in_inference"] == 0


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_step_called_under_no_grad_or_inference_mode_measures_as_usual(context: str, tmp_path: Path) -> None:
    # Logging code is often wrapped in no_grad or inference_mode; the curvature probes differentiate anyway.
    names = ["loss", "grad_norm", "sharpness", "hessian_top", "gsnr"]

    def run(directory: Path, wrap: Any) -> Any:
        model, opt, batches = make()
        with Monitor(model, loss_fn, run=directory, diagnostics=names, optimizer=opt, every=1, budget=None,
                     strict=True) as mon:
            for step, batch in enumerate(batches[:2]):
                opt.zero_grad()
                loss = loss_fn(model, batch)
                loss.backward()
                with wrap():
                    mon.step(step, batch, loss)
                opt.step()
        stored = open_run(directory)
        return stored.status(), stored.series()

    status, series = run(tmp_path / "wrapped", getattr(torch, context))
    _, plain = run(tmp_path / "plain", contextlib.nullcontext)
    assert set(status.status) == {"ok"}, status[status.status != "ok"]
    assert set(series.metric) == set(plain.metric) and {"sharpness", "hessian_eigenvalue"} <= set(series.metric)
    cols = ["step", "metric", "key", "index"]
    got = series[series.metric != "monitor_seconds"].sort_values(cols).reset_index(drop=True)
    want = plain[plain.metric != "monitor_seconds"].sort_values(cols).reset_index(drop=True)
    assert got[cols].equals(want[cols])
    assert torch.allclose(torch.tensor(got.value.to_numpy()), torch.tensor(want.value.to_numpy()), rtol=1e-6, atol=1e-9)
