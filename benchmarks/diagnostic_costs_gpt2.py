"""Seconds of each diagnostic's call on GPT-2 small (124M parameters) on the CPU.

Hugging Face GPT-2 small (random weights, tied embedding, SDPA, dropout off, AdamW), 4 x 128 tokens of the
stdlib help texts, a Monitor with the named diagnostics every step (``every=1``, no budget) for
``--steps`` steps; prints each diagnostic's stored ``monitor_seconds`` per step (a table: diagnostics by
steps). Curvature diagnostics can be named too, but take minutes here.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/diagnostic_costs_gpt2.py activation_rank,grad_rank,weight_rank

``benchmarks/run_from_tree.py TREE $PWD/benchmarks/diagnostic_costs_gpt2.py NAMES`` runs it against another
checkout.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diagnostics.metrics.registry import registry
from diagnostics.store import open_run
from diagnostics.tracking import Monitor
from diagnostics.zoo.data import char_batches, pydoc_tokens


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    logits = model(input_ids=x).logits
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def main(argv: list[str] | None = None) -> int:
    import transformers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("diagnostics", help="comma-separated diagnostic names")
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    config = transformers.GPT2Config(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).float().train()
    data = list(char_batches(pydoc_tokens("train"), 4, 128, args.steps, seed=0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    diagnostics = [registry()[name](every=1) for name in args.diagnostics.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        monitor = Monitor(model, loss_fn, Path(tmp) / "run", diagnostics=diagnostics, optimizer=opt, budget=None)
        for step, batch in enumerate(data):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            loss.backward()
            t1 = time.perf_counter()
            monitor.step(step, batch, loss)
            t2 = time.perf_counter()
            opt.step()
            print(f"step {step}: forward+backward {t1 - t0:.2f} s, monitor.step {t2 - t1:.2f} s", flush=True)
        monitor.close()
        with open_run(Path(tmp) / "run") as run:
            seconds = run.series(metric="monitor_seconds")
    print(seconds.pivot_table(index="key", columns="step", values="value").round(3).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
