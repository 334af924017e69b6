"""Hugging Face TrainerCallback: same series as a plain loop, clipped gradients recorded, scalars in logs, stop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

from diagnostics import Monitor  # noqa: E402
from diagnostics.metrics import get_diagnostic  # noqa: E402
from diagnostics.metrics.base import Diagnostic, Output  # noqa: E402
from diagnostics.store import open_run  # noqa: E402
from diagnostics.store.records import Event  # noqa: E402
from diagnostics.tracking.integrations.huggingface import DiagnosticsCallback, hf_loss  # noqa: E402

STEPS, BATCH = 5, 8


class TinyHF(nn.Module):
    """A model the Trainer accepts: keyword inputs, returns a dict with the mean loss."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, input=None, labels=None):  # noqa: ANN001, ANN201, A002
        logits = self.net(input)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def _dataset() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(STEPS * BATCH, 6, generator=g), torch.randint(0, 3, (STEPS * BATCH,), generator=g)
    return [{"input": x[i], "labels": y[i]} for i in range(len(x))]


class SequentialTrainer(transformers.Trainer):
    def _get_train_sampler(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        return torch.utils.data.SequentialSampler(self.train_dataset)


def _diagnostics() -> list:
    return ["loss", "learning_rate", "grad_norm", "weight_norm", "update_ratio", get_diagnostic("gsnr", every=2)]


def _train(tmp_path: Path, cb: DiagnosticsCallback, max_steps: int = STEPS, max_grad_norm: float = 0.0,  # noqa: ANN202
           accumulate: int = 1):
    model = TinyHF()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=BATCH // accumulate,
        gradient_accumulation_steps=accumulate, max_steps=max_steps, learning_rate=0.1,
        lr_scheduler_type="constant", max_grad_norm=max_grad_norm, report_to="none", save_strategy="no",
        logging_steps=1, use_cpu=True, disable_tqdm=True, remove_unused_columns=False, seed=0,
        dataloader_num_workers=0,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = SequentialTrainer(model=model, args=args, train_dataset=_dataset(), optimizers=(opt, None))
    cb.attach(trainer)
    trainer.train()
    return trainer


def _series(run: Path):  # noqa: ANN202
    s = open_run(run).series()
    return s[s.metric != "monitor_seconds"].set_index(["step", "metric", "key", "index"]).value.sort_index()


def test_hf_series_equal_plain_loop(tmp_path: Path) -> None:
    cb = DiagnosticsCallback(run=tmp_path / "hf_run", diagnostics=_diagnostics())
    trainer = _train(tmp_path, cb)

    model = TinyHF()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(_dataset(), batch_size=BATCH, collate_fn=transformers.default_data_collator)
    with Monitor(model, hf_loss, run=tmp_path / "plain", diagnostics=_diagnostics(), optimizer=opt) as mon:
        for step, batch in enumerate(loader):
            opt.zero_grad()
            loss = hf_loss(model, batch)
            loss.backward()
            mon.step(step, batch, loss)
            opt.step()

    got, want = _series(tmp_path / "hf_run"), _series(tmp_path / "plain")
    assert list(got.index) == list(want.index)
    assert {"gsnr_mean", "update_ratio", "grad_norm"} <= set(got.index.get_level_values("metric"))
    assert torch.allclose(torch.tensor(got.to_numpy()), torch.tensor(want.to_numpy()), rtol=1e-5, atol=1e-7)
    assert open_run(tmp_path / "hf_run").meta["gradients_seen"] == "unclipped"
    # Scalars mirrored into the Trainer's logs.
    logged = [h for h in trainer.state.log_history if "diagnostics/grad_norm" in h]
    assert len(logged) == STEPS
    assert logged[-1]["diagnostics/grad_norm"] == pytest.approx(float(want.loc[(STEPS - 1, "grad_norm", "all", 0)]))


def test_hf_gradient_accumulation_seen_once_per_optimizer_step(tmp_path: Path) -> None:
    diags = ["loss", "grad_norm", "weight_norm", "update_ratio"]
    cb = DiagnosticsCallback(run=tmp_path / "accumulated", diagnostics=diags)
    _train(tmp_path, cb, accumulate=4)
    model = TinyHF()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(_dataset(), batch_size=BATCH, collate_fn=transformers.default_data_collator)
    with Monitor(model, hf_loss, run=tmp_path / "plain", diagnostics=diags, optimizer=opt) as mon:
        for step, batch in enumerate(loader):
            opt.zero_grad()
            loss = hf_loss(model, batch)
            loss.backward()
            mon.step(step, batch, loss)
            opt.step()
    # Four micro-batches of 2 per optimizer step: the accumulated gradient, the micro-batches' mean loss.
    got, want = _series(tmp_path / "accumulated"), _series(tmp_path / "plain")
    assert list(got.index) == list(want.index) and sorted(got.index.get_level_values("step").unique()) == list(range(STEPS))
    assert torch.allclose(torch.tensor(got.to_numpy()), torch.tensor(want.to_numpy()), rtol=1e-5, atol=1e-7)
    assert open_run(tmp_path / "accumulated").meta["integration"]["gradient_accumulation_steps"] == 4


def test_hf_records_clipped_gradients(tmp_path: Path) -> None:
    cb = DiagnosticsCallback(run=tmp_path / "run", diagnostics=["grad_norm"])
    _train(tmp_path, cb, max_steps=2, max_grad_norm=1e-3)
    run = open_run(tmp_path / "run")
    assert run.meta["gradients_seen"] == "clipped"
    norms = run.series(metric="grad_norm", key="all").value
    assert (norms <= 1e-3 * (1 + 1e-4)).all()  # the Monitor saw the Trainer's clipped gradients


class AlarmAt(Diagnostic):
    name = "alarm_at"
    reads_only = True

    def compute(self, ctx):  # noqa: ANN001, ANN202
        if ctx.step == 2:
            return Output(events=[Event("loss_explosion", "alarm at 2", severity="warning")])
        return []


def test_stop_action_stops_trainer_cleanly(tmp_path: Path) -> None:
    cb = DiagnosticsCallback(run=tmp_path / "run", diagnostics=["loss", AlarmAt()], actions="stop")
    trainer = _train(tmp_path, cb, max_steps=50)
    assert cb.stop_reason is not None and "alarm at 2" in str(cb.stop_reason)
    assert trainer.state.global_step == 3  # step 2's update completes, then training ends
    assert [int(s) for s in open_run(tmp_path / "run").steps()] == [0, 1, 2]
    assert not cb._handles  # hooks removed at the end of training
