"""Micro-batch gradient moments read off an accumulating .grad, against the gradients taken one by one."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from diagnostics.gradients import gradient_moments
from diagnostics.gradients.accumulation import AccumulatedMoments


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(6, 3), nn.Flatten(), nn.Linear(6, 2)).double()


def _loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens).square().mean()


@settings(max_examples=20, deadline=None)
@given(m=st.integers(2, 7), seed=st.integers(0, 10_000))
def test_moments_equal_those_of_the_separate_micro_batch_gradients(m: int, seed: int) -> None:
    model = _model()
    gen = torch.Generator().manual_seed(seed)
    # Tokens 0-2 in early micro-batches only, 3-5 later: embedding rows get their first gradient late.
    parts = [torch.randint(0 if i < m // 2 else 3, 3 if i < m // 2 else 6, (4, 2), generator=gen) for i in range(m)]
    named = list(model.named_parameters())
    separate = []
    for tokens in parts:
        gs = torch.autograd.grad(_loss(model, tokens), [p for _, p in named])
        separate.append({n: g for (n, _), g in zip(named, gs)})
    ref = gradient_moments({n: torch.stack([s[n] for s in separate]) for n, _ in named})

    acc = AccumulatedMoments()
    model.zero_grad(set_to_none=True)
    for tokens in parts:
        _loss(model, tokens).backward()
        acc.observe(named)
    before = {n: p.grad.clone() for n, p in named}
    got = acc.moments()
    assert got is not None and got.n == m
    for n, _ in named:
        torch.testing.assert_close(got.mean[n], ref.mean[n], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got.var[n], ref.var[n], rtol=1e-9, atol=1e-12)
        assert torch.equal(dict(named)[n].grad, before[n])  # .grad only read
    acc.reset()
    assert acc.moments() is None and acc.count == 0


def test_fewer_than_two_micro_batches_give_no_moments() -> None:
    model = _model()
    acc = AccumulatedMoments()
    _loss(model, torch.tensor([[0, 1]])).backward()
    acc.observe(list(model.named_parameters()))
    assert acc.moments() is None
