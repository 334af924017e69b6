"""GPT-2 small (124M parameters) Hessian spectra on CPU: ours against hessian-eigenthings and curvlinops + eigsh.

Used by ``benchmarks/curvature.py --model gpt2-small`` (``--model gpt2-smoke`` is a tiny configuration of the
same code path that runs in seconds). Each method runs in its own process, so that its peak memory (max RSS,
``resource.getrusage``) is its own; with ``--as-gib G`` each process runs under ``prlimit --as=G GiB`` (an
address-space limit, like ``ulimit -v``). Results are appended as JSON lines to ``--results`` as each run
ends, so a partial run leaves its finished rows behind; ``--table FILE`` prints the table of a results file.

Model: ``transformers.GPT2LMHeadModel(GPT2Config(...))``, 12 layers, d 768, 12 heads, 1024 positions,
50257-token embedding tied with the output layer, random initialisation (``torch.manual_seed(0)``), no
download, float32, eval mode (dropout off), ``attn_implementation="sdpa"``. Data: 4 windows of 128 tokens
(+1 for the next-token targets) of the stdlib help texts (``pydoc_data.topics``), tokenised as the project
does (``diagnostics.zoo.data``: the 96-symbol character vocabulary, newline plus printable ASCII, ids 0..95,
all below 50257; the other 50161 rows of the tied embedding/output matrix take part through the output
softmax only). Windows drawn by ``char_batches(pydoc_tokens("train"), 4, 128, 1, seed=0)``. Loss: mean
cross-entropy over the 512 next-token predictions, in float32. Every method sees the same wrapper module
(``logits [B*T, V]``) and the same loss.

Fused SDPA kernels have no double-backward or forward-mode rule. Ours selects the math kernel inside its
products (``diagnostics._kernels.twice_differentiable``); the peers are run as given first (the error is
recorded) and then with the benchmark wrapping their whole run in ``sdpa_kernel([SDPBackend.MATH])``, which is
what a user of those libraries would have to do.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn

CONFIGS = {
    # name: (n_layer, n_embd, n_head, vocab, n_positions, batch, seq)
    "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12, vocab=50257, n_positions=1024, batch=4, seq=128),
    "gpt2-smoke": dict(n_layer=2, n_embd=64, n_head=2, vocab=50257, n_positions=128, batch=2, seq=32),
}


class LMLogits(nn.Module):
    """``input_ids [B, T] -> logits [B*T, V]`` of a Hugging Face causal LM (so that every library's
    ``(inputs, targets)`` convention and ``cross_entropy`` apply unchanged)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.lm(input_ids=ids).logits
        return logits.reshape(-1, logits.shape[-1])


def build(name: str) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], dict]:
    """The wrapped model (eval, float32) and the batch ``(ids [B, T], targets [B*T])``."""
    import transformers

    from diagnostics.zoo.data import char_batches, pydoc_tokens

    c = CONFIGS[name]
    config = transformers.GPT2Config(
        vocab_size=c["vocab"], n_positions=c["n_positions"], n_embd=c["n_embd"], n_layer=c["n_layer"],
        n_head=c["n_head"], attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    lm = transformers.GPT2LMHeadModel(config).float().eval()
    assert lm.lm_head.weight is lm.transformer.wte.weight, "embedding and output layer must be tied"
    model = LMLogits(lm).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    (x, y), = char_batches(pydoc_tokens("train"), c["batch"], c["seq"], 1, seed=0)
    P = sum(p.numel() for p in model.parameters())  # tied weight counted once
    info = {"P": P, "batch": c["batch"], "seq": c["seq"], "config": c,
            "attn_implementation": lm.config._attn_implementation, "max_token_id": int(x.max())}
    return model, (x, y.reshape(-1)), info


def maxrss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def vmpeak_gib() -> float | None:
    """Peak virtual address space of this process (what ``prlimit --as`` limits), from /proc."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmPeak:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def math_sdpa():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


class Deadline(Exception):
    pass


class Counted:
    """Counts products, adds up their time, and stops a run (raises Deadline) past ``deadline``."""

    def __init__(self, fn, deadline: float | None) -> None:
        self.fn, self.deadline = fn, deadline
        self.n, self.seconds, self.times = 0, 0.0, []

    def __call__(self, v):
        if self.deadline is not None and time.perf_counter() > self.deadline:
            raise Deadline(f"time budget spent after {self.n} products")
        t0 = time.perf_counter()
        out = self.fn(v)
        dt = time.perf_counter() - t0
        self.n += 1
        self.seconds += dt
        self.times.append(dt)
        if dt > 2.0:  # progress of the long runs
            print(f"    product {self.n}: {dt:.1f} s (products so far {self.seconds:.0f} s)", flush=True)
        return out


# ---------------------------------------------------------------------------------------------- methods


def run_hvp(model, data, info, args) -> list[dict]:
    """Seconds of one gradient and of single products for each library (two products each: the first
    includes any set-up, e.g. our kept graph)."""
    from diagnostics.curvature import HessianOperator

    x, y = data
    P = info["P"]
    rows = []
    v = torch.randn(P, generator=torch.Generator().manual_seed(1))

    def grad():
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    def timed_twice() -> list[float]:
        t = []
        for _ in range(2):
            t0 = time.perf_counter()
            grad()
            t.append(time.perf_counter() - t0)
        return t

    t = timed_twice()
    rows.append({"method": "one gradient (fused SDPA)", "task": "hvp", "seconds": min(t), "times": t})
    with math_sdpa():
        t = timed_twice()
    rows.append({"method": "one gradient (math SDPA)", "task": "hvp", "seconds": min(t), "times": t})
    ref = None
    for backend in ("rev_rev", "fwd_rev"):
        H = HessianOperator(model, None, data, backend=backend, max_cache_bytes=args.cache_gib << 30)
        t = []
        for _ in range(2):
            t0 = time.perf_counter()
            hv = H @ v
            t.append(time.perf_counter() - t0)
        ref = hv if ref is None else ref
        rows.append({"method": f"ours HessianOperator(backend={backend})", "task": "hvp", "seconds": t[-1],
                     "times": t, "note": f"cache {H.cache_bytes / 2**30:.2f} GiB kept; "
                                         f"rel.diff to rev_rev {float((hv - ref).norm() / ref.norm()):.1e}"})
        del H, hv
    for lib in ("hessian-eigenthings", "curvlinops"):
        for kernel in ("as given", "math SDPA"):
            try:
                with math_sdpa() if kernel == "math SDPA" else nullcontext():
                    mv = _peer_matvec(lib, model, data)
                    t = []
                    for _ in range(2):
                        t0 = time.perf_counter()
                        hv = mv(v)
                        t.append(time.perf_counter() - t0)
                rows.append({"method": f"{lib} ({kernel})", "task": "hvp", "seconds": t[-1], "times": t,
                             "note": f"rel.diff to ours {float((hv - ref).norm() / ref.norm()):.1e}"})
            except Exception as exc:  # a failure is a result
                rows.append({"method": f"{lib} ({kernel})", "task": "hvp", "seconds": None,
                             "note": f"FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"})
    return rows


def _peer_matvec(lib: str, model, data):
    if lib == "hessian-eigenthings":
        import hessian_eigenthings as he

        op = he.HessianOperator(model, [data], he.supervised_loss(nn.functional.cross_entropy))
        return op.matvec
    import curvlinops

    params = [p for p in model.parameters() if p.requires_grad]
    A = curvlinops.HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [data], check_deterministic=False)
    return lambda v: A @ v


def run_ours(model, data, info, args) -> list[dict]:
    from diagnostics.curvature import HessianOperator
    from diagnostics.linalg import lanczos

    t0 = time.perf_counter()
    H = HessianOperator(model, None, data, backend=args.backend, max_cache_bytes=args.cache_gib << 30)
    timed = Counted(H.__matmul__, None)

    class Op:  # the LinearOperator protocol lanczos needs, timed
        shape, dtype, device = H.shape, H.dtype, H.device

        def __matmul__(self, v):
            return timed(v)

    res = lanczos(Op(), k=args.k, tol=args.tol, criterion=args.criterion, return_eigenvectors=False,
                  max_memory=int(args.basis_gib * 2**30), max_seconds=args.max_seconds)
    total = time.perf_counter() - t0
    s = res.settings
    ev = res.eigenvalues.numpy()
    rel = (res.residuals / res.eigenvalues.abs()).numpy()
    note = (f"criterion={args.criterion}; backend {H.backend}, kept graph {H.cache_bytes / 2**30:.2f} GiB; "
            f"basis {s['basis_vectors']} x {s['basis_dtype']} = {s['basis_bytes'] / 2**30:.2f} GiB "
            f"(max_memory {args.basis_gib:g} GiB); restarts {s['restarts']}; stop {s['stop']}")
    return [{"method": f"ours lanczos(k={args.k}, tol={args.tol:g})", "task": f"top-{args.k}", "k": args.k,
             "tol": args.tol, "seconds": total, "products": res.num_matvecs, "product_seconds": timed.seconds,
             "first_product_seconds": timed.times[0] if timed.times else None,
             "eigenvalues": ev.tolist(), "rel_residuals": rel.tolist(), "converged": res.all_converged,
             "note": note}]


def run_eigenthings(model, data, info, args) -> list[dict]:
    import hessian_eigenthings as he

    rows = []
    loss = he.supervised_loss(nn.functional.cross_entropy)
    for kernel in ("as given", "math SDPA"):
        if kernel == "as given" and args.skip_as_given:
            continue
        t0 = time.perf_counter()
        op = he.HessianOperator(model, [data], loss)
        counted = Counted(op.matvec, t0 + args.max_seconds if args.max_seconds else None)
        op.matvec = counted
        row = {"method": f"eigenthings lanczos(k={args.k}, max_iter={args.steps}) [{kernel}]",
               "task": f"top-{args.k}", "k": args.k, "steps": args.steps}
        try:
            with math_sdpa() if kernel == "math SDPA" else nullcontext():
                res = he.lanczos(op, k=args.k, max_iter=args.steps, tol=args.tol, which="LA", seed=0)
            ev = res.eigenvalues.double()
            rel = (res.residuals.double() / ev.abs()).numpy()
            row.update(seconds=time.perf_counter() - t0, products=counted.n, product_seconds=counted.seconds,
                       eigenvalues=ev.numpy().tolist(), rel_residuals=rel.tolist(),
                       converged=bool(res.converged.all()),
                       note=f"fixed {args.steps} Lanczos steps, full reorthogonalisation, basis as a list of "
                            f"float32 vectors; residual = its |beta_m s_m| estimate")
            del res
        except Exception as exc:
            row.update(seconds=None, products=counted.n, product_seconds=counted.seconds,
                       note=f"FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                            + (f"; {counted.seconds / counted.n:.1f} s per product" if counted.n else ""))
        rows.append(row)
        del op
    return rows


def run_curvlinops(model, data, info, args) -> list[dict]:
    import curvlinops
    import scipy.sparse.linalg as sla

    rows = []
    params = [p for p in model.parameters() if p.requires_grad]
    for kernel in ("as given", "math SDPA"):
        if kernel == "as given" and args.skip_as_given:
            continue
        t0 = time.perf_counter()
        row = {"method": f"curvlinops + eigsh(k={args.k}, tol={args.tol:g}) [{kernel}]",
               "task": f"top-{args.k}", "k": args.k, "tol": args.tol}
        counted = None
        try:
            with math_sdpa() if kernel == "math SDPA" else nullcontext():
                A = curvlinops.HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [data],
                                                     check_deterministic=False).to_scipy(dtype=np.float32)
                counted = Counted(A.matvec, t0 + args.max_seconds if args.max_seconds else None)
                L = sla.LinearOperator(A.shape, matvec=counted, dtype=np.float32)
                v0 = np.random.default_rng(0).standard_normal(A.shape[0]).astype(np.float32)
                vals = sla.eigsh(L, k=args.k, which="LA", tol=args.tol, v0=v0, return_eigenvectors=False)
            vals = np.sort(vals)[::-1]
            ncv = min(A.shape[0], max(2 * args.k + 1, 20))
            row.update(seconds=time.perf_counter() - t0, products=counted.n, product_seconds=counted.seconds,
                       eigenvalues=vals.astype(float).tolist(), converged=True,
                       note=f"ARPACK float32, ncv={ncv}; converged means ARPACK's test "
                            f"||A y - theta y|| <= tol |theta| (residuals not returned)")
        except Exception as exc:
            n = counted.n if counted else 0
            row.update(seconds=None, products=n, product_seconds=counted.seconds if counted else 0.0,
                       note=f"FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                            + (f"; {counted.seconds / n:.1f} s per product" if n else ""))
        rows.append(row)
    return rows


METHODS = {"hvp": run_hvp, "ours": run_ours, "eigenthings": run_eigenthings, "curvlinops": run_curvlinops}


def child(args) -> None:
    """One method in this process; appends its rows (with max RSS and load) to ``args.results``."""
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    model, data, info = build(args.model)
    build_s = time.perf_counter() - t0
    print(f"== {args.model}: P={info['P']:,}, batch {tuple(data[0].shape)}, max token id {info['max_token_id']}, "
          f"attention {info['attn_implementation']}, built in {build_s:.1f} s; method {args.method}", flush=True)
    try:
        rows = METHODS[args.method](model, data, info, args)
    except MemoryError as exc:
        rows = [{"method": args.method, "task": f"top-{args.k}", "seconds": None, "note": f"FAILED MemoryError {exc}"}]
    common = {"model": args.model, "P": info["P"], "threads": args.threads, "as_gib": args.as_gib,
              "maxrss_gib": maxrss_gib(), "vmpeak_gib": vmpeak_gib(), "load_start": load0, "load_end": os.getloadavg(),
              "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    with open(args.results, "a") as fh:
        for r in rows:
            r = {**common, **r}
            fh.write(json.dumps(r) + "\n")
            print("RESULT " + json.dumps(r), flush=True)


def parent(args, argv: list[str]) -> None:
    """Each requested run in its own process (under the address-space limit), then the table."""
    runs = [r for r in args.runs.split(",") if r]
    for run in runs:
        method, *opts = run.split(":")
        cmd = [sys.executable, os.path.abspath(sys.argv[0]), *argv, "--method", method]
        if method == "ours" and opts:
            cmd += ["--k", opts[0], "--tol", opts[1]] if len(opts) > 1 else ["--k", opts[0]]
        elif method == "eigenthings" and opts:
            cmd += ["--k", opts[0], "--steps", opts[1]]
        elif method == "curvlinops" and opts:
            cmd += ["--k", opts[0], "--tol", opts[1]] if len(opts) > 1 else ["--k", opts[0]]
        if args.as_gib:
            cmd = ["prlimit", f"--as={int(args.as_gib * 2**30)}", "--", *cmd]
        print("$", shlex.join(cmd), flush=True)
        rc = subprocess.run(cmd).returncode
        if rc != 0:
            with open(args.results, "a") as fh:
                fh.write(json.dumps({"model": args.model, "method": run, "task": "-", "seconds": None,
                                     "as_gib": args.as_gib, "note": f"FAILED process exit code {rc} "
                                     f"(killed or out of memory)"}) + "\n")
    table(args.results, args.model)


def table(path: str, model: str | None = None) -> None:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    if model:
        rows = [r for r in rows if r.get("model") == model]
    print("| task | method | time s | products | s/product | max RSS GiB | VmPeak GiB | eigenvalues | rel. residuals "
          "| note |")
    print("|---|---|---:|---:|---:|---:|---:|---|---|---|")
    for r in rows:
        sec = "-" if r.get("seconds") is None else f"{r['seconds']:.1f}"
        n = r.get("products")
        per = (f"{r['product_seconds'] / n:.2f}" if n and r.get("product_seconds") else
               (f"{r['seconds']:.2f}" if r.get("task") == "hvp" and r.get("seconds") else "-"))
        ev = " ".join(f"{v:.4g}" for v in r.get("eigenvalues", []))
        rr = " ".join(f"{v:.1e}" for v in r.get("rel_residuals", []))
        rss = f"{r['maxrss_gib']:.1f}" if r.get("maxrss_gib") else "-"
        vm = f"{r['vmpeak_gib']:.1f}" if r.get("vmpeak_gib") else "-"
        print(f"| {r.get('task')} | {r['method']} | {sec} | {n if n is not None else '-'} | {per} | {rss} | {vm} | "
              f"{ev} | {rr} | {r.get('note', '')} |")
    # Ratios: ours / peer for the same task, where both finished.
    ours = {r["task"]: r for r in rows if r["method"].startswith("ours lanczos") and r.get("seconds")}
    for r in rows:
        o = ours.get(r.get("task"))
        if o and not r["method"].startswith("ours") and r.get("seconds"):
            print(f"ratio {r['task']}: ours {o['seconds']:.1f} s / {r['method']} {r['seconds']:.1f} s = "
                  f"{o['seconds'] / r['seconds']:.2f}x; products {o['products']} vs {r.get('products')}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description="GPT-2 Hessian spectra (see benchmarks/curvature_gpt2.py)")
    p.add_argument("--models", "--model", dest="model", default="gpt2-small", choices=sorted(CONFIGS))
    p.add_argument("--method", choices=sorted(METHODS), help="run one method in this process")
    p.add_argument("--runs", default="hvp,ours:1:1e-3,ours:5:1e-2,ours:10:1e-2,curvlinops:1:1e-3,eigenthings:1:20",
                   help="comma-separated runs, each in its own process: hvp, ours:K:TOL, curvlinops:K:TOL, "
                        "eigenthings:K:STEPS")
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--tol", type=float, default=1e-2)
    p.add_argument("--criterion", default="residual", choices=("residual", "eigenvalue"))
    p.add_argument("--steps", type=int, default=20, help="eigenthings: Lanczos steps")
    p.add_argument("--basis-gib", type=float, default=12.0, help="ours: lanczos max_memory in GiB")
    p.add_argument("--cache-gib", type=int, default=8, help="ours: HessianOperator max_cache_bytes in GiB")
    p.add_argument("--backend", default="auto", choices=("auto", "rev_rev", "fwd_rev"))
    p.add_argument("--max-seconds", type=float, default=None, help="time budget of one run (peers: raises)")
    p.add_argument("--skip-as-given", action="store_true", help="peers: skip the run with the fused kernel")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--as-gib", type=float, default=None, help="address-space limit per process (prlimit --as)")
    p.add_argument("--results", default="/tmp/tdiag_gpt2_results.jsonl")
    p.add_argument("--table", action="store_true", help="only print the table of --results")
    args = p.parse_args(argv)
    if args.table:
        table(args.results, args.model)
    elif args.method:
        child(args)
    else:
        parent(args, [a for a in argv])


if __name__ == "__main__":
    main()
