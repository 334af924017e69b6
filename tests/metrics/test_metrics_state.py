"""The one declared-state mechanism: ``Diagnostic.state``, ``state_dict`` and ``load_state_dict``."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from diagnostics.errors import ConfigError
from diagnostics.metrics import Diagnostic, get_diagnostic
from diagnostics.metrics.context import StepContext


class Counter(Diagnostic):
    name = "counter_x"

    def compute(self, ctx: Any) -> list:
        self.state["calls"] = self.state.get("calls", 0) + 1
        return []


def test_state_is_an_instance_dict_and_state_dict_is_it() -> None:
    a, b = Counter(), Counter()
    a.compute(None)
    a.compute(None)
    assert a.state_dict() is a.state and a.state == {"calls": 2}
    assert b.state == {}  # one dict per instance, not per class
    b.load_state_dict(a.state_dict())
    assert b.state == {"calls": 2}


def test_load_state_dict_reads_the_layout_with_attrs_and_ctx() -> None:
    d = Counter()
    d.load_state_dict({"attrs": {"calls": 3}, "ctx": {"last": 7, "v1": {"fc": torch.ones(2)}}})
    assert d.state["calls"] == 3 and d.state["last"] == 7 and torch.equal(d.state["v1"]["fc"], torch.ones(2))
    d.load_state_dict({"attrs": {"calls": 4}})
    assert d.state["calls"] == 4 and d.state["last"] == 7
    d.load_state_dict(None)
    d.load_state_dict({})
    assert d.state["calls"] == 4


def test_builtin_state_lives_in_self_state() -> None:
    rank = get_diagnostic("activation_rank")
    assert rank.state == {"baseline": {}, "collapsed": []} and rank.baseline is rank.state["baseline"]
    rank.load_state_dict({"attrs": {"baseline": {"0": 3.0}, "collapsed": ["0"]}, "ctx": {}})
    assert rank.baseline == {"0": 3.0} and rank.collapsed == ["0"]


def test_spectral_alignment_keeps_v1_in_its_state_and_has_no_built_in_detector() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    d = get_diagnostic("spectral_alignment")
    ctx = StepContext(step=0, model=model, loss_fn=lambda m, b: m(b[0]).sum(), batch=(torch.randn(5, 4),), loss=None)
    d.compute(ctx)
    assert set(d.state["v1"]) == {"0"} and d.state["probes"] == 1
    assert set(ctx.alignment_statistics()) == {"0"}
    # measure(): the same statistics per map as those it publishes
    ctx = StepContext(step=1, model=model, loss_fn=lambda m, b: m(b[0]).sum(), batch=(torch.randn(5, 4),), loss=None)
    stats, _ = d.measure(ctx)
    assert stats == ctx.alignment_statistics() and set(stats["0"]) >= {"positive_fraction", "sigma1", "num_tokens"}
    with pytest.raises(ConfigError, match="detector"):
        get_diagnostic("spectral_alignment", detector=True)


def test_step_context_keeps_only_pre_update_norms_after_the_compute_phase() -> None:
    model = torch.nn.Linear(3, 2)
    model(torch.randn(4, 3)).sum().backward()
    ctx = StepContext(step=0, model=model, loss_fn=None, batch=None, loss=None)
    norms, weights = ctx.grad_norms(), ctx.weight_norms()
    published = {"lin": {"sign_diversity": 1.0}}
    ctx.publish_alignment_statistics(published)
    read = ctx.alignment_statistics()
    assert read == {"lin": {"sign_diversity": 1.0}} and ctx.alignment_statistics() is read
    read["lin"]["sign_diversity"] = 0.0  # a reader gets a copy: the published statistics stay as they were
    assert published == {"lin": {"sign_diversity": 1.0}}
    ctx.end_compute_phase()
    assert ctx.alignment_statistics() is None and ctx.top_eigenspace() is None
    assert ctx.grad_norms() is norms and ctx.weight_norms() is weights
    assert norms["all"] == pytest.approx(float(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()))
    ctx.clear()
    assert ctx.grad_norms() is not norms
