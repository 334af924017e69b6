"""Scoped hooks, state isolation and the StepContext cache."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from diagnostics._batch import detach_batch, slice_batch
from diagnostics._hooks import capture_inputs, capture_outputs, concat, select_modules
from diagnostics._state import IsolationError, eval_mode, fork_global_rng, isolated
from diagnostics.errors import ConfigError
from diagnostics.tracking import StepContext


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Dropout(0.5), nn.Linear(7, 3))


def test_select_modules_by_type_glob_and_predicate() -> None:
    m = net()
    assert list(select_modules(m)) == ["0", "3"]
    assert list(select_modules(m, "3")) == ["3"]
    assert list(select_modules(m, nn.ReLU)) == ["1"]
    assert list(select_modules(m, lambda n, mod: n == "2")) == ["2"]
    with pytest.raises(ConfigError, match="matches no submodule"):
        select_modules(m, "blocks.*")


def test_capture_respects_budget_and_removes_handles_even_on_error() -> None:
    m = net()
    outs: dict[str, list[torch.Tensor]] = {}
    ins: dict[str, list[torch.Tensor]] = {}
    mods = select_modules(m)
    with pytest.raises(RuntimeError, match="boom"):
        with capture_outputs(mods, outs, max_rows=10), capture_inputs(mods, ins, max_rows=10):
            m(torch.randn(64, 5))
            m(torch.randn(64, 5))  # second call: budget already full
            raise RuntimeError("boom")
    for mod in m.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks
    got = concat(outs)
    assert got["0"].shape == (10, 7) and got["3"].shape == (10, 3)
    assert concat(ins)["3"].shape == (10, 7)
    assert not got["0"].requires_grad


def test_capture_flattens_tokens() -> None:
    lin = nn.Linear(4, 6)
    outs: dict[str, list[torch.Tensor]] = {}
    with capture_outputs({"lin": lin}, outs, max_rows=None):
        lin(torch.randn(3, 5, 4))
    assert concat(outs)["lin"].shape == (15, 6)


def test_isolated_restores_rng_modes_and_grad_mode() -> None:
    m = net()
    m.train()
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    expect = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    with isolated(m):
        torch.rand(100)
        np.random.rand(100)
        random.random()
        m.eval()
        torch.set_grad_enabled(False)
    assert torch.is_grad_enabled()
    assert all(mod.training for mod in m.modules())
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expect[0], got[0]) and np.array_equal(expect[1], got[1]) and expect[2] == got[2]


def test_nested_forks_restore_every_stream_when_the_outermost_exits() -> None:
    m = net()
    torch.manual_seed(2)
    np.random.seed(2)
    random.seed(2)
    expect = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(2)
    np.random.seed(2)
    random.seed(2)
    with fork_global_rng():
        torch.rand(2)
        with isolated(m, "eval"), fork_global_rng():  # two levels below the outermost
            torch.rand(100)
            np.random.rand(100)
            random.random()
        np.random.rand(5)  # numpy's and Python's streams are left to the outermost fork
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expect[0], got[0]) and np.array_equal(expect[1], got[1]) and expect[2] == got[2]


def test_a_nested_fork_restores_torch_itself_and_the_depth_survives_an_error() -> None:
    with fork_global_rng():
        before = torch.random.get_rng_state()
        with pytest.raises(RuntimeError), fork_global_rng():
            torch.rand(10)
            raise RuntimeError("inside")
        assert torch.equal(torch.random.get_rng_state(), before)
    np.random.seed(3)
    expect = np.random.rand(2)
    np.random.seed(3)
    with fork_global_rng():  # outermost again after the error: numpy is saved and restored
        np.random.rand(7)
    assert np.array_equal(np.random.rand(2), expect)


def test_only_the_outermost_fork_saves_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = np.random.get_state
    monkeypatch.setattr(np.random, "get_state", lambda *a, **k: calls.append(1) or real(*a, **k))
    with fork_global_rng():
        for _ in range(3):
            with isolated(net(), "eval"):
                pass
    assert len(calls) == 1


def test_isolated_check_reports_mutation() -> None:
    m = net()
    with pytest.raises(IsolationError, match=r"params\[0.weight\]"):
        with isolated(m, check=True):
            with torch.no_grad():
                m[0].weight.add_(1.0)
    m = net()
    m(torch.randn(2, 5)).sum().backward()
    with pytest.raises(IsolationError, match=r"grads\[3.bias\]"):
        with isolated(m, check=True):
            m[3].bias.grad.zero_()
    with pytest.raises(IsolationError, match="requires_grad"):
        with isolated(m, check=True):
            m[0].bias.requires_grad_(False)


def test_eval_mode_restores_each_flag() -> None:
    m = net()
    m.train()
    m[2].eval()  # a user who froze one dropout
    with eval_mode(m):
        assert not any(mod.training for mod in m.modules())
    assert m.training and m[0].training and not m[2].training


def test_batch_helpers() -> None:
    x, y = torch.randn(6, 3, requires_grad=True), torch.arange(6)
    b = detach_batch({"x": x, "y": y, "meta": "keep"})
    assert not b["x"].requires_grad and b["meta"] == "keep" and b["x"].data_ptr() != x.data_ptr()
    part = slice_batch((x, y), 4, start=2)
    assert torch.equal(part[1], torch.tensor([2, 3]))


def test_step_context_caches_and_captures_in_eval_without_touching_rng() -> None:
    m = net()
    m.train()
    batch = (torch.randn(40, 5), torch.randint(0, 3, (40,)))
    calls = []

    def loss_fn(model: nn.Module, b: Any) -> torch.Tensor:
        calls.append(model.training)
        return nn.functional.cross_entropy(model(b[0]), b[1])

    ctx = StepContext(step=0, model=m, loss_fn=loss_fn, batch=batch, loss=None)
    state = torch.get_rng_state()
    acts = ctx.activations(max_tokens=16)
    ins = ctx.layer_inputs(max_tokens=16)
    assert calls == [False]  # one eval-mode forward serves both
    assert acts["0"].shape == (16, 7) and ins["3"].shape == (16, 7)
    assert torch.equal(state, torch.get_rng_state())
    assert m.training
    assert ctx.cached("k", lambda: 1) == 1 and ctx.cached("k", lambda: 2) == 1
    with pytest.raises(ConfigError, match="compute_after_update"):
        ctx.update()
