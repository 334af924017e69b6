"""Registry, presets and spec resolution."""

from __future__ import annotations

from typing import Any

import pytest

from diagnostics.errors import ConfigError
from diagnostics.metrics import (
    Diagnostic,
    available_diagnostics,
    get_diagnostic,
    preset_names,
    register,
    registry,
    resolve_diagnostics,
)

CHEAP = {"loss", "learning_rate", "grad_norm", "weight_norm", "update_ratio", "nonfinite"}


def test_presets_nest_and_follow_the_preset_attribute() -> None:
    cheap, standard, full = (set(preset_names(p)) for p in ("cheap", "standard", "full"))
    assert cheap == CHEAP
    assert cheap < standard < full or (cheap < standard and standard <= full)
    assert {"gsnr", "weight_rank", "grad_rank", "activation_rank"} <= standard
    assert "gsnr_microbatch" in full and "gsnr_microbatch" not in standard
    assert full == set(available_diagnostics())
    for name, cls in registry().items():
        assert (name in standard) == (cls.preset in ("cheap", "standard"))


def test_standard_schedules() -> None:
    by_name = {d.name: d for d in resolve_diagnostics("standard")}
    assert all(by_name[n].every == 1 for n in CHEAP)
    assert all(by_name[n].every == 50 for n in ("gsnr", "weight_rank", "grad_rank", "activation_rank"))


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        get_diagnostic("sparkle")
    msg = str(info.value)
    for name in available_diagnostics():
        assert name in msg
    with pytest.raises(ConfigError, match="valid names"):
        resolve_diagnostics(["loss", "sparkle"])


def test_resolve_forms() -> None:
    ds = resolve_diagnostics(["cheap", {"gsnr": {"every": 7}}, "weight_rank"])
    names = [d.name for d in ds]
    assert set(names) == CHEAP | {"gsnr", "weight_rank"} and len(names) == len(set(names))
    assert next(d for d in ds if d.name == "gsnr").every == 7
    with pytest.raises(ConfigError, match="given twice"):
        resolve_diagnostics(["loss", "loss"])
    with pytest.raises(ConfigError, match="bad options"):
        get_diagnostic("loss", colour="red")
    with pytest.raises(ConfigError, match="positive"):
        get_diagnostic("loss", every=0)
    assert get_diagnostic("loss", action="stop").action == "stop"


def test_register_validates() -> None:
    class Bad(Diagnostic):
        name = "Bad Name"

        def compute(self, ctx: Any) -> list:
            return []

    with pytest.raises(ConfigError, match="snake_case"):
        register(Bad)

    class BadReq(Diagnostic):
        name = "bad_req"
        requires = frozenset({"telepathy"})

        def compute(self, ctx: Any) -> list:
            return []

    with pytest.raises(ConfigError, match="telepathy"):
        register(BadReq)

    class Clash(Diagnostic):
        name = "loss"

        def compute(self, ctx: Any) -> list:
            return []

    with pytest.raises(ConfigError, match="already registered"):
        register(Clash)


def test_dependencies_run_first() -> None:
    from diagnostics.metrics.registry import order_by_dependencies

    class Producer(Diagnostic):
        name = "producer_x"

        def compute(self, ctx: Any) -> list:
            return []

    class Consumer(Diagnostic):
        name = "consumer_x"
        after = ("producer_x", "not_selected")

        def compute(self, ctx: Any) -> list:
            return []

    ordered = order_by_dependencies([Consumer(), get_diagnostic("loss"), Producer()])
    assert [d.name for d in ordered] == ["producer_x", "consumer_x", "loss"]

    class Loop(Diagnostic):
        name = "loop_x"
        after = ("loop_x",)

        def compute(self, ctx: Any) -> list:
            return []

    with pytest.raises(ConfigError, match="cycle"):
        order_by_dependencies([Loop()])
