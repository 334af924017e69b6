"""GSNR from the user's training step inside the Monitor: the same numbers as its own pass, and its own
pass wherever the training step's gradients are not the per-sample gradients it defines."""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
from torch import nn

from diagnostics.metrics.gradient_stats import GSNRDiagnostic
from diagnostics.store import open_run
from diagnostics.tracking import Monitor
from diagnostics.zoo.models import GPTConfig, TinyGPT

METRICS = ("gsnr_mean", "gsnr_median", "gsnr_raw_mean", "grad_noise_trace", "grad_noise_sqnorm")


def ce(model: nn.Module, batch: Any) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def lm(model: nn.Module, batch: Any) -> torch.Tensor:
    logits = model(batch[0])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1))


def mlp(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(dropout), nn.LayerNorm(16),
                         nn.Linear(16, 4)).double()


def batches(steps: int, n: int = 12) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g))
            for _ in range(steps)]


def train(model: nn.Module, loss_fn, data, path, gsnr: GSNRDiagnostic, budget=None) -> pd.DataFrame:  # noqa: ANN001
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, loss_fn, path, diagnostics=["loss", gsnr], budget=budget)
    for step, batch in enumerate(data):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        mon.step(step, batch, loss)
        opt.step()
    mon.close()
    with open_run(path) as run:
        series = run.series()
    return series[series.metric.isin(METRICS)].sort_values(["metric", "key", "step"]).reset_index(drop=True)


def test_the_training_steps_gradients_give_the_own_passes_numbers(tmp_path):
    data = batches(7)
    captured = GSNRDiagnostic(every=2, max_samples=5)
    own = GSNRDiagnostic(every=2, max_samples=5, from_training_step=False)
    a = train(mlp(), ce, data, tmp_path / "a", captured)
    b = train(mlp(), ce, data, tmp_path / "b", own)
    # The first run has nothing captured (the hooks go on after a step); every later one reads the step.
    assert captured.training_step_runs == 3 and captured.capture_agrees and captured.last_source == "training_step"
    assert own.training_step_runs == 0 and own.last_source == "own_pass"
    assert len(a) == len(b) > 0 and sorted(a.step.unique()) == [0, 2, 4, 6]
    pd.testing.assert_frame_equal(a[["metric", "key", "step"]], b[["metric", "key", "step"]])
    torch.testing.assert_close(torch.tensor(a.value.values), torch.tensor(b.value.values), rtol=1e-9, atol=1e-12)


def test_dropout_in_train_mode_makes_it_use_its_own_pass(tmp_path):
    data = batches(5)
    captured = GSNRDiagnostic(every=2, max_samples=5)
    own = GSNRDiagnostic(every=2, max_samples=5, from_training_step=False)
    a = train(mlp(dropout=0.5), ce, data, tmp_path / "a", captured)
    b = train(mlp(dropout=0.5), ce, data, tmp_path / "b", own)
    assert captured.capture_agrees is False and "dropout" in captured.capture_note
    assert captured.training_step_runs == 0 and captured.last_source == "own_pass"
    torch.testing.assert_close(torch.tensor(a.value.values), torch.tensor(b.value.values), rtol=1e-9, atol=1e-12)


def gpt(tie_weights: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return TinyGPT(GPTConfig(vocab_size=11, d_model=8, n_layers=1, n_heads=2, block_size=6,
                             tie_weights=tie_weights), seed=0).double()


def token_batches(steps: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 11, (6, 6), generator=g), torch.randint(0, 11, (6, 6), generator=g))
            for _ in range(steps)]


def test_a_gpt_with_a_position_embedding_reads_the_training_step_too(tmp_path):
    data = token_batches()
    captured = GSNRDiagnostic(every=1, max_samples=4)
    own = GSNRDiagnostic(every=1, max_samples=4, from_training_step=False)
    a = train(gpt(), lm, data, tmp_path / "a", captured)
    b = train(gpt(), lm, data, tmp_path / "b", own)
    assert captured.capture_agrees and captured.training_step_runs == 4, captured.capture_note
    torch.testing.assert_close(torch.tensor(a.value.values), torch.tensor(b.value.values), rtol=1e-9, atol=1e-12)


def test_a_large_models_ratios_come_straight_from_the_capture_with_the_same_numbers(tmp_path, monkeypatch):
    """Past the size threshold (lowered to 0 here) every run reduces the captured gradients parameter by
    parameter to their ratios instead of forming the [n, P] buffer and the moments (the first also forms
    the two samples it checks): the own pass's numbers still."""
    import diagnostics.metrics.gradient_stats as gradient_stats
    from diagnostics.gradients.training_capture import TrainingStepCapture

    monkeypatch.setattr(gradient_stats, "MOMENTS_DIRECTLY_BYTES", 0)
    calls = {"reduction": 0, "gradients": 0}
    checked: list[int | None] = []

    def spying(name: str):  # noqa: ANN202
        method = getattr(TrainingStepCapture, name)

        def spy(self, selected, **kwargs):  # noqa: ANN001, ANN003, ANN202
            calls[name] += 1
            if name == "gradients":
                checked.append(kwargs.get("samples"))
            return method(self, selected, **kwargs)
        return spy

    for name in calls:
        monkeypatch.setattr(TrainingStepCapture, name, spying(name))
    data = token_batches()
    captured = GSNRDiagnostic(every=1, max_samples=4)
    own = GSNRDiagnostic(every=1, max_samples=4, from_training_step=False)
    a = train(gpt(tie_weights=True), lm, data, tmp_path / "a", captured)
    b = train(gpt(tie_weights=True), lm, data, tmp_path / "b", own)
    assert captured.capture_agrees and captured.training_step_runs == 4, captured.capture_note
    # The first run forms only the two samples it checks against the own pass; every run then reduces all.
    assert calls == {"gradients": 1, "reduction": 4} and checked == [2]
    pd.testing.assert_frame_equal(a[["metric", "key", "step"]], b[["metric", "key", "step"]])
    torch.testing.assert_close(torch.tensor(a.value.values), torch.tensor(b.value.values), rtol=1e-9, atol=1e-12)


def test_a_large_models_own_pass_is_reduced_to_its_ratios_with_the_same_numbers(tmp_path, monkeypatch):
    """Past the size threshold (lowered to 0) the own pass's per-sample gradients go to GSNRReduction rather
    than to the model-wide moments: the same stored series."""
    import diagnostics.metrics.gradient_stats as gradient_stats
    from diagnostics.gradients.ratio_reduction import GSNRReduction

    data = token_batches()
    small = train(gpt(), lm, data, tmp_path / "small", GSNRDiagnostic(every=1, max_samples=4, from_training_step=False))
    fed: list[str] = []
    add = GSNRReduction.add
    monkeypatch.setattr(GSNRReduction, "add", lambda self, name, g: (fed.append(name), add(self, name, g))[1])
    monkeypatch.setattr(gradient_stats, "MOMENTS_DIRECTLY_BYTES", 0)
    large = train(gpt(), lm, data, tmp_path / "large", GSNRDiagnostic(every=1, max_samples=4, from_training_step=False))
    assert len(fed) == len(data) * len(list(gpt().parameters()))
    pd.testing.assert_frame_equal(small[["metric", "key", "step"]], large[["metric", "key", "step"]])
    torch.testing.assert_close(torch.tensor(small.value.values), torch.tensor(large.value.values),
                               rtol=1e-12, atol=1e-15)


def test_a_bf16_autocast_step_makes_it_use_its_own_full_precision_pass(tmp_path):
    model = mlp().float()
    data = [(x.float(), y) for x, y in batches(5)]
    gsnr = GSNRDiagnostic(every=2, max_samples=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, ce, tmp_path / "amp", diagnostics=[gsnr], budget=None)
    for step, batch in enumerate(data):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = ce(model, batch)
        loss.backward()
        mon.step(step, batch, loss)
        opt.step()
    mon.close()
    assert gsnr.capture_agrees is False and "mixed precision" in gsnr.capture_note
    assert gsnr.training_step_runs == 0


def test_training_with_the_hooks_is_bit_identical_and_leaves_no_hooks(tmp_path):
    def run(monitored: bool) -> nn.Module:
        torch.manual_seed(0)
        model = TinyGPT(GPTConfig(vocab_size=11, d_model=8, n_layers=2, n_heads=2, block_size=6), seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(0)
        gsnr = GSNRDiagnostic(every=1, max_samples=3)
        mon = Monitor(model, lm, tmp_path / "m", diagnostics=[gsnr], budget=None) if monitored else None
        for step in range(6):
            batch = (torch.randint(0, 11, (4, 6), generator=g), torch.randint(0, 11, (4, 6), generator=g))
            opt.zero_grad(set_to_none=True)
            loss = lm(model, batch)
            loss.backward()
            if mon is not None:
                mon.step(step, batch, loss)
            opt.step()
        if mon is not None:
            mon.close()
            assert gsnr.training_step_runs == 5 and gsnr.capture_agrees
        return model

    plain, monitored = run(False), run(True)
    for (name, a), (_, b) in zip(plain.named_parameters(), monitored.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in monitored.modules())
