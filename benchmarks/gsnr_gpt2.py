"""GSNR inside the Monitor on GPT-2 small (124M parameters) on the CPU: seconds per call and peak memory.

Model: ``transformers.GPT2LMHeadModel(GPT2Config())`` with dropout off, SDPA attention, the embedding tied
with the output layer, random weights (``torch.manual_seed(0)``), train mode, AdamW; nothing is
downloaded. Data: ``--batch`` x ``--seq`` tokens of the stdlib help texts (the project's 96-symbol
character encoding). A Monitor with ``loss`` and ``gsnr`` every step (``max_samples=--samples``): step 0
takes GSNR's own pass (nothing captured yet), step 1 reads the training step and checks it once against
the own pass on two samples, the later steps read the training step only. Prints, per step, the training
forward and backward, ``monitor.step`` and the peak resident memory of the process so far.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gsnr_gpt2.py [--steps 4] [--batch 4] [--seq 128]

About 10 GB of memory and 2-3 minutes at the defaults. ``benchmarks/run_from_tree.py TREE
$PWD/benchmarks/gsnr_gpt2.py`` runs it against another checkout.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diagnostics.metrics.gradient_stats import GSNRDiagnostic
from diagnostics.tracking import Monitor
from diagnostics.zoo.data import char_batches, pydoc_tokens


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    logits = model(input_ids=x).logits
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    import transformers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--samples", type=int, default=4, help="GSNR's max_samples")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    config = transformers.GPT2Config(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).float().train()
    data = list(char_batches(pydoc_tokens("train"), args.batch, args.seq, args.steps, seed=0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gsnr = GSNRDiagnostic(every=1, max_samples=args.samples)
    print(f"GPT-2 small, P = {sum(p.numel() for p in model.parameters()):,}, batch {args.batch} x {args.seq} tokens, "
          f"GSNR over {args.samples} samples, torch {torch.__version__}, 1 thread")
    with tempfile.TemporaryDirectory() as tmp:
        monitor = Monitor(model, loss_fn, Path(tmp) / "run", diagnostics=["loss", gsnr], optimizer=opt)
        for step, batch in enumerate(data):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            loss.backward()
            t1 = time.perf_counter()
            monitor.step(step, batch, loss)
            t2 = time.perf_counter()
            opt.step()
            print(f"step {step}: forward+backward {t1 - t0:.2f} s, monitor.step {t2 - t1:.2f} s "
                  f"({(t2 - t1) / (t1 - t0):.2f}x), source {gsnr.last_source}, peak RSS {peak_rss_gib():.2f} GiB",
                  flush=True)
        monitor.close()
    print(f"training step used: {gsnr.capture_agrees}" + (f" ({gsnr.capture_note})" if gsnr.capture_note else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
