"""GPU costs on a GPT-2-small-sized model: gradient, HVPs per backend, batched HVPs, top-10 eigenvalues, Monitor.

Model: GPT-2 small built from its config (transformers' ``GPT2LMHeadModel(GPT2Config())``: vocab 50257,
12 layers, d_model 768, 12 heads, tied embeddings, SDPA attention, 124.4M parameters), random weights;
``--model zoo`` uses the zoo's TinyGPT with the same dimensions instead (no transformers needed). Data: synthetic uniform tokens, batches of
``--batch`` x ``--seq`` tokens. Every timing synchronises the device; figures are medians over
``--repeats`` after one warm-up.

Rows:
* ``gradient``: forward + backward of the mean loss (the unit for everything else);
* ``hvp <backend>``: one Hessian-vector product, set-up (first product, which linearises the batch) and
  steady state, for double backward (``rev_rev``) and forward-over-reverse (``fwd_rev``);
* ``batched hvp K=10``: ``H @ V`` with V of shape [P, 10] (vmapped columns), per call and per column;
* ``top-10 eigenvalues``: our Lanczos (tol 1e-3) and, when installed, PyHessian, hessian-eigenthings and
  curvlinops + scipy eigsh on the same batch;
* ``monitor <preset>``: cost of each diagnostic when due (every diagnostic forced due for 3 steps, median
  ``monitor_seconds``) and the amortised overhead at the preset's default schedules
  (sum of seconds / every, relative to one training step with AdamW).

Run on a CUDA machine: ``python benchmarks/gpu.py [--model hf|zoo] [--batch 8] [--seq 512] [--out F]``;
the markdown table goes to stdout (and to ``--out``). Without CUDA it exits with a message;
``--smoke`` runs the same code on a tiny model on any device, to check the script itself, and
``--dry-run`` builds the full-size model on the meta device and prints its parameter count.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

ROWS: list[tuple[str, str, str]] = []  # (task, method, figure)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int = 1) -> tuple[float, Any]:
    """Median seconds of ``repeats`` calls (after syncing); returns (seconds, last result)."""
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def row(task: str, method: str, figure: str) -> None:
    ROWS.append((task, method, figure))
    print(f"  {task:28s} {method:34s} {figure}", file=sys.stderr, flush=True)


def attempt(task: str, method: str, fn: Callable[[], None]) -> None:
    """Run one measurement; a failure (missing peer, OOM) becomes a row saying why, and the run goes on."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - one failing measurement must not end the benchmark
        row(task, method, f"failed: {type(exc).__name__}: {str(exc)[:120]}")
        traceback.print_exc(file=sys.stderr)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --- model and data ------------------------------------------------------------------------------------
class Logits(nn.Module):
    """Token ids [B, T] -> logits [B, T, V] for either model family."""

    def __init__(self, model: nn.Module, hf: bool) -> None:
        super().__init__()
        self.model, self.hf = model, hf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=x).logits if self.hf else self.model(x)


class Flat(nn.Module):
    """Logits as [B*T, V], so peers that call ``criterion(model(x), y)`` see plain classification."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out.reshape(-1, out.shape[-1])


def build(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, Any, Callable]:
    """(model, batch (tokens [B, T], next tokens [B, T]), loss_fn(model, batch) = mean next-token cross-entropy)."""
    dims = dict(vocab_size=50257, block_size=1024, d_model=768, n_layers=12, n_heads=12)
    if args.smoke:
        dims = dict(vocab_size=128, block_size=32, d_model=32, n_layers=2, n_heads=2)
    if args.model == "hf":
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        cfg = GPT2Config(vocab_size=dims["vocab_size"], n_positions=dims["block_size"], n_embd=dims["d_model"],
                         n_layer=dims["n_layers"], n_head=dims["n_heads"], resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0)
        base = GPT2LMHeadModel(cfg)
    else:
        from diagnostics.zoo.models import TinyGPT

        base = TinyGPT(**dims, tie_weights=True, seed=0)
    model = Logits(base, args.model == "hf").to(device)
    seq = min(args.seq, dims["block_size"])
    g = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, dims["vocab_size"], (args.batch, seq + 1), generator=g, device="cpu")
    batch = (tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device))

    def loss_fn(m: nn.Module, b: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0]).flatten(0, 1), b[1].flatten())

    return model, batch, loss_fn


# --- measurements -----------------------------------------------------------------------------------------
def bench_gradient(model: nn.Module, batch: Any, loss_fn: Callable, device: torch.device, repeats: int) -> float:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()

    step()
    sec, _ = timed(step, device, repeats)
    model.zero_grad(set_to_none=True)
    row("gradient", "forward + backward", f"{sec * 1e3:.1f} ms")
    return sec


def bench_hvp(model: nn.Module, batch: Any, loss_fn: Callable, device: torch.device, repeats: int, grad_s: float) -> None:
    from diagnostics.curvature import HessianOperator

    for backend in ("rev_rev", "fwd_rev"):
        def run(backend: str = backend) -> None:
            op = HessianOperator(model, loss_fn, batch, backend=backend)
            v = torch.randn(op.num_params, device=device, dtype=op.dtype)
            setup, _ = timed(lambda: op @ v, device)
            sec, _ = timed(lambda: op @ v, device, repeats)
            row(f"hvp {backend}", "diagnostics HessianOperator",
                f"{sec * 1e3:.1f} ms ({sec / grad_s:.2f} gradients); first product {setup * 1e3:.0f} ms")
            if backend == "rev_rev":
                V = torch.randn(op.num_params, 10, device=device, dtype=op.dtype)
                bsec, _ = timed(lambda: op @ V, device, repeats)
                row("batched hvp K=10", f"{backend}, vmapped columns",
                    f"{bsec * 1e3:.1f} ms per call, {bsec * 100:.1f} ms per column ({bsec / 10 / grad_s:.2f} gradients)")

        attempt(f"hvp {backend}", "diagnostics HessianOperator", run)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the operator's kept graph is gone with run()'s frame


def bench_top10(model: nn.Module, batch: Any, loss_fn: Callable, device: torch.device) -> None:
    from diagnostics.curvature import HessianOperator
    from diagnostics.linalg import lanczos

    def ours() -> None:
        op = HessianOperator(model, loss_fn, batch, backend="rev_rev")
        sec, res = timed(lambda: lanczos(op, k=10, tol=1e-3, max_matvecs=400), device)
        top = ", ".join(f"{v:.3g}" for v in res.eigenvalues[:3].tolist())
        row("top-10 eigenvalues", "diagnostics lanczos (tol 1e-3)",
            f"{sec:.1f} s, {res.num_matvecs} HVPs, converged {int(res.converged.sum())}/10; top {top}")

    attempt("top-10 eigenvalues", "diagnostics lanczos (tol 1e-3)", ours)
    x, y = batch[0], batch[1].reshape(-1)
    crit = nn.CrossEntropyLoss()
    flat = Flat(model)

    def pyhessian() -> None:
        import importlib

        ph = importlib.import_module("pyhessian.hessian")
        h = ph.hessian(flat, crit, data=(x, y), cuda=device.type == "cuda")
        sec, (vals, _) = timed(lambda: h.eigenvalues(top_n=10, tol=1e-3), device)
        row("top-10 eigenvalues", "PyHessian (tol 1e-3)", f"{sec:.1f} s; top {vals[0]:.3g}")

    def eigenthings() -> None:
        import hessian_eigenthings as he

        op = he.HessianOperator(flat, [(x, y)], he.supervised_loss(nn.functional.cross_entropy))
        sec, res = timed(lambda: he.lanczos(op, k=10, max_iter=100, tol=1e-3, which="LA", seed=0), device)
        row("top-10 eigenvalues", "hessian-eigenthings lanczos (tol 1e-3, max_iter 100)",
            f"{sec:.1f} s; top {float(res.eigenvalues.max()):.3g}")

    def curvlinops() -> None:
        import curvlinops
        import scipy.sparse.linalg as sla

        params = [p for p in model.parameters() if p.requires_grad]
        H = curvlinops.HessianLinearOperator(flat, crit, params, [(x, y)])
        sp = H.to_scipy() if hasattr(H, "to_scipy") else H
        sec, vals = timed(lambda: sla.eigsh(sp, k=10, which="LA", tol=1e-3, return_eigenvectors=False), device)
        row("top-10 eigenvalues", "curvlinops + scipy eigsh (tol 1e-3)", f"{sec:.1f} s; top {max(vals):.3g}")

    for name, fn in (("PyHessian", pyhessian), ("hessian-eigenthings", eigenthings), ("curvlinops + eigsh", curvlinops)):
        attempt("top-10 eigenvalues", name, fn)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def bench_monitor(model: nn.Module, batch: Any, loss_fn: Callable, device: torch.device, presets: list[str],
                  repeats: int) -> None:
    from diagnostics import Monitor
    from diagnostics.store import open_run

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def train_step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        return loss

    def plain() -> None:
        train_step()
        opt.step()

    plain()
    base, _ = timed(plain, device, repeats)
    row("training step", "AdamW, no monitor", f"{base * 1e3:.1f} ms")
    for preset in presets:
        def run(preset: str = preset) -> None:
            with tempfile.TemporaryDirectory() as tmp:
                with contextlib.closing(Monitor(model, loss_fn, run=f"{tmp}/run", diagnostics=preset, optimizer=opt,
                                                every=1)) as mon:
                    schedule = {d.name: d.default_every for d in mon.diagnostics}
                    for step in range(3):
                        loss = train_step()
                        mon.step(step, batch, loss)
                        opt.step()
                st = open_run(f"{tmp}/run").status()
                due = st[st.step > 0].groupby("diagnostic").seconds.median()  # step 0 holds one-off set-up
                failed = sorted(set(st[st.status == "failed"].diagnostic))
            amortised = sum(sec / schedule.get(name, 1) for name, sec in due.items())
            parts = ", ".join(f"{n} {s * 1e3:.2f} ms" for n, s in due.sort_values(ascending=False).items())
            row(f"monitor {preset}", "when due (every diagnostic)", parts + (f"; failed: {failed}" if failed else ""))
            row(f"monitor {preset}", "amortised at default schedules",
                f"{amortised * 1e3:.1f} ms per step = {100 * amortised / base:.1f}% of a training step")

        attempt(f"monitor {preset}", "Monitor", run)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("hf", "zoo"), default="hf")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--presets", default="cheap,standard,full")
    ap.add_argument("--skip", default="", help="comma list of: hvp, top10, monitor")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (default off: float32 products)")
    ap.add_argument("--smoke", action="store_true", help="tiny model on any device, to check the script")
    ap.add_argument("--dry-run", action="store_true", help="build the model on the meta device, print its size, exit")
    ap.add_argument("--out", help="also write the markdown table to this file")
    args = ap.parse_args(argv)
    if args.dry_run:
        with torch.device("meta"):
            model, batch, _ = build(args, torch.device("meta"))
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model {args.model}: {n_params:,} parameters ({n_params / 1e6:.1f}M), batch {tuple(batch[0].shape)}")
        return 0
    if not torch.cuda.is_available() and not args.smoke:
        print("benchmarks/gpu.py needs a CUDA GPU and torch.cuda.is_available() is False; nothing was measured. "
              "Run it on a machine with an NVIDIA GPU (or pass --smoke to check the script on a tiny model).",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    model, batch, loss_fn = build(args, device)
    n_params = sum(p.numel() for p in model.parameters())
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device {card}, {n_params / 1e6:.2f}M parameters, batch {tuple(batch[0].shape)}", file=sys.stderr)
    skip = set(filter(None, args.skip.split(",")))
    grad_s = bench_gradient(model, batch, loss_fn, device, args.repeats)
    if "hvp" not in skip:
        bench_hvp(model, batch, loss_fn, device, args.repeats, grad_s)
    if "top10" not in skip:
        bench_top10(model, batch, loss_fn, device)
    if "monitor" not in skip:
        bench_monitor(model, batch, loss_fn, device, [p for p in args.presets.split(",") if p], args.repeats)
    mem = f", peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
    lines = [
        f"GPU benchmark: {card}; torch {torch.__version__}; model {args.model} ({n_params / 1e6:.2f}M parameters, "
        f"float32, TF32 {'on' if args.tf32 else 'off'}); batch {args.batch} x {batch[0].shape[1]} tokens{mem}",
        "",
        "| task | method | figure |",
        "|---|---|---|",
        *[f"| {t} | {m} | {f} |" for t, m, f in ROWS],
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(text + "\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
