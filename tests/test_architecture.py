"""The package's shape: import contracts, no import cycles, no module over 600 lines, no dangling citations.

The import contracts live in pyproject.toml (``[tool.importlinter]``) and are explained in
docs/architecture.md. import-linter (through grimp) finds a package's modules by walking its directory,
but setuptools installs ``cli/`` as ``diagnostics.cli`` and ``reports/`` as ``diagnostics.reports``
(``[tool.setuptools] package-dir``), which an editable install maps without moving files. So these
tests copy the sources into a temporary tree laid out as installed and analyse that copy in a
subprocess: the contracts then see every module under the name it is imported by.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10; import-linter depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
CONTRACT_IDS = [c["id"] for c in PYPROJECT["tool"]["importlinter"]["contracts"]]
#: Source directories whose modules count for the size rule.
SOURCE_DIRS = ("diagnostics", "cli", "reports")
MAX_LINES = 600


def _package_dirs() -> dict[str, Path]:
    """``{import name: source directory}`` from setuptools' package-dir, outermost package first."""
    mapping = PYPROJECT["tool"]["setuptools"]["package-dir"]
    return {name: ROOT / path for name, path in sorted(mapping.items(), key=lambda kv: kv[0].count("."))}


@pytest.fixture(scope="module")
def installed_tree(tmp_path_factory) -> Path:
    """A copy of the sources laid out as installed: ``diagnostics/cli``, ``diagnostics/reports``."""
    dest = tmp_path_factory.mktemp("installed")
    for name, src in _package_dirs().items():
        shutil.copytree(src, dest / name.replace(".", os.sep), dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _run_in(tree: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    # The copy must shadow the editable install: it goes first on the path and is the working directory.
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(args, cwd=tree, env=env, capture_output=True, text=True, timeout=300)


def _lint_imports() -> str:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports not found: install the test extra (pip install -e '.[test]')")
    return exe


@pytest.mark.parametrize("contract", CONTRACT_IDS)
def test_import_contract(installed_tree, contract):
    """Each contract of pyproject.toml holds; a failure prints import-linter's chains of offending imports."""
    res = _run_in(installed_tree, [_lint_imports(), "--no-logo", "--contract", contract,
                                   "--cache-dir", str(installed_tree / ".import_linter_cache"),
                                   str(ROOT / "pyproject.toml")])
    assert res.returncode == 0, f"import contract {contract!r} is broken:\n{res.stdout}\n{res.stderr}"


_CYCLES = r"""
import json, grimp

graph = grimp.build_graph("diagnostics", exclude_type_checking_imports=True, cache_dir=None)
packages = {m for m in graph.modules if graph.find_children(m)}
edges = {
    m: sorted(i for i in graph.find_modules_directly_imported_by(m)
              if not (m in packages and i.startswith(m + ".")))
    for m in graph.modules
}
# Tarjan's strongly connected components, iteratively.
index, low, on_stack, stack, components, counter = {}, {}, set(), [], [], 0
for root in sorted(edges):
    if root in index:
        continue
    work = [(root, iter(edges[root]))]
    index[root] = low[root] = counter; counter += 1; stack.append(root); on_stack.add(root)
    while work:
        node, children = work[-1]
        child = next(children, None)
        if child is not None:
            if child not in index:
                index[child] = low[child] = counter; counter += 1; stack.append(child); on_stack.add(child)
                work.append((child, iter(edges[child])))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
            continue
        work.pop()
        if work:
            low[work[-1][0]] = min(low[work[-1][0]], low[node])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop(); on_stack.discard(member); component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges[node]:
                components.append(sorted(component))
print(json.dumps([[(a, b) for a in c for b in edges[a] if b in c] for c in components]))
"""


def test_no_import_cycles(installed_tree):
    """No two modules import each other, directly or through others (strongly connected components).

    The rule: an edge is a static import anywhere in a module (top level or inside a function, since
    a deferred import is still a dependency), except

    - imports under ``if TYPE_CHECKING:``, which never run; annotations may refer back;
    - imports from a package's ``__init__`` of the package's own submodules: re-exporting its
      submodules is what an ``__init__`` is for, and Python runs it before any submodule anyway, so
      ``pkg -> pkg.a -> pkg`` is how every package works rather than a cycle between modules.

    A submodule that imports its own package (``from diagnostics.metrics import X``) still counts, as
    does everything between modules of different packages. A cycle is reported as its import edges.
    """
    res = _run_in(installed_tree, [sys.executable, "-c", _CYCLES])
    assert res.returncode == 0, res.stderr
    cycles = json.loads(res.stdout)
    text = "\n".join("cycle: " + ", ".join(f"{a} -> {b}" for a, b in sorted(c)) for c in cycles)
    assert not cycles, f"import cycles between modules:\n{text}"


def test_no_module_over_600_lines():
    too_long = {}
    for top in SOURCE_DIRS:
        for path in sorted((ROOT / top).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            n = len(path.read_text(encoding="utf-8").splitlines())
            if n > MAX_LINES:
                too_long[str(path.relative_to(ROOT))] = n
    assert not too_long, f"modules over {MAX_LINES} lines (split them by concept): {too_long}"


# --- citations -------------------------------------------------------------------------------------------

_CITED = re.compile(r"(?<![\w/.:-])((?:[\w.-]+/)*[\w-][\w.-]*\.md)\b")
_CITING = ("README.md", "pyproject.toml", "Makefile", "docs", "diagnostics", "cli", "reports", "benchmarks",
           "examples", "tests")


def _citing_files() -> list[Path]:
    out = []
    for entry in _CITING:
        p = ROOT / entry
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out += [f for f in sorted(p.rglob("*")) if f.suffix in (".py", ".md", ".toml")
                    and "__pycache__" not in f.parts and "gold" not in f.parts]
    return out


def test_cited_documents_exist():
    """Every Markdown document a file names exists in the repository: the repository cites only itself.

    A name resolves against the citing file's directory or any directory above it up to the root: a
    page of docs/ names its neighbours by file name, the README names them with the docs/ prefix, a
    benchmark script names the results file of its directory or of benchmarks/.
    """
    missing = []
    for path in _citing_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in _CITED.finditer(text):
            ref = m.group(1)
            bases = [path.parent, *[d for d in path.parent.parents if d == ROOT or ROOT in d.parents]]
            if not any((base / ref).is_file() for base in bases):
                line = text.count("\n", 0, m.start()) + 1
                missing.append(f"{path.relative_to(ROOT)}:{line}: {ref}")
    assert not missing, "citations of documents that are not in the repository:\n" + "\n".join(missing)
