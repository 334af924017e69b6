"""benchmarks/curvature.py --model gpt2-smoke: the GPT-2 path (the same code as --model gpt2-small) on a tiny
config, in this process: our top-1 and the table printer."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "curvature_gpt2.py"


@pytest.fixture()
def bench():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("bench_curvature_gpt2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.mark.slow  # about 40 s: model build, 20 products
def test_gpt2_smoke_top1_and_table(bench, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    pytest.importorskip("transformers")
    results = tmp_path / "results.jsonl"
    before = torch.get_num_threads()
    try:
        bench.main(["--model", "gpt2-smoke", "--method", "ours", "--k", "1", "--tol", "1e-2", "--threads", "1",
                    "--basis-gib", "0.5", "--results", str(results)])
    finally:
        torch.set_num_threads(before)
    row = json.loads(results.read_text().splitlines()[0])
    assert row["P"] == 3_324_736 and row["task"] == "top-1" and row["converged"]
    assert row["eigenvalues"][0] > 0 and row["rel_residuals"][0] <= 1e-2
    assert row["maxrss_gib"] > 0
    bench.main(["--model", "gpt2-smoke", "--table", "--results", str(results)])
    assert "| top-1 | ours lanczos(k=1, tol=0.01) |" in capsys.readouterr().out
