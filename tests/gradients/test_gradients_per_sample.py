"""Per-sample gradients against a Python loop of autograd.grad (float64, <= 1e-10)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from diagnostics.errors import ConfigError, LossError
from diagnostics.gradients import per_sample_gradients
from tests.cases import CASES, dropout_case, get_case
from tests.reference import assert_same_state, per_sample_gradients_loop, snapshot_state


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("budget", [None, 1])  # 1 byte: one sample per chunk
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_loop(case: str, budget: int | None) -> None:
    c = get_case(case)
    batch = c.batches[0]
    got = per_sample_gradients(c.model, c.loss_fn, batch, max_memory_bytes=budget)
    names = [n for n, _ in c.model.named_parameters()]
    assert list(got) == names
    ref = per_sample_gradients_loop(c.model, c.loss_fn, batch, names)
    for n in names:
        assert got[n].shape == (batch[0].shape[0], *dict(c.model.named_parameters())[n].shape)
        assert rel(got[n], ref[n]) <= 1e-10, n
    # With mean losses over equal-weight samples, the batch gradient is the mean of per-sample gradients.
    full = torch.autograd.grad(c.loss_fn(c.model.eval(), batch), list(c.model.parameters()))
    for n, g in zip(names, full):
        assert rel(got[n].mean(0), g) <= 1e-10


def test_selection_dict_batches_and_isolation() -> None:
    c = get_case("transformer")
    c.model.train()
    c.model.pos.grad = torch.ones_like(c.model.pos)
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    before = snapshot_state(c.model)
    x, y = c.batches[0]
    lm = c.loss_fn

    def dict_loss(model, batch):
        return lm(model, (batch["input_ids"], batch["labels"]))

    got = per_sample_gradients(
        c.model, dict_loss, {"input_ids": x, "labels": y, "note": "text"}, params=["ln1.*", "head.weight"]
    )
    assert list(got) == ["ln1.weight", "ln1.bias", "head.weight"]
    ref = per_sample_gradients_loop(c.model, lm, (x, y), list(got))
    for n in got:
        assert rel(got[n], ref[n]) <= 1e-10
    assert_same_state(before, snapshot_state(c.model))


def test_train_mode_with_dropout_leaves_global_rng() -> None:
    c = dropout_case()
    before = snapshot_state(c.model)
    a = per_sample_gradients(c.model, c.loss_fn, c.batches[0], mode="train", seed=3)
    b = per_sample_gradients(c.model, c.loss_fn, c.batches[0], mode="train", seed=3)
    assert all(torch.equal(a[n], b[n]) for n in a)  # private seed: reproducible
    assert_same_state(before, snapshot_state(c.model))


def test_errors() -> None:
    c = get_case("mlp")
    x, y = c.batches[0]

    def per_element(model, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")

    with pytest.raises(LossError, match="shape"):
        per_sample_gradients(c.model, per_element, (x, y))
    bad = x.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(LossError, match="sample 3"):
        per_sample_gradients(c.model, c.loss_fn, (bad, y))
    with pytest.raises(ConfigError, match="'nope'"):
        per_sample_gradients(c.model, c.loss_fn, (x, y), params="nope")
    for p in c.model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        per_sample_gradients(c.model, c.loss_fn, (x, y))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model_with_cpu_batch() -> None:
    c = get_case("cnn_bn")
    names = [n for n, _ in c.model.named_parameters()]
    ref = per_sample_gradients_loop(c.model, c.loss_fn, c.batches[0], names)
    got = per_sample_gradients(c.model.cuda(), c.loss_fn, c.batches[0])
    for n in names:
        assert got[n].device.type == "cuda"
        assert rel(got[n].cpu(), ref[n]) <= 1e-10
