"""analyze_checkpoints: same store as the Monitor, resumable, validated before anything is written."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
from cli_helpers import save_mlp_checkpoints  # noqa: E402

from diagnostics.app.analyze import analyze_checkpoints  # noqa: E402
from diagnostics.errors import CheckpointError, ConfigError  # noqa: E402
from diagnostics.store import open_run  # noqa: E402
from diagnostics.store.schema import database_path  # noqa: E402

CHEAP = "loss,grad_norm,weight_norm"


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    save_mlp_checkpoints(folder, steps=(2, 4, 6))
    return folder


def test_records_match_a_direct_computation(checkpoints, tmp_path):
    from diagnostics.zoo import get_data, get_loss, get_model

    result = analyze_checkpoints(
        checkpoints, model="mlp-digits", diagnostics=CHEAP, batches=2, batch_size=16, run=tmp_path / "run"
    )
    assert result.analyzed == [2, 4, 6] and result.skipped == []
    run = open_run(tmp_path / "run")
    loss = run.series("loss").set_index("step")["value"]
    # The loss of checkpoint 4 over the same batches, computed by hand.
    model = get_model("mlp-digits")
    model.load_state_dict(torch.load(checkpoints / "ckpt_0004.pt", weights_only=True)["model"])
    model.eval()
    batches = get_data("digits", batch_size=16, num_batches=2)
    with torch.no_grad():
        expected = sum(float(get_loss("mlp-digits")(model, b)) for b in batches) / 2
    assert loss[4] == pytest.approx(expected, rel=1e-5)
    meta = run.meta
    assert meta["model_fingerprint"] and "checkpoint analysis" in meta["gradients_seen"]
    assert meta["config"]["analyze"]["diagnostics"] == ["loss", "grad_norm", "weight_norm"]
    assert len(run.sources()) == 3


def test_resume_after_interruption_without_duplicates(checkpoints, tmp_path):
    seen = []

    def stop_after_first(info):
        seen.append(info.step)
        if len(seen) == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        analyze_checkpoints(
            checkpoints,
            model="mlp-digits",
            diagnostics=CHEAP,
            batches=1,
            run=tmp_path / "run",
            on_checkpoint=stop_after_first,
        )
    assert open_run(tmp_path / "run").series("loss")["step"].tolist() == [2]
    result = analyze_checkpoints(
        checkpoints, model="mlp-digits", diagnostics=CHEAP, batches=1, run=tmp_path / "run"
    )
    assert result.skipped == [2] and result.analyzed == [4, 6]
    run = open_run(tmp_path / "run")
    series = run.series()
    assert not series.duplicated(["step", "metric", "key", "index"]).any()
    assert run.series("loss")["step"].tolist() == [2, 4, 6]
    # --force recomputes every checkpoint and still writes no duplicate rows.
    forced = analyze_checkpoints(
        checkpoints, model="mlp-digits", diagnostics=CHEAP, batches=1, run=tmp_path / "run", force=True
    )
    assert forced.analyzed == [2, 4, 6]
    assert len(open_run(tmp_path / "run").series()) == len(series)


def test_optimizer_diagnostics_are_left_out_or_refused(checkpoints, tmp_path):
    analyze_checkpoints(
        checkpoints / "ckpt_0002.pt", model="mlp-digits", diagnostics="cheap", batches=1, run=tmp_path / "a"
    )
    names = set(open_run(tmp_path / "a").meta["diagnostics"])
    assert "update_ratio" not in names and "learning_rate" not in names and "loss" in names
    with pytest.raises(ConfigError, match="update_ratio"):
        analyze_checkpoints(
            checkpoints, model="mlp-digits", diagnostics="loss,update_ratio", run=tmp_path / "b"
        )
    assert not database_path(tmp_path / "b").exists()
    # named with options or as an instance, it is refused the same way, not dropped without a word
    from diagnostics.metrics.basics import UpdateRatioDiagnostic

    for spec in (["loss", {"update_ratio": {"every": 2}}], ["loss", UpdateRatioDiagnostic()]):
        with pytest.raises(ConfigError, match="update_ratio.*optimizer's step"):
            analyze_checkpoints(checkpoints, model="mlp-digits", diagnostics=spec, run=tmp_path / "c")
        assert not database_path(tmp_path / "c").exists()


def test_run_of_another_model_is_refused_before_writing(checkpoints, tmp_path):
    analyze_checkpoints(
        checkpoints / "ckpt_0002.pt", model="mlp-digits", diagnostics=CHEAP, batches=1, run=tmp_path / "run"
    )
    before = len(open_run(tmp_path / "run").series())
    other = tmp_path / "other"
    other.mkdir()
    torch.save(torch.nn.Linear(64, 10).state_dict(), other / "w.pt")
    data = [(torch.randn(4, 64), torch.randint(0, 10, (4,)))]
    with pytest.raises(ConfigError, match="another model"):
        analyze_checkpoints(
            other, model=torch.nn.Linear(64, 10), data=data, diagnostics=CHEAP, run=tmp_path / "run"
        )
    assert len(open_run(tmp_path / "run").series()) == before


def test_duplicate_steps_are_refused(checkpoints, tmp_path):
    extra = tmp_path / "dup.pt"
    torch.save(
        {"model": torch.load(checkpoints / "ckpt_0002.pt", weights_only=True)["model"], "step": 2}, extra
    )
    with pytest.raises(CheckpointError, match="both have step 2"):
        analyze_checkpoints([checkpoints, extra], model="mlp-digits", diagnostics=CHEAP, run=tmp_path / "run")
    assert not database_path(tmp_path / "run").exists()


def test_in_memory_model_data_and_loss(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    for step in (10, 20):
        torch.save(model.state_dict(), tmp_path / f"w_{step}.pt")
    data = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(3)]
    calls = []

    def mse(m, batch):
        calls.append(1)
        return torch.nn.functional.mse_loss(m(batch[0]), batch[1])

    result = analyze_checkpoints(
        tmp_path, model=model, data=data, loss=mse, diagnostics=CHEAP, run=tmp_path / "run"
    )
    assert result.analyzed == [10, 20] and calls
    assert open_run(tmp_path / "run").series("loss")["step"].tolist() == [10, 20]


def test_spectral_alignment_converges_v1_at_every_checkpoint(tmp_path):
    # Checkpoints are not warm continuations of each other: whatever their step gap, sigma_1 is the weight's.
    from diagnostics.zoo import get_model

    folder = tmp_path / "ckpts"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    model = get_model("mlp-digits")
    for step in (2, 4, 6):  # unrelated weights two steps apart: one warm power step would not follow them
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        torch.save({"model": model.state_dict(), "step": step}, folder / f"ckpt_{step:04d}.pt")
    analyze_checkpoints(folder, model="mlp-digits", diagnostics="spectral_alignment", batches=1, batch_size=16,
                        run=tmp_path / "run")
    stored = open_run(tmp_path / "run").series("sa_sigma1")
    assert sorted(set(stored.step)) == [2, 4, 6]
    for step in (2, 4, 6):
        weights = torch.load(folder / f"ckpt_{step:04d}.pt", weights_only=True)["model"]
        for key, value in zip(stored[stored.step == step].key, stored[stored.step == step].value, strict=True):
            exact = float(torch.linalg.svdvals(weights[f"{key}.weight"].double())[0])
            assert value == pytest.approx(exact, rel=1e-5), (step, key)


def test_grad_subspace_runs_on_checkpoints_without_the_update(checkpoints, tmp_path):
    """At checkpoints there is no optimizer step: grad_subspace records the gradient's share of the top
    eigenspace and how far that space turned since the previous checkpoint, and no update fraction."""
    analyze_checkpoints(checkpoints, model="mlp-digits", diagnostics=["hessian_top", "grad_subspace"],
                        batches=1, run=tmp_path / "run")
    run = open_run(tmp_path / "run")
    assert run.meta["diagnostics"]["grad_subspace"]["update"] is False
    frac = run.series(metric="grad_subspace_fraction")
    assert len(frac) == 3 and ((frac.value >= 0) & (frac.value <= 1 + 1e-9)).all()
    prev = run.series(metric="subspace_overlap_prev")
    assert list(prev.step) == [4, 6] and ((prev.value >= 0) & (prev.value <= 1 + 1e-9)).all()
    assert run.series(metric="update_subspace_fraction").empty
    assert set(run.status().query("diagnostic == 'grad_subspace'").status) == {"ok"}
