"""output_logits against torch.logsumexp on the model's output, from its own forward and the training one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diagnostics.metrics import logits as logits_mod
from diagnostics.metrics.context import StepContext
from diagnostics.metrics.logits import LogitStats, OutputLogits, output_tensor


def brute(z: torch.Tensor) -> tuple[float, float, float]:
    z = z.double().reshape(-1, z.shape[-1])
    lz = torch.logsumexp(z, -1)
    return float(z.max()), float(lz.mean()), float(lz.max())


def test_logit_stats_in_chunks(monkeypatch) -> None:
    monkeypatch.setattr(logits_mod, "CHUNK_ROWS", 3)
    z = torch.randn(4, 5, 7, generator=torch.Generator().manual_seed(0)) * 5
    st = LogitStats.of(z)
    top, mean, mx = brute(z)
    assert (st.logit_max, st.tokens) == (pytest.approx(top), 20)
    assert st.log_z_mean() == pytest.approx(mean, rel=1e-6)
    assert st.log_z_max == pytest.approx(mx, rel=1e-6)
    part = LogitStats.of(z, max_rows=6)
    assert part.tokens == 6 and part.log_z_max == pytest.approx(brute(z.reshape(-1, 7)[:6])[2], rel=1e-6)


def test_output_tensor_reads_hugging_face_logits() -> None:
    class Out(dict):
        pass

    z = torch.randn(2, 3)
    assert output_tensor(Out(loss=torch.tensor(1.0), logits=z)) is z
    assert output_tensor((z, torch.zeros(1))) is z


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(6, 11)

    def forward(self, ids):
        return self.head(self.drop(self.emb(ids)))


def loss_fn(model, batch):
    z = model(batch)
    return F.cross_entropy(z.reshape(-1, 11), batch.reshape(-1))


def test_own_forward_uses_eval_mode_and_the_first_samples() -> None:
    torch.manual_seed(0)
    model = Net().train()
    batch = torch.randint(0, 11, (6, 4), generator=torch.Generator().manual_seed(1))
    ctx = StepContext(step=0, model=model, loss_fn=loss_fn, batch=batch, loss=None)
    out = OutputLogits(max_tokens=8).compute(ctx)
    assert model.training and out.settings == {"source": "extra_forward", "tokens": 8}
    with torch.no_grad():
        ref = brute(model.eval()(batch[:2]))
    got = {r.metric: r.value for r in out.records}
    assert got["output_logit_max"] == pytest.approx(ref[0])
    assert got["output_log_z_mean"] == pytest.approx(ref[1], rel=1e-6)
    assert got["output_log_z_max"] == pytest.approx(ref[2], rel=1e-6)


def test_observed_training_forward() -> None:
    torch.manual_seed(0)
    model = Net().train()
    batch = torch.randint(0, 11, (3, 4), generator=torch.Generator().manual_seed(1))
    diag = OutputLogits()
    with diag.observe_training_forward(model):
        z = model(batch)
    assert not model._forward_hooks and z.requires_grad
    ctx = StepContext(step=0, model=model, loss_fn=loss_fn, batch=batch, loss=None)
    out = diag.compute(ctx)
    assert out.settings["source"] == "training_forward"
    ref = brute(z.detach())  # the training forward's own logits, dropout included
    assert [r.value for r in out.records] == pytest.approx(list(ref), rel=1e-6)
    # the next step has nothing observed: it falls back to its own forward
    assert diag.compute(ctx).settings["source"] == "extra_forward"
