"""The loss contract: default loss, loss objects, parameter selection, functional form, loss checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diagnostics._batch import batch_size
from diagnostics.errors import ConfigError, DataError, LossError
from diagnostics.loss import (
    ClassificationLoss,
    LanguageModelLoss,
    RegressionLoss,
    check_loss,
    default_loss,
    functional_loss,
    select_params,
    split_batch,
)
from tests.cases import get_case


def test_default_loss_dispatches_on_targets() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x = torch.randn(5, 4)
    y_int = torch.tensor([0, 2, 1, 1, 0])
    y_float = torch.randn(5, 3)
    assert torch.allclose(default_loss(model, (x, y_int)), nn.functional.cross_entropy(model(x), y_int))
    assert torch.allclose(default_loss(model, (x, y_float)), nn.functional.mse_loss(model(x), y_float))
    assert torch.allclose(
        default_loss(model, {"input": x, "target": y_int}), ClassificationLoss()(model, (x, y_int))
    )
    assert torch.allclose(RegressionLoss()(model, (x, y_float)), nn.functional.mse_loss(model(x), y_float))
    with pytest.raises(DataError, match="do not match"):
        default_loss(model, (x, torch.randn(5, 7)))


def test_language_model_loss_flattens_tokens() -> None:
    c = get_case("transformer")
    x, y = c.batches[0]
    logits = c.model(x)
    expected = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    assert torch.allclose(LanguageModelLoss()(c.model, (x, y)), expected)
    assert torch.allclose(default_loss(c.model, (x, y)), expected)
    lm = LanguageModelLoss()
    assert torch.allclose(lm.criterion(lm.forward(c.model, (x, y)), (x, y)), expected)


def test_batches() -> None:
    x = torch.zeros(7, 2)
    assert batch_size((x, torch.zeros(7))) == 7
    assert batch_size({"input_ids": x, "labels": x}) == 7
    assert split_batch({"x": 1, "labels": 2}) == (1, 2)
    with pytest.raises(DataError, match="keys"):
        split_batch({"foo": x})
    with pytest.raises(DataError):
        split_batch(x)
    with pytest.raises(DataError):
        batch_size(("a", 3))


def test_select_params() -> None:
    c = get_case("transformer")
    m = c.model
    assert list(select_params(m)) == [n for n, _ in m.named_parameters()]
    assert list(select_params(m, "ln1.*")) == ["ln1.weight", "ln1.bias"]
    assert list(select_params(m, ["mlp", "pos"])) == [
        "pos",
        "mlp.0.weight",
        "mlp.0.bias",
        "mlp.2.weight",
        "mlp.2.bias",
    ]
    assert list(select_params(m, [m.head.weight])) == ["head.weight"]
    with pytest.raises(ConfigError, match=r"'blocks\.0\.\*' matches no parameter"):
        select_params(m, ["pos", "blocks.0.*"])
    m.pos.requires_grad_(False)
    assert "pos" not in select_params(m)
    with pytest.raises(ConfigError, match="requires_grad=False"):
        select_params(m, "pos")
    for p in m.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        select_params(m)


def test_functional_loss_matches_module_and_substitutes_selected_params() -> None:
    c = get_case("cnn_bn")
    c.model.eval()
    batch = c.batches[0]
    f = functional_loss(c.model, c.loss_fn, batch)
    params = {n: p.detach() for n, p in c.model.named_parameters()}
    assert torch.allclose(f(params), c.loss_fn(c.model, batch))
    g = functional_loss(c.model, c.loss_fn, batch, params=["fc.bias"])
    shifted = g({"fc.bias": params["fc.bias"] + 1.0})
    logits = c.model(batch[0]) + 1.0
    assert torch.allclose(shifted, nn.functional.cross_entropy(logits, batch[1]))
    grads = torch.func.grad(f)(params)
    assert set(grads) == set(params)


def test_functional_loss_protects_buffers_in_train_mode() -> None:
    c = get_case("cnn_bn")
    c.model.train()
    before = c.model.bn.running_mean.clone()
    f = functional_loss(c.model, c.loss_fn, c.batches[0])
    f({n: p.detach() for n, p in c.model.named_parameters()})
    assert torch.equal(c.model.bn.running_mean, before)


def test_check_loss_messages() -> None:
    check_loss(torch.tensor(1.5), 0)
    with pytest.raises(
        LossError,
        match=r"loss_fn returned shape \(4,\) for batch 3; it must return a scalar \(use \.mean\(\)\)",
    ):
        check_loss(torch.ones(4), 3)
    with pytest.raises(LossError, match="nan for batch 2"):
        check_loss(torch.tensor(float("nan")), 2)
    with pytest.raises(LossError, match="inf for batch 0"):
        check_loss(torch.tensor(float("inf")), 0)
    with pytest.raises(LossError, match="float for batch 1"):
        check_loss(1.0, 1)
