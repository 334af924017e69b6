"""Resolve user specifications ("module:attr", "path/to/file.py:attr", zoo names) into objects.

A *spec* is how the command line names Python objects without the user writing glue code:

- ``package.module:attr``: imported with :func:`importlib.import_module`, then ``attr`` is looked up
  (dotted attributes such as ``Outer.build`` are allowed);
- ``path/to/file.py:attr``: the file is executed as a fresh module, then ``attr`` is looked up;
- a built-in name from :mod:`diagnostics.zoo` (``mlp-digits``, ``tiny-gpt``, ``digits``, ``pydoc-text``, ...);
- ``hf:DIR`` (models only): a Hugging Face model built from the ``config.json`` in ``DIR`` (needs
  ``transformers``; the weights come from the checkpoints).

The object may be the thing itself (a model, a list of batches, a loss function), a class, or a factory
function; classes and factories are called without arguments. Every failure raises
:class:`~diagnostics.errors.SpecError` naming the part that failed: the module, the file, the attribute,
or what the object turned out to be.

A TOML config file (:func:`load_config`) can hold the same options as the ``tdiag analyze`` flags;
flags given on the command line override it (:func:`merge_options`).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import itertools
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import tomllib

from diagnostics.errors import ConfigError, DiagnosticsError, SpecError

__all__ = [
    "load_object",
    "resolve_model",
    "resolve_data",
    "resolve_loss",
    "load_config",
    "merge_options",
    "CONFIG_KEYS",
]

_ATTR_SEPARATOR = ":"


def _split(spec: str, what: str) -> tuple[str, str]:
    spec = spec.strip()
    # Windows drive letters ("C:\\x.py:attr") contain a colon too: split on the last one.
    head, sep, attr = spec.rpartition(_ATTR_SEPARATOR)
    if not sep or not head or not attr:
        raise SpecError(
            f"{what} spec {spec!r} is not of the form 'package.module:attr' or 'path/to/file.py:attr'"
        )
    return head, attr


def _import_module(name: str, spec: str, what: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):
            raise SpecError(
                f"{what} spec {spec!r}: module {name!r} not found (is it installed, or on PYTHONPATH?)"
            ) from None
        # The module exists but one of its own imports failed: say which.
        raise SpecError(f"{what} spec {spec!r}: importing module {name!r} failed: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - user code may raise anything while importing
        raise SpecError(
            f"{what} spec {spec!r}: importing module {name!r} raised {type(exc).__name__}: {exc}"
        ) from None


def _load_file(path_text: str, spec: str, what: str, base_dir: Path | None) -> Any:
    path = Path(path_text).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        raise SpecError(f"{what} spec {spec!r}: file {str(path)!r} not found")
    path = path.resolve()
    # A name that cannot clash with real modules, stable per file so two loads give the same classes.
    module_name = f"_tdiag_user_{abs(hash(str(path))):x}_{path.stem}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise SpecError(f"{what} spec {spec!r}: file {str(path)!r} cannot be loaded as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    # Let the file import its siblings, as it would when run as a script.
    sys.path.insert(0, str(path.parent))
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - user code may raise anything
        sys.modules.pop(module_name, None)
        raise SpecError(
            f"{what} spec {spec!r}: running file {str(path)!r} raised {type(exc).__name__}: {exc}"
        ) from None
    finally:
        try:
            sys.path.remove(str(path.parent))
        except ValueError:
            pass
    return module


def load_object(spec: str, *, what: str = "object", base_dir: str | Path | None = None) -> Any:
    """Import the object a ``module:attr`` or ``file.py:attr`` spec names (without calling it).

    Args:
        spec: ``package.module:attr`` or ``path/to/file.py:attr``; ``attr`` may be dotted.
        what: what the object is for ("model", "data", "loss"), used in error messages.
        base_dir: directory that relative file paths are taken from (the config file's directory).

    Returns:
        The attribute's value.

    Raises:
        SpecError: naming the module not found, the file missing, or the attribute missing.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"{what} spec must be a non-empty string, got {spec!r}")
    head, attr = _split(spec, what)
    base = Path(base_dir) if base_dir is not None else None
    if head.endswith(".py") or "/" in head or "\\" in head:
        module = _load_file(head, spec, what, base)
        where = f"file {head!r}"
    else:
        module = _import_module(head, spec, what)
        where = f"module {head!r}"
    obj: Any = module
    for part in attr.split("."):
        if not part.isidentifier() or not hasattr(obj, part):
            available = sorted(n for n in dir(module) if not n.startswith("_"))[:12]
            raise SpecError(
                f"{what} spec {spec!r}: {where} has no attribute {attr!r}"
                + (f" (it has: {', '.join(available)})" if available else "")
            )
        obj = getattr(obj, part)
    return obj


def _call_factory(obj: Any, spec: str, what: str, **kwargs: Any) -> Any:
    """Call a class or factory with those of ``kwargs`` its signature accepts."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        signature = None
    accepted: dict[str, Any] = {}
    if signature is not None:
        params = signature.parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        accepted = {k: v for k, v in kwargs.items() if v is not None and (takes_any or k in params)}
        required = [
            name
            for name, p in params.items()
            if p.default is inspect.Parameter.empty
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            and name not in accepted
        ]
        if required:
            raise SpecError(
                f"{what} spec {spec!r}: {getattr(obj, '__name__', obj)!r} needs argument(s) "
                f"{', '.join(required)}; point the spec at a factory that takes none"
            )
    try:
        return obj(**accepted)
    except DiagnosticsError:
        raise
    except Exception as exc:  # noqa: BLE001 - user code may raise anything
        raise SpecError(
            f"{what} spec {spec!r}: calling {getattr(obj, '__name__', obj)!r} raised "
            f"{type(exc).__name__}: {exc}"
        ) from None


def _zoo() -> Any:
    return importlib.import_module("diagnostics.zoo")


def _zoo_names(kind: str) -> list[str]:
    try:
        zoo = _zoo()
    except ImportError:
        return []
    names = getattr(zoo, "MODELS" if kind == "model" else "DATASETS", {})
    return sorted(names)


def _not_a_spec(spec: str, what: str) -> SpecError:
    names = _zoo_names(what)
    built_in = f"; built-in {what}s: {', '.join(names)}" if names else ""
    return SpecError(
        f"{what} spec {spec!r} is neither a built-in name nor of the form 'package.module:attr' "
        f"or 'path/to/file.py:attr'{built_in}"
    )


def _is_module(obj: Any) -> bool:
    import torch

    return isinstance(obj, torch.nn.Module)


def _hf_model(directory: str, spec: str, base_dir: Path | None) -> Any:
    path = Path(directory).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    try:
        transformers = importlib.import_module("transformers")
    except ImportError:
        raise SpecError(
            f"model spec {spec!r}: 'hf:' models need the transformers package (pip install transformers)"
        ) from None
    if not (path / "config.json").is_file():
        raise SpecError(f"model spec {spec!r}: {str(path)!r} has no config.json")
    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
        architectures = getattr(config, "architectures", None) or []
        for name in architectures:
            cls = getattr(transformers, name, None)
            if cls is not None:
                return cls(config)
        return transformers.AutoModel.from_config(config)
    except Exception as exc:  # noqa: BLE001
        raise SpecError(
            f"model spec {spec!r}: building the model raised {type(exc).__name__}: {exc}"
        ) from None


def resolve_model(spec: Any, *, base_dir: str | Path | None = None) -> Any:
    """Build the model a spec names.

    Args:
        spec: a zoo name, ``hf:DIR``, ``module:attr`` / ``file.py:attr`` naming an ``nn.Module`` instance,
            a class, or a factory taking no required arguments; or an ``nn.Module`` itself.
        base_dir: directory that relative file paths are taken from.

    Returns:
        An ``nn.Module`` (on CPU, as built). Cost: one construction of the model.

    Raises:
        SpecError: the spec does not resolve, or resolves to something that is not an ``nn.Module``.
    """
    if _is_module(spec):
        return spec
    if not isinstance(spec, str):
        raise SpecError(f"model spec must be a string, got {type(spec).__name__}")
    if spec in _zoo_names("model"):
        return _zoo().get_model(spec)
    if spec.startswith("hf:"):
        return _hf_model(spec[3:], spec, Path(base_dir) if base_dir else None)
    if _ATTR_SEPARATOR not in spec:
        raise _not_a_spec(spec, "model")
    obj = load_object(spec, what="model", base_dir=base_dir)
    if _is_module(obj):
        return obj
    if not callable(obj):
        raise SpecError(f"model spec {spec!r}: {type(obj).__name__} object is not a model and not callable")
    model = _call_factory(obj, spec, "model")
    if not _is_module(model):
        raise SpecError(
            f"model spec {spec!r}: calling it returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _is_batch_source(obj: Any) -> bool:
    """An iterable that yields batches: not a string/bytes/mapping (those are single values)."""
    if isinstance(obj, (str, bytes, Mapping)):
        return False
    return isinstance(obj, Iterable)


def _as_loader(obj: Any, batch_size: int | None) -> Any:
    """Wrap a map-style torch Dataset (samples, not batches) in a DataLoader."""
    import torch.utils.data as tud

    if isinstance(obj, tud.Dataset) and not isinstance(obj, tud.IterableDataset) and hasattr(obj, "__len__"):
        return tud.DataLoader(obj, batch_size=batch_size or 32, shuffle=False)
    return obj


def resolve_data(
    spec: Any,
    *,
    batch_size: int | None = None,
    num_batches: int | None = None,
    seed: int = 0,
    base_dir: str | Path | None = None,
) -> list[Any]:
    """Resolve a data spec into a fixed list of batches.

    The list is materialised once so that every checkpoint is measured on exactly the same batches
    (curvature estimators assume a fixed operator).

    Args:
        spec: a zoo dataset name, or a ``module:attr`` / ``file.py:attr`` spec naming an iterable of
            batches (a DataLoader, a list of ``(inputs, targets)``), a map-style Dataset (wrapped in a
            DataLoader of ``batch_size``), or a function or class returning one. Factories receive
            ``batch_size``, ``num_batches`` and ``seed`` when their signature accepts them.
        batch_size: batch size for zoo datasets, datasets and factories that accept it.
        num_batches: keep only the first this many batches (all when None).
        seed: seed passed to zoo datasets and factories that accept it.
        base_dir: directory that relative file paths are taken from.

    Returns:
        A non-empty list of batches. Cost: iterating the source for ``num_batches`` batches.

    Raises:
        SpecError: the spec does not resolve, or resolves to something that yields no batches.
        ConfigError: ``batch_size`` or ``num_batches`` is not positive.
    """
    for name, value in (("batch size", batch_size), ("number of batches", num_batches)):
        if value is not None and int(value) < 1:
            raise ConfigError(f"the {name} must be a positive integer, got {value}")
    kwargs = {"batch_size": batch_size, "num_batches": num_batches, "seed": seed}
    label = spec if isinstance(spec, str) else type(spec).__name__
    if isinstance(spec, str):
        if spec in _zoo_names("data"):
            source = _call_factory(_zoo().get_data, spec, "data", name=spec, **kwargs)
        elif _ATTR_SEPARATOR not in spec:
            raise _not_a_spec(spec, "data")
        else:
            obj = load_object(spec, what="data", base_dir=base_dir)
            if _is_batch_source(obj) and not inspect.isclass(obj):
                source = obj
            elif callable(obj):
                source = _call_factory(obj, spec, "data", **kwargs)
            else:
                raise SpecError(
                    f"data spec {spec!r}: {type(obj).__name__} object is neither an iterable of batches "
                    "nor a function returning one"
                )
    else:
        source = spec
    source = _as_loader(source, batch_size)
    if not _is_batch_source(source):
        raise SpecError(
            f"data spec {label!r}: resolved to {type(source).__name__}, not an iterable of batches"
        )
    try:
        batches = list(itertools.islice(iter(source), num_batches))
    except Exception as exc:  # noqa: BLE001 - user iterables may raise anything
        raise SpecError(f"data spec {label!r}: iterating it raised {type(exc).__name__}: {exc}") from None
    if not batches:
        raise SpecError(f"data spec {label!r}: yields no batches")
    return batches


def resolve_loss(spec: Any, *, base_dir: str | Path | None = None) -> Callable[..., Any] | None:
    """Resolve a loss spec into ``loss_fn(model, batch) -> scalar``.

    Args:
        spec: None (the library's default loss is used downstream), ``default``, a ``module:attr`` /
            ``file.py:attr`` spec naming a loss function, a loss object, or a class instantiated without
            arguments; or a callable itself.
        base_dir: directory that relative file paths are taken from.

    Returns:
        The callable, or None for the default loss.

    Raises:
        SpecError: the spec does not resolve, or resolves to something that is not callable.
    """
    if spec is None or spec == "default":
        return None
    if not isinstance(spec, str):
        if callable(spec):
            return spec
        raise SpecError(f"loss spec must be a string or a callable, got {type(spec).__name__}")
    if _ATTR_SEPARATOR not in spec:
        raise SpecError(
            f"loss spec {spec!r} is not of the form 'package.module:attr' or 'path/to/file.py:attr' "
            "(omit --loss for the default loss)"
        )
    obj = load_object(spec, what="loss", base_dir=base_dir)
    if inspect.isclass(obj):
        obj = _call_factory(obj, spec, "loss")
    if not callable(obj):
        raise SpecError(f"loss spec {spec!r}: {type(obj).__name__} object is not callable")
    return obj


# --------------------------------------------------------------------------- config files

#: Options a config file may hold, with their types. Names match the ``tdiag analyze`` flags
#: (dashes or underscores both accepted).
CONFIG_KEYS: dict[str, type | tuple[type, ...]] = {
    "checkpoints": (list, str),
    "model": str,
    "data": str,
    "loss": str,
    "diagnostics": (list, str),
    "batches": int,
    "batch_size": int,
    "device": str,
    "run": str,
    "force": bool,
    "unsafe_pickle": bool,
    "quiet": bool,
    "seed": int,
}

#: Options whose values are paths or file specs, taken relative to the config file's directory.
_PATH_KEYS = ("checkpoints", "run")
_SPEC_KEYS = ("model", "data", "loss")


def load_config(path: str | Path, *, section: str = "analyze") -> dict[str, Any]:
    """Read analysis options from a TOML file.

    The options sit at the top level or in an ``[analyze]`` table. Relative checkpoint and run paths,
    and file specs (``file.py:attr``), are taken relative to the config file's directory, so a config
    works from any working directory.

    Args:
        path: the TOML file.
        section: the table to read when present.

    Returns:
        A dict with keys from :data:`CONFIG_KEYS` (underscored).

    Raises:
        ConfigError: the file is missing, is not valid TOML, or holds an unknown key or a wrong type.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    if isinstance(data.get(section), dict):
        data = data[section]
    base = path.resolve().parent
    options: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if key not in CONFIG_KEYS:
            raise ConfigError(
                f"config file {str(path)!r}: unknown option {raw_key!r}; valid options: "
                + ", ".join(k.replace("_", "-") for k in CONFIG_KEYS)
            )
        expected = CONFIG_KEYS[key]
        # bool is an int subclass: do not accept `batches = true`.
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            names = (
                expected.__name__ if isinstance(expected, type) else " or ".join(t.__name__ for t in expected)
            )
            raise ConfigError(
                f"config file {str(path)!r}: option {raw_key!r} must be {names}, got {type(value).__name__}"
            )
        if key in ("checkpoints", "diagnostics") and isinstance(value, str):
            value = [value] if key == "checkpoints" else value
        if key in _PATH_KEYS:
            if isinstance(value, list):
                value = [_relative_to(str(v), base) for v in value]
            else:
                value = _relative_to(value, base)
        if key in _SPEC_KEYS:
            value = _spec_relative_to(value, base)
        options[key] = value
    return options


def _spec_relative_to(spec: str, base: Path) -> str:
    """Make the file part of ``file.py:attr`` (or ``hf:DIR``) absolute; leave module specs alone."""
    if spec.startswith("hf:"):
        return "hf:" + _relative_to(spec[3:], base)
    head, sep, attr = spec.rpartition(_ATTR_SEPARATOR)
    if sep and (head.endswith(".py") or "/" in head or "\\" in head):
        return f"{_relative_to(head, base)}:{attr}"
    return spec


def _relative_to(value: str, base: Path) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else base / p)


def merge_options(config: Mapping[str, Any] | None, flags: Mapping[str, Any]) -> dict[str, Any]:
    """Combine config-file options with command-line flags; flags that were given win.

    Args:
        config: options from :func:`load_config` (or None).
        flags: options from the command line; a value of None (or an empty tuple/list) means "not given".

    Returns:
        The merged options.
    """
    merged: dict[str, Any] = dict(config or {})
    for key, value in flags.items():
        if value is None or (isinstance(value, (tuple, list)) and len(value) == 0):
            continue
        merged[key] = list(value) if isinstance(value, tuple) else value
    return merged
