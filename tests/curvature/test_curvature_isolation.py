"""Curvature operators leave the model and global state as found, and reject bad input clearly."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from diagnostics.curvature import GGNOperator, HessianOperator
from diagnostics.errors import ConfigError, DataError, LossError, NonDeterministicOperatorError
from tests.cases import dropout_case, get_case
from tests.reference import assert_same_state, snapshot_state

OPS = [HessianOperator, GGNOperator]


def _dirty(model: nn.Module) -> None:
    """Give the model state worth protecting: some .grad, a frozen tensor, mixed training flags."""
    for i, p in enumerate(model.parameters()):
        if i == 0:
            p.grad = torch.ones_like(p)
    model.train()
    list(model.modules())[-1].eval()


@pytest.mark.parametrize("backend", ["fwd_rev", "rev_rev", "auto"])
@pytest.mark.parametrize("cls", OPS)
@pytest.mark.parametrize("case", ["cnn_bn", "transformer"])
def test_state_isolation(case: str, cls: type, backend: str) -> None:
    c = get_case(case)
    _dirty(c.model)
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(7)
    before = snapshot_state(c.model)
    op = cls(c.model, c.loss_fn, c.batches, backend=backend)
    assert_same_state(before, snapshot_state(c.model))
    v = torch.ones(op.num_params, dtype=torch.float64)
    op @ v
    op @ torch.stack([v, -v], 1)
    op.gradient()
    op.loss()
    op.check_deterministic()
    assert_same_state(before, snapshot_state(c.model))


def test_train_mode_with_dropout_restores_rng_and_flags() -> None:
    c = dropout_case()
    c.model.eval()
    torch.manual_seed(0)
    before = snapshot_state(c.model)
    op = HessianOperator(c.model, c.loss_fn, c.batches, mode="train")
    op @ torch.ones(op.num_params, dtype=torch.float64)
    with pytest.raises(NonDeterministicOperatorError):
        op.check_deterministic()
    assert_same_state(before, snapshot_state(c.model))


@pytest.mark.parametrize("cls", OPS)
def test_dropout_in_train_mode_is_not_deterministic(cls: type) -> None:
    c = dropout_case()
    with pytest.raises(NonDeterministicOperatorError, match="dropout"):
        cls(c.model, c.loss_fn, c.batches, mode="train").check_deterministic()
    cls(c.model, c.loss_fn, c.batches, mode="eval").check_deterministic()  # eval: a fixed matrix


def test_products_in_train_mode_are_a_fixed_matrix_within_one_operator() -> None:
    # Each batch is linearised once with a fixed private seed: repeated products agree.
    c = dropout_case()
    op = HessianOperator(c.model, c.loss_fn, c.batches, mode="train", max_cache_bytes=0)
    v = torch.ones(op.num_params, dtype=torch.float64)
    assert torch.equal(op @ v, op @ v)


def _bad_loss(kind: str):
    def loss(model, batch):
        out = nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")
        if kind == "shape":
            return out
        value = out.mean()
        return value * float("nan") if (kind == "nan" and batch[0].shape[0] == 3) else value

    return loss


@pytest.mark.parametrize("cls", [HessianOperator])
@pytest.mark.parametrize("backend", ["fwd_rev", "rev_rev", "auto"])
def test_non_scalar_loss(cls: type, backend: str) -> None:
    c = get_case("mlp")
    op = cls(c.model, _bad_loss("shape"), c.batches, backend=backend)
    with pytest.raises(
        LossError,
        match=r"loss_fn returned shape \(5,\) for batch 0; it must return a scalar \(use .mean\(\)\)",
    ):
        op @ torch.ones(op.num_params)


@pytest.mark.parametrize("backend", ["fwd_rev", "rev_rev", "auto"])
def test_nan_loss_names_the_batch(backend: str) -> None:
    c = get_case("mlp")  # batches of 5 and 3 samples: the second one is NaN
    op = HessianOperator(c.model, _bad_loss("nan"), c.batches, backend=backend)
    with pytest.raises(LossError, match="nan for batch 1"):
        op.loss()


def test_inf_loss_in_ggn_names_the_batch() -> None:
    c = get_case("regression")
    x, y = c.batches[1]
    bad = [c.batches[0], (x, y * float("inf"))]
    with pytest.raises(LossError, match="for batch 1"):
        GGNOperator(c.model, c.loss_fn, bad).gradient()


def test_no_trainable_parameters() -> None:
    c = get_case("mlp")
    for p in c.model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        HessianOperator(c.model, c.loss_fn, c.batches)


def test_pattern_matching_nothing_is_named() -> None:
    c = get_case("transformer")
    with pytest.raises(ConfigError, match=r"'blocks\.0\.\*'"):
        HessianOperator(c.model, c.loss_fn, c.batches, params=["ln1.*", "blocks.0.*"])


@pytest.mark.parametrize("data", [[], iter([]), None])
def test_empty_data(data) -> None:
    c = get_case("mlp")
    with pytest.raises(DataError):
        HessianOperator(c.model, c.loss_fn, data)


def test_ggn_needs_forward_and_criterion() -> None:
    c = get_case("mlp")
    with pytest.raises(ConfigError, match="forward"):
        GGNOperator(c.model, lambda m, b: c.loss_fn(m, b), c.batches)


def test_bad_options_and_shapes() -> None:
    c = get_case("mlp")
    with pytest.raises(ConfigError, match="backend"):
        HessianOperator(c.model, c.loss_fn, c.batches, backend="magic")
    with pytest.raises(ConfigError, match="mode"):
        HessianOperator(c.model, c.loss_fn, c.batches, mode="inference")
    op = HessianOperator(c.model, c.loss_fn, c.batches)
    with pytest.raises(ConfigError, match="shape"):
        op @ torch.ones(3)
    with pytest.raises(ConfigError, match="distributed=True"):
        HessianOperator(c.model, c.loss_fn, c.batches, distributed=True)


@pytest.mark.slow
def test_distributed_average_over_two_ranks(tmp_path) -> None:
    """Two gloo ranks, each with one batch, give the operator of both batches on one process."""
    import torch.multiprocessing as mp

    c = get_case("mlp")
    one = HessianOperator(c.model, c.loss_fn, c.batches)
    v = torch.linspace(-1, 1, one.num_params, dtype=torch.float64)
    expected = torch.cat([one @ v, one.gradient(), torch.tensor([one.loss()], dtype=torch.float64)])
    mp.spawn(_rank, args=(str(tmp_path),), nprocs=2, join=True)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert torch.allclose(got, expected, rtol=1e-12, atol=1e-14)


def _rank(rank: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        c = get_case("mlp")
        op = HessianOperator(c.model, c.loss_fn, [c.batches[rank]])
        assert op.distributed and op.num_samples == 8
        v = torch.linspace(-1, 1, op.num_params, dtype=torch.float64)
        got = torch.cat([op @ v, op.gradient(), torch.tensor([op.loss()], dtype=torch.float64)])
        local = HessianOperator(c.model, c.loss_fn, [c.batches[rank]], distributed=False)
        assert not local.distributed and local.num_samples == c.batches[rank][0].shape[0]
        torch.save(got, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("cls", OPS)
@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_products_inside_no_grad_or_inference_mode_equal_those_outside(cls: type, context: str) -> None:
    c = get_case("transformer")
    v = torch.linspace(-1, 1, sum(p.numel() for p in c.model.parameters()), dtype=torch.float64)
    want = cls(c.model, c.loss_fn, c.batches) @ v
    with getattr(torch, context)():
        op = cls(c.model, c.loss_fn, c.batches)
        got = op @ v  # a fresh linearisation inside the caller's mode
        again = op @ v  # then a kept one
        assert not torch.is_grad_enabled()
    assert torch.equal(got, want) and torch.equal(again, want)
