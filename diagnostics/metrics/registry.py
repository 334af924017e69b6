"""Registry of diagnostics by name, and presets by cost.

A diagnostic joins the registry by decorating its class with :func:`register` in any module of the
``diagnostics.metrics`` package; every such module is imported on first use of the registry, so a new
family only needs a new file. Presets follow each class's ``preset`` attribute: ``cheap`` holds the
classes whose preset is "cheap", ``standard`` adds those marked "standard", ``full`` holds everything.

A *variant* (``@register(variant_of="hessian_top")``) is a registered class that needs something a preset
cannot assume: the ``ggn_*`` twins of the curvature diagnostics need a loss with ``forward`` and
``criterion`` (e.g. :class:`~diagnostics.loss.ClassificationLoss`). It is selected by name only and is in
no preset; :func:`variants` lists them.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, overload

from diagnostics.errors import ConfigError
from diagnostics.metrics.base import PRESETS, REQUIREMENTS, Diagnostic

_REGISTRY: dict[str, type[Diagnostic]] = {}
# name -> (class, name of the diagnostic it is a variant of)
_VARIANTS: dict[str, tuple[type[Diagnostic], str]] = {}
_LOADED = False
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# Modules of the package that hold no diagnostics (or are being imported right now).
_SKIP = {"base", "registry", "__init__"}


@overload
def register(cls: type[Diagnostic]) -> type[Diagnostic]: ...


@overload
def register(*, variant_of: str) -> Any: ...


def register(cls: type[Diagnostic] | None = None, *, variant_of: str | None = None) -> Any:
    """Class decorator adding a Diagnostic subclass to the registry under ``cls.name``.

    Checks that the name is snake_case and unique, ``requires`` is a subset of REQUIREMENTS and ``preset``
    is one of cheap/standard/full. Returns the class unchanged. ``@register(variant_of="other")``
    registers a variant of ``other``: selectable by name, in no preset (see the module docstring).
    """
    if cls is None:
        return lambda c: _add(c, variant_of)
    return _add(cls, variant_of)


def _add(cls: type[Diagnostic], variant_of: str | None) -> type[Diagnostic]:
    if not (isinstance(cls, type) and issubclass(cls, Diagnostic)):
        raise ConfigError(f"register() takes a Diagnostic subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{cls.__name__}.name must be a snake_case string, got {name!r}")
    unknown = set(cls.requires) - REQUIREMENTS
    if unknown:
        raise ConfigError(f"{cls.__name__}.requires has unknown entries {sorted(unknown)}; valid: {sorted(REQUIREMENTS)}")
    if cls.preset not in PRESETS:
        raise ConfigError(f"{cls.__name__}.preset must be one of {PRESETS}, got {cls.preset!r}")
    existing = _REGISTRY.get(name) or _VARIANTS.get(name, (None, ""))[0]
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ConfigError(f"diagnostic name {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
    if variant_of is None:
        _REGISTRY[name] = cls
    else:
        _VARIANTS[name] = (cls, variant_of)
    return cls


def _load() -> None:
    """Import every module of diagnostics.metrics once so their @register decorators run."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import diagnostics.metrics as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name in _SKIP or info.name.startswith("_"):
            continue
        try:
            importlib.import_module(f"{pkg.__name__}.{info.name}")
        except ImportError as exc:
            # One family with a missing optional dependency must not take the others down.
            warnings.warn(f"diagnostics.metrics.{info.name} not loaded: {exc}", RuntimeWarning, stacklevel=2)


def registry() -> dict[str, type[Diagnostic]]:
    """A copy of ``{name: class}`` for every registered diagnostic."""
    _load()
    return dict(_REGISTRY)


def available_diagnostics() -> list[str]:
    """Sorted names of every registered diagnostic (variants excepted: see :func:`variants`)."""
    _load()
    return sorted(_REGISTRY)


def variants() -> dict[str, type[Diagnostic]]:
    """``{name: class}`` of the registered variants, selectable by name and in no preset."""
    _load()
    return {n: c for n, (c, _) in _VARIANTS.items()}


def preset_names(preset: str) -> list[str]:
    """Names in a preset: cheap < standard < full by each class's ``preset`` attribute."""
    _load()
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    level = PRESETS.index(preset)
    return sorted(n for n, c in _REGISTRY.items() if PRESETS.index(c.preset) <= level)


def _unknown(name: str) -> ConfigError:
    return ConfigError(
        f"unknown diagnostic {name!r}; valid names: {', '.join(available_diagnostics())} "
        f"(variants: {', '.join(sorted(_VARIANTS))}; or a preset: {', '.join(PRESETS)})"
    )


def get_diagnostic(name: str, **options: Any) -> Diagnostic:
    """Instantiate the diagnostic registered as ``name`` with ``options`` (e.g. ``every=10``).

    ``action=`` ("record" | "warn" | "checkpoint" | "stop" | callable) is accepted by every diagnostic:
    it is set on the instance and read by the Monitor for the diagnostic's warning events.
    """
    _load()
    cls = _REGISTRY.get(name) or _VARIANTS.get(name, (None, ""))[0]
    if cls is None:
        raise _unknown(name)
    action = options.pop("action", None)
    try:
        inst = cls(**options)
    except TypeError as exc:
        raise ConfigError(f"bad options for diagnostic {name!r}: {exc}") from exc
    if action is not None:
        inst.action = action  # type: ignore[attr-defined]
    return inst


def resolve_diagnostics(spec: Any) -> list[Diagnostic]:
    """Turn a user's diagnostics spec into instances, in a stable order with no duplicate names.

    Args:
        spec: a preset name ("cheap" | "standard" | "full"), a diagnostic name, a Diagnostic instance or
            class, a mapping ``{name: options dict}``, or a list mixing names, presets, instances and classes.

    Returns:
        A list of Diagnostic instances. Raises ConfigError listing the valid names for an unknown name and
        for a name given twice.
    """
    _load()
    out: list[Diagnostic] = []

    def add(d: Diagnostic) -> None:
        if any(o.name == d.name for o in out):
            raise ConfigError(f"diagnostic {d.name!r} is given twice; give it once (options go in one place)")
        out.append(d)

    def visit(item: Any) -> None:
        if isinstance(item, Diagnostic):
            add(item)
        elif isinstance(item, type) and issubclass(item, Diagnostic):
            add(item())
        elif isinstance(item, str):
            if item in PRESETS:
                for n in preset_names(item):
                    if not any(o.name == n for o in out):
                        out.append(get_diagnostic(n))
            else:
                add(get_diagnostic(item))
        elif isinstance(item, Mapping):
            for name, opts in item.items():
                if opts is not None and not isinstance(opts, Mapping):
                    raise ConfigError(f"options for diagnostic {name!r} must be a dict, got {type(opts).__name__}")
                add(get_diagnostic(name, **dict(opts or {})))
        elif isinstance(item, Iterable):
            for x in item:
                visit(x)
        else:
            raise ConfigError(
                f"diagnostics must be a preset name, diagnostic names or Diagnostic instances, got {item!r}"
            )

    if spec is None:
        spec = "standard"
    visit(spec)
    if not out:
        raise ConfigError("no diagnostics selected; give a preset (cheap, standard, full) or names")
    return order_by_dependencies(out)


def order_by_dependencies(diags: list[Diagnostic]) -> list[Diagnostic]:
    """Stable order in which each diagnostic runs after those named in its ``after`` class attribute.

    A diagnostic that reads what another shares through the StepContext (``ctx.top_eigenspace``,
    ``ctx.trace``, ``ctx.alignment_statistics``) declares
    ``after: ClassVar[tuple[str, ...]] = ("other_name",)``; names not selected are ignored. Raises
    ConfigError on a cycle.
    """
    by_name = {d.name: d for d in diags}
    done: list[Diagnostic] = []
    placed: set[str] = set()
    visiting: set[str] = set()

    def place(d: Diagnostic) -> None:
        if d.name in placed:
            return
        if d.name in visiting:
            raise ConfigError(f"diagnostics depend on each other in a cycle through {d.name!r} (see their 'after')")
        visiting.add(d.name)
        for dep in getattr(d, "after", ()) or ():
            if dep in by_name:
                place(by_name[dep])
        visiting.discard(d.name)
        placed.add(d.name)
        done.append(d)

    for d in diags:
        place(d)
    return done
