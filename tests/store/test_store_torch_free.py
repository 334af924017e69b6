"""diagnostics.store imports and works with torch made unimportable."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys

    class BlockTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
            return None

    sys.meta_path.insert(0, BlockTorch())
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker did not work")

    import diagnostics.store as store
    from diagnostics.testing.synthetic import write_synthetic_run

    target = sys.argv[1]
    with store.RunWriter(target + "/a") as w:
        w.write_step(0, [store.Record("loss", 1.0)], [store.Event("nonfinite", "x")], [store.Status("basics")])
    write_synthetic_run(target + "/b", steps=25, layers=1)
    runs = store.open_runs([target + "/a", target + "/b"])
    assert len(runs.series("loss")) == 26
    store.combine_runs([target + "/a", target + "/b"], target + "/c")
    assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch got imported"
    print("ok")
    """
)


def test_store_works_without_torch(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
