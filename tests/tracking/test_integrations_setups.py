"""Training setups: gradient accumulation, bf16 autocast, torch.compile, activation checkpointing.

Each is compared with the same model trained plainly: what the Monitor records must not depend on how the
step was computed, and what cannot work says what to do.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint as cp
from torch import nn

from diagnostics import Monitor
from diagnostics.metrics import get_diagnostic
from diagnostics.store import open_run

STEPS, BATCH = 3, 16


class Block(nn.Module):
    def __init__(self, checkpoint: str | None, when_training: bool) -> None:
        super().__init__()
        self.checkpoint, self.when_training = checkpoint, when_training
        self.l1, self.l2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def inner(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint is None or (self.when_training and not self.training):
            return x + self.inner(x)
        return x + cp.checkpoint(self.inner, x, use_reentrant=self.checkpoint == "reentrant")


class Net(nn.Module):
    def __init__(self, checkpoint: str | None = None, when_training: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.out = nn.Linear(6, 8), nn.Linear(8, 3)
        self.b1, self.b2 = Block(checkpoint, when_training), Block(checkpoint, when_training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.b2(self.b1(self.inp(x))))


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 6, generator=g), torch.randint(0, 3, (BATCH,), generator=g)) for _ in range(STEPS)]


def _diagnostics() -> list:
    return ["loss", "grad_norm", "weight_norm", "update_ratio", get_diagnostic("gsnr", every=1),
            get_diagnostic("activation_rank", every=1), "spectral_alignment",
            get_diagnostic("hessian_top", every=2, k=2, tol=1e-6, max_matvecs=None)]


#: Metrics that are the same function of the same weights and batch however the step was computed
#: (gsnr's noise-scale estimates are left out: they are not reproducible between two plain runs).
EXACT = ("loss", "grad_norm", "weight_norm", "update_ratio", "gsnr_mean", "gsnr_median", "hessian_eigenvalue",
         "activation_effective_rank", "activation_stable_rank")


def _train(run: Path, model: nn.Module, *, accumulate: int = 1, autocast: bool = False, strict: bool = True):  # noqa: ANN202
    inner = getattr(model, "_orig_mod", model)
    opt = torch.optim.SGD(inner.parameters(), lr=0.1)
    with Monitor(model, run=run, diagnostics=_diagnostics(), optimizer=opt, strict=strict) as monitor:
        for step, (x, y) in enumerate(_data()):
            opt.zero_grad()
            losses = []
            for xm, ym in zip(x.chunk(accumulate), y.chunk(accumulate)):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    loss = nn.functional.cross_entropy(model(xm), ym)
                    (loss / accumulate).backward()
                    losses.append(loss.detach())
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                # Once per optimizer step, on the accumulated gradient: the step's whole batch, mean loss.
                monitor.step(step, (x, y), torch.stack(losses).mean())
            opt.step()
    return open_run(run)


def _series(run, metrics=EXACT, steps=None):  # noqa: ANN001, ANN202
    s = run.series()
    s = s[s.metric.isin(metrics)]
    if steps is not None:
        s = s[s.step.isin(steps)]
    return s.set_index(["step", "metric", "key", "index"]).value.sort_index()


def _assert_close(got, want, rtol: float) -> None:  # noqa: ANN001
    assert list(got.index) == list(want.index)
    assert torch.allclose(torch.tensor(got.to_numpy()), torch.tensor(want.to_numpy()), rtol=rtol, atol=1e-7), (
        (got - want).abs().groupby(level="metric").max()
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():  # noqa: ANN201
    """One intra-op thread: these products are tiny, and with the cores shared more threads are much slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    return _train(tmp_path_factory.mktemp("plain") / "run", Net())


def test_gradient_accumulation_sees_the_accumulated_gradient_once(tmp_path: Path, plain) -> None:  # noqa: ANN001
    run = _train(tmp_path / "run", Net(), accumulate=4)
    assert [int(s) for s in run.steps()] == list(range(STEPS))  # one row set per optimizer step
    _assert_close(_series(run), _series(plain), rtol=1e-5)


def test_bf16_autocast_diagnostics_in_float32(tmp_path: Path, plain) -> None:  # noqa: ANN001
    run = _train(tmp_path / "run", Net(), autocast=True)
    status = run.status()
    assert set(status.status) == {"ok"}, status[status.status != "ok"]
    # Step 0: same weights as the plain run; passes the Monitor runs itself are float32, not bf16.
    metrics = ("gsnr_mean", "gsnr_median", "hessian_eigenvalue", "activation_effective_rank", "weight_norm")
    _assert_close(_series(run, metrics, [0]), _series(plain, metrics, [0]), rtol=1e-5)
    # The training step itself ran in bf16: its loss and gradient differ from float32.
    loss = _series(run, ["loss"], [0]).iloc[0]
    assert loss != pytest.approx(_series(plain, ["loss"], [0]).iloc[0], rel=1e-6)
    assert loss == pytest.approx(_series(plain, ["loss"], [0]).iloc[0], rel=1e-2)


def test_torch_compile_wrapper_is_unwrapped(tmp_path: Path, plain) -> None:  # noqa: ANN001
    model = torch.compile(Net(), backend="aot_eager")
    run = _train(tmp_path / "run", model)
    status = run.status()
    assert set(status.status) == {"ok"}, status[status.status != "ok"]
    names = set(run.series(metric="grad_norm").key)
    assert "b1.l1.weight" in names and not any("_orig_mod" in n for n in names)
    _assert_close(_series(run), _series(plain), rtol=1e-5)
    # Hooks added after compilation are invisible to the compiled graph: the Monitor did not try.
    monitor = Monitor(model, run=tmp_path / "other", diagnostics=["loss"])
    assert monitor.model is model._orig_mod and not monitor.observe_training_forward
    monitor.close()


@pytest.mark.slow
def test_torch_compile_inductor(tmp_path: Path, plain) -> None:  # noqa: ANN001
    run = _train(tmp_path / "run", torch.compile(Net()))
    assert set(run.status().status) == {"ok"}
    _assert_close(_series(run), _series(plain), rtol=1e-4)


def test_activation_checkpointing_while_training(tmp_path: Path, plain) -> None:  # noqa: ANN001
    run = _train(tmp_path / "run", Net("non_reentrant", when_training=True))
    assert set(run.status().status) == {"ok"}
    _assert_close(_series(run), _series(plain), rtol=1e-5)


def test_non_reentrant_checkpointing_in_eval_too(tmp_path: Path, plain) -> None:  # noqa: ANN001
    """Checkpoints in eval mode as well: plain autograd goes through non-reentrant ones, so GSNR's layer-wise
    per-sample gradients (checked against each sample's own autograd gradient) and the curvature work."""
    run = _train(tmp_path / "run", Net("non_reentrant", when_training=False))
    assert set(run.status().status) == {"ok"}
    _assert_close(_series(run), _series(plain), rtol=1e-5)


def test_torch_func_through_an_eval_checkpoint_says_what_to_do() -> None:
    from diagnostics.gradients import per_sample_gradients
    from diagnostics.tracking.setups import explain_failure

    model = Net("non_reentrant", when_training=False)
    x, y = _data()[0]
    with pytest.raises(Exception) as failure:  # noqa: PT011 - torch's own error, whatever its type
        per_sample_gradients(model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), (x[:3], y[:3]),
                             method="vmap")
    assert "checkpoint only while model.training" in explain_failure(failure.value)


def test_reentrant_checkpointing_in_eval_says_what_to_do(tmp_path: Path) -> None:
    run = _train(tmp_path / "run", Net("reentrant", when_training=False), strict=False)
    status = run.status()
    failed = status[status.status == "failed"]
    assert "gsnr" in set(failed.diagnostic)
    assert all("checkpoint only while model.training" in r for r in failed.reason)
    assert set(status[status.diagnostic == "grad_norm"].status) == {"ok"}  # training itself is unaffected
