"""Lightning callback: the same series as a plain loop, and a stop action ends the fit cleanly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning.pytorch")

from diagnostics import Monitor  # noqa: E402
from diagnostics.metrics import get_diagnostic  # noqa: E402
from diagnostics.metrics.base import Diagnostic, Output  # noqa: E402
from diagnostics.store import open_run  # noqa: E402
from diagnostics.store.records import Event  # noqa: E402
from diagnostics.tracking.integrations.lightning import DiagnosticsCallback  # noqa: E402

STEPS = 5


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    ds = torch.utils.data.TensorDataset(torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False)


def _diagnostics() -> list:
    return ["loss", "learning_rate", "grad_norm", "weight_norm", "update_ratio", get_diagnostic("gsnr", every=2)]


def _trainer(tmp_path: Path, callback: DiagnosticsCallback, max_steps: int = STEPS) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     default_root_dir=str(tmp_path), callbacks=[callback])


def _series(run: Path):  # noqa: ANN202
    s = open_run(run).series()
    return s[s.metric != "monitor_seconds"].set_index(["step", "metric", "key", "index"]).value.sort_index()


def test_lightning_series_equal_plain_loop(tmp_path: Path) -> None:
    cb = DiagnosticsCallback(run=tmp_path / "lightning", diagnostics=_diagnostics())
    _trainer(tmp_path, cb).fit(Tiny(), _loader())

    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, run=tmp_path / "plain", diagnostics=_diagnostics(), optimizer=opt) as mon:
        for step, batch in enumerate(_loader()):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
            loss.backward()
            mon.step(step, batch, loss)
            opt.step()

    got, want = _series(tmp_path / "lightning"), _series(tmp_path / "plain")
    assert list(got.index) == list(want.index)
    assert {"gsnr_mean", "update_ratio", "grad_norm"} <= set(got.index.get_level_values("metric"))
    assert torch.allclose(torch.tensor(got.to_numpy()), torch.tensor(want.to_numpy()), rtol=1e-5, atol=1e-7)
    meta = open_run(tmp_path / "lightning").meta
    assert meta["gradients_seen"].startswith("unscaled, unclipped")
    assert meta["integration"]["framework"] == "lightning"


def test_lightning_accumulation_feeds_the_micro_batch_gsnr(tmp_path: Path) -> None:
    from diagnostics.gradients import microbatch_gsnr

    diags = [get_diagnostic("gsnr_microbatch", every=1), "loss"]
    cb = DiagnosticsCallback(run=tmp_path / "lightning", diagnostics=diags)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=str(tmp_path), callbacks=[cb], accumulate_grad_batches=5)
    trainer.fit(Tiny(), _loader())
    # The same step by hand: the gradient of each of the 5 batches at the initial weights.
    model = Tiny()
    grads = []
    for x, y in _loader():
        gs = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
        grads.append({n: g for (n, _), g in zip(model.named_parameters(), gs)})
    want = {n: float(v.mean()) for n, v in microbatch_gsnr(grads).items()}
    got = open_run(tmp_path / "lightning").series("gsnr_microbatch_mean")
    assert list(got.step) == [0] * 5 and len(got) == 5
    for row in got.itertuples():
        if row.key != "all":
            assert abs(row.value - want[row.key]) <= 1e-4 * max(1.0, abs(want[row.key])), (row.key, row.value)


class AlarmAt(Diagnostic):
    name = "alarm_at"
    reads_only = True

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def compute(self, ctx):  # noqa: ANN001, ANN202
        if ctx.step == self.at:
            return Output(events=[Event("loss_explosion", f"alarm at {ctx.step}", severity="warning")])
        return []


def test_stop_action_stops_lightning_cleanly(tmp_path: Path) -> None:
    cb = DiagnosticsCallback(run=tmp_path / "run", diagnostics=["loss", AlarmAt(2)], actions="stop")
    trainer = _trainer(tmp_path, cb, max_steps=50)
    trainer.fit(Tiny(), _loader())
    assert cb.stop_reason is not None and "alarm at 2" in str(cb.stop_reason)
    assert trainer.global_step == 3  # step 2's update completes, then the loop ends
    assert trainer.state.finished and not trainer.interrupted
    run = open_run(tmp_path / "run")
    assert [int(s) for s in run.steps()] == [0, 1, 2]
    assert "loss_explosion" in set(run.events().kind)


def test_missing_lightning_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from diagnostics.tracking.integrations import MissingDependency, require

    with pytest.raises(MissingDependency, match="pip install lightning"):
        require("no_such_lightning_module", install="lightning")
    with pytest.raises(ImportError):
        require("no_such_lightning_module", install="lightning")


class TinyValidated(Tiny):
    """:class:`Tiny` with a validation step on other data (Lightning runs it in eval and inference mode)."""

    def validation_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        return nn.functional.cross_entropy(self(x * 10 + 3), y)


def _validated_series(tmp_path: Path, name: str, validate: bool):  # noqa: ANN202
    diags = [get_diagnostic("spectral_alignment"), get_diagnostic("output_logits", every=1)]
    cb = DiagnosticsCallback(run=tmp_path / name, diagnostics=diags, strict=True)
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=str(tmp_path / name), callbacks=[cb],
                        val_check_interval=1 if validate else None, limit_val_batches=1 if validate else 0)
    trainer.fit(TinyValidated() if validate else Tiny(), _loader(), _loader() if validate else None)
    return _series(tmp_path / name)


def test_lightning_validation_is_not_measured_as_the_training_forward(tmp_path: Path) -> None:
    plain = _validated_series(tmp_path, "plain", validate=False)
    validated = _validated_series(tmp_path, "validated", validate=True)
    assert {"sa_mean", "output_logit_max"} <= set(plain.index.get_level_values("metric"))
    assert plain.equals(validated)
