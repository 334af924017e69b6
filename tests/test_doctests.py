"""Every doctest in the package runs: diagnostics/, cli/ (diagnostics.cli) and reports/ (diagnostics.reports).

Modules are found on disk through setuptools' package-dir mapping (pyproject.toml) and imported under
their installed names; only modules whose source holds a ``>>>`` prompt are imported, so collecting
these tests imports nothing and modules that need optional frameworks (Lightning, transformers, wandb,
mlflow) are only imported if they grow a doctest. A module whose import needs a missing optional
dependency is skipped with its name. The option flags are pytest's ``doctest_optionflags`` from
pyproject.toml, so ``pytest --doctest-modules`` on a single file behaves the same.
"""

from __future__ import annotations

import doctest
import importlib
import io
import re
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10; import-linter depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
_PROMPT = re.compile(r"^\s*>>> ", re.M)


def _modules_with_doctests() -> list[str]:
    """Installed names of the modules whose source holds a doctest prompt, from the package-dir mapping."""
    out = set()
    for package, directory in PYPROJECT["tool"]["setuptools"]["package-dir"].items():
        base = ROOT / directory
        for path in base.rglob("*.py"):
            parts = [package, *path.relative_to(base).with_suffix("").parts]
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts.pop()
            if _PROMPT.search(path.read_text(encoding="utf-8")):
                out.add(".".join(parts))
    return sorted(out)


def _optionflags() -> int:
    names = PYPROJECT["tool"]["pytest"]["ini_options"].get("doctest_optionflags", "")
    flags = 0
    for name in names.split():
        flags |= doctest.OPTIONFLAGS_BY_NAME[name]
    return flags


MODULES = _modules_with_doctests()


def test_doctests_are_found():
    # The catalogue's and the linear algebra's examples at least; an empty list means discovery broke.
    assert "diagnostics.store.catalog" in MODULES and "diagnostics.linalg.lanczos" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and not exc.name.startswith("diagnostics"):
            pytest.skip(f"{name} needs the optional dependency {exc.name}")
        raise
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=_optionflags())
    out = io.StringIO()
    for test in finder.find(module, name):
        runner.run(test, out=out.write)
    assert runner.tries > 0, f"{name} has a '>>>' prompt but no doctest was found in it"
    assert runner.failures == 0, out.getvalue()
