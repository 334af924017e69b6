"""benchmarks/gpu.py without a GPU: it imports on CPU, builds GPT-2 small from its config (on the meta
device), refuses to measure without CUDA, and runs end to end on a tiny model with ``--smoke``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"


@pytest.fixture()
def gpu_bench():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.ROWS.clear()
    return module


@pytest.mark.parametrize("model", ["hf", "zoo"])
def test_gpt2_small_from_config_has_124m_parameters(gpu_bench, model: str, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    if model == "hf":
        pytest.importorskip("transformers")
    assert gpu_bench.main(["--dry-run", "--model", model]) == 0
    assert "124,439,808 parameters" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_without_cuda_says_so(gpu_bench, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    assert gpu_bench.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_smoke_run_on_tiny_gpt2(gpu_bench, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    pytest.importorskip("transformers")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = gpu_bench.main(["--smoke", "--model", "hf", "--skip", "hvp", "--presets", "cheap", "--repeats", "1",
                               "--out", str(tmp_path / "table.out")])
    finally:
        torch.set_num_threads(before)
    assert code == 0
    table = (tmp_path / "table.out").read_text()
    assert "| top-10 eigenvalues | diagnostics lanczos (tol 1e-3) |" in table
    assert "| monitor cheap | amortised at default schedules |" in table
    ours = next(line for line in table.splitlines() if "diagnostics lanczos" in line)
    assert "failed" not in ours
