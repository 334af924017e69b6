"""Run a benchmark script with the library imported from another checkout, for before/after comparisons.

    git worktree add /tmp/before <commit>
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/run_from_tree.py /tmp/before benchmarks/overhead.py --rounds 3

The editable install's import finder is removed and ``TREE`` goes first on ``sys.path``, so
``import diagnostics`` loads ``TREE/diagnostics`` while the same virtual environment supplies torch and
the other dependencies. ``SCRIPT`` is taken relative to ``TREE`` when it is not absolute, so each side
runs its own version of the benchmark.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit("usage: run_from_tree.py TREE SCRIPT [ARGS...]")
    tree = Path(argv[0]).resolve()
    script = Path(argv[1]) if Path(argv[1]).is_absolute() else tree / argv[1]
    if not (tree / "diagnostics" / "__init__.py").is_file():
        raise SystemExit(f"{tree} is not a checkout of this repository (no diagnostics/__init__.py)")
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    for name in [m for m in sys.modules if m == "diagnostics" or m.startswith("diagnostics.")]:
        del sys.modules[name]
    sys.path.insert(0, str(tree))
    import diagnostics

    if not str(Path(diagnostics.__file__).resolve()).startswith(str(tree)):
        raise SystemExit(f"diagnostics was imported from {diagnostics.__file__}, not from {tree}")
    print(f"library: {diagnostics.__file__}", flush=True)
    sys.argv = [str(script), *argv[2:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
