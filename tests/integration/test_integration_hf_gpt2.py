"""A Hugging Face GPT-2 end to end: the Trainer with the DiagnosticsCallback, then ``tdiag analyze hf:DIR``.

The model is built from a small ``GPT2Config`` (random weights, no download) with SDPA attention, trained a
few steps by ``transformers.Trainer``; its ``save_pretrained`` checkpoints (the Trainer's
``checkpoint-N`` directories) are analysed through the command line, Hessian eigenvalues included.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

from diagnostics.metrics import get_diagnostic, resolve_diagnostics  # noqa: E402
from diagnostics.metrics.linear_maps import find_linear_maps  # noqa: E402
from diagnostics.store import open_run  # noqa: E402
from diagnostics.tracking.integrations.huggingface import DiagnosticsCallback  # noqa: E402

VOCAB, SEQ, EMBD, LAYERS = 64, 12, 16, 2
STEPS, BATCH = 4, 8

DATA_FILE = f'''
import torch

def batches(batch_size=4, num_batches=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_batches):
        ids = torch.randint(0, {VOCAB}, (batch_size, {SEQ}), generator=g)
        out.append({{"input_ids": ids, "labels": ids}})
    return out
'''


def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    # No dropout: with it, the strict Monitor raises MisuseError on sharpness comparing eval-mode curvature
    # with the threshold of the train-mode loss (tests/tracking/test_misuse.py covers that case).
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=EMBD, n_layer=LAYERS, n_head=2, bos_token_id=0,
        eos_token_id=0, attn_implementation="sdpa", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


def _dataset() -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, VOCAB, (STEPS * BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": ids[i], "labels": ids[i]} for i in range(len(ids))]


def _diagnostics() -> list:
    """The standard preset, each diagnostic due at least every other step; fused c_attn split into q, k, v."""
    diags = []
    for d in resolve_diagnostics("standard"):
        if d.name == "spectral_alignment":
            d = get_diagnostic("spectral_alignment", fused_qkv="split")
        elif d.name == "hessian_top":
            d = get_diagnostic("hessian_top", k=3, max_matvecs=40)
        d.every = min(d.every, 2)
        diags.append(d)
    return diags


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these products are tiny, and with the cores shared more threads are much slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DiagnosticsCallback, torch.nn.Module]:
    out = tmp_path_factory.mktemp("hf_gpt2")
    model = gpt2()
    args = transformers.TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=BATCH, max_steps=STEPS, learning_rate=1e-3,
        max_grad_norm=0.0, report_to="none", save_strategy="steps", save_steps=2, save_only_model=True,
        logging_steps=1, use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_dataset())
    cb = DiagnosticsCallback(run=out / "run", diagnostics=_diagnostics(), strict=True).attach(trainer)
    trainer.train()
    return out, cb, model


def test_gpt2_conv1d_maps_are_read_as_out_by_in() -> None:
    model = gpt2()
    maps = {m.key: m for m in find_linear_maps(model, fused_qkv="split")}
    attn = model.get_submodule("transformer.h.0.attn.c_attn")
    assert type(attn).__name__ == "Conv1D" and tuple(attn.weight.shape) == (EMBD, 3 * EMBD)  # [in, out]
    for i, part in enumerate("qkv"):
        mp = maps[f"transformer.h.0.attn.c_attn.{part}"]
        assert mp.kind == "conv1d"
        assert torch.equal(mp.weight(attn), attn.weight.detach().T[i * EMBD : (i + 1) * EMBD])
    assert maps["transformer.h.0.mlp.c_fc"].weight(model.get_submodule("transformer.h.0.mlp.c_fc")).shape == (
        4 * EMBD, EMBD,
    )


def test_trainer_with_callback_records_gpt2(trained) -> None:  # noqa: ANN001
    out, cb, model = trained
    run = open_run(out / "run")
    status = run.status()
    assert set(status.status) == {"ok"}, status[status.status != "ok"]
    assert set(status.diagnostic) == {d.name for d in resolve_diagnostics("standard")}
    assert sorted(int(s) for s in run.steps()) == list(range(STEPS))
    series = run.series()
    metrics = set(series.metric)
    assert {"gsnr_mean", "weight_effective_rank", "activation_effective_rank", "hessian_eigenvalue",
            "sa_sigma1", "update_ratio"} <= metrics
    sa = series[series.metric == "sa_sigma1"]
    keys = set(sa.key)
    for layer in range(LAYERS):  # the fused Conv1D split into its query, key and value row blocks
        assert {f"transformer.h.{layer}.attn.c_attn.{p}" for p in "qkv"} <= keys
        assert f"transformer.h.{layer}.mlp.c_fc" in keys and f"transformer.h.{layer}.attn.c_proj" in keys
    # sigma_1 of the key block at the last step: a lower bound converging to the block's top singular value.
    w = model.get_submodule("transformer.h.1.attn.c_attn").weight.detach().T[EMBD : 2 * EMBD]
    last = sa[(sa.key == "transformer.h.1.attn.c_attn.k") & (sa.step == STEPS - 1)].value.item()
    sigma = float(torch.linalg.matrix_norm(w, ord=2))
    assert sigma * 0.9 <= last <= sigma * (1 + 1e-5)
    eig = series[(series.metric == "hessian_eigenvalue")]
    assert set(eig.step) == {0, 2} and len(eig) == 6
    assert open_run(out / "run").meta["gradients_seen"] == "unclipped"
    assert not cb._handles


def test_tdiag_analyze_hf_checkpoints(trained, tmp_path: Path) -> None:  # noqa: ANN001
    from diagnostics.cli import main
    from diagnostics.cli.commands import register

    out, _, _ = trained
    ckpts = sorted((out / "trainer").glob("checkpoint-*"))
    assert [c.name for c in ckpts] == ["checkpoint-2", "checkpoint-4"]
    (tmp_path / "data.py").write_text(DATA_FILE)
    group = type(main)(name="tdiag", commands=dict(main.commands))
    register(group)
    result = CliRunner().invoke(
        group,
        ["analyze", str(out / "trainer"), "--model", f"hf:{ckpts[0]}", "--data", f"{tmp_path / 'data.py'}:batches",
         "--batches", "2", "--batch-size", "4", "--diagnostics", "loss,grad_norm,spectral_alignment,hessian_top",
         "--run", str(tmp_path / "analysis"), "-q"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    run = open_run(tmp_path / "analysis")
    status = run.status()
    assert set(status.status) == {"ok"}, status[status.status != "ok"]
    series = run.series()
    assert sorted(series.step.unique()) == [2, 4]
    eig = series[series.metric == "hessian_eigenvalue"]
    assert len(eig[eig.step == 2]) == 10 and eig.value.notna().all()
    # The loss defaulted to the model's own (labels in the batch): the Trainer's loss at that checkpoint.
    assert (series[series.metric == "loss"].value > 0).all()
    assert "transformer.h.0.attn.c_attn" in set(series[series.metric == "sa_sigma1"].key)


def test_gpt2_gradient_checkpointing(tmp_path: Path) -> None:
    """``gradient_checkpointing_enable()`` checkpoints only in training mode; the diagnostics' passes run in eval."""
    from diagnostics import Monitor
    from diagnostics.tracking.integrations.huggingface import hf_loss

    model = gpt2()
    if hasattr(model, "activation_checkpointing_enable"):  # the newer name of gradient_checkpointing_enable
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    diags = ["grad_norm", get_diagnostic("gsnr", every=1), get_diagnostic("hessian_top", k=2, every=1, max_matvecs=20)]

    def train(run: Path) -> object:
        with Monitor(model, hf_loss, run=run, diagnostics=diags, optimizer=opt) as mon:
            for step, batch in enumerate(_batches(2)):
                opt.zero_grad()
                loss = hf_loss(model, batch)
                loss.backward()
                mon.step(step, batch, loss)
                opt.step()
        return open_run(run).status()

    # transformers' hook on the input embeddings (requires_grad_ on their output) stops torch.func, which
    # GSNR's layer-wise per-sample gradients and their check (each sample's own autograd gradient) do not
    # use: every diagnostic runs with the hook on, and with it removed.
    with_hook = train(tmp_path / "with_hook")
    assert set(with_hook.status) <= {"ok", "continues"}, with_hook[with_hook.status != "ok"]
    assert set(with_hook[with_hook.diagnostic == "gsnr"].status) == {"ok"}
    model.disable_input_require_grads()
    status = train(tmp_path / "run")
    assert set(status.status) <= {"ok", "continues"}, status[status.status != "ok"]
    # Where torch.func is used (vmap), the failure says how to remove the hook.
    model.enable_input_require_grads()
    from diagnostics.gradients import per_sample_gradients
    from diagnostics.tracking.setups import explain_failure

    with pytest.raises(Exception) as failure:  # noqa: PT011 - torch's own error, whatever its type
        per_sample_gradients(model.eval(), hf_loss, _batches(1)[0], method="vmap")
    assert "model.disable_input_require_grads()" in explain_failure(failure.value)


def _batches(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (4, SEQ), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def _train_with_evaluation(out: Path, evaluate: bool) -> dict:
    """Four Trainer steps of the small GPT-2 with spectral alignment and the output logits every step;
    with ``evaluate``, the Trainer's own evaluation loop after every step (eval mode, no_grad)."""
    model = gpt2()
    args = transformers.TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH,
        max_steps=STEPS, learning_rate=1e-3, max_grad_norm=0.0, report_to="none", save_strategy="no",
        eval_strategy="steps" if evaluate else "no", eval_steps=1, use_cpu=True, disable_tqdm=True, seed=0,
        dataloader_num_workers=0,
    )
    held_out = [{"input_ids": ids, "labels": ids} for ids in
                torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))]
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_dataset(),
                                   eval_dataset=held_out if evaluate else None)
    diags = [get_diagnostic("spectral_alignment"), get_diagnostic("output_logits", every=1)]
    DiagnosticsCallback(run=out / "run", diagnostics=diags, strict=True).attach(trainer)
    trainer.train()
    run = open_run(out / "run")
    series = run.series()
    return {m: frame[["step", "key", "index", "value"]].reset_index(drop=True)
            for m, frame in series[series.metric != "monitor_seconds"].groupby("metric")}


def test_the_trainers_evaluation_loop_is_not_measured_as_the_training_forward(tmp_path: Path) -> None:
    plain = _train_with_evaluation(tmp_path / "plain", evaluate=False)
    evaluated = _train_with_evaluation(tmp_path / "evaluated", evaluate=True)
    assert {"sa_mean", "output_logit_max"} <= plain.keys()
    assert plain.keys() == evaluated.keys()
    for metric, frame in plain.items():
        assert frame.equals(evaluated[metric]), metric
