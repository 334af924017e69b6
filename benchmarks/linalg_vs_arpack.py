"""Matvec counts of ``diagnostics.linalg.lanczos`` against ARPACK (scipy.sparse.linalg.eigsh).

Same operator, same k, same relative tolerance, which="LA", both from a random start. Spectra imitate
network Hessians (a bulk near zero of both signs plus a few outliers). ARPACK is run with its default
basis size (ncv = max(2k+1, 20)) and with the same basis size as ours. Optionally (``--hessian``) also on
the Hessian of a digits MLP. Every result is checked against a dense eigvalsh reference.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/linalg_vs_arpack.py [--hessian] [--quick]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse.linalg as sla
import torch

from diagnostics.linalg import lanczos


def spectrum(kind: str, P: int, rng: np.random.Generator) -> np.ndarray:
    """Eigenvalues of a synthetic network-like Hessian."""
    bulk = 0.05 * np.abs(rng.standard_normal(P)) - 0.01 * np.abs(rng.standard_normal(P))
    if kind == "10 outliers":  # C = 10 classes: about C outliers well above the bulk (Papyan 2019)
        bulk[-10:] = np.sort(rng.uniform(1.0, 20.0, 10))
    elif kind == "power-law":  # outliers decaying like 1/i, merging into the bulk
        bulk[-50:] = np.sort(20.0 / np.arange(1, 51)) + 0.05
    elif kind == "clustered":  # 10 outliers in two tight clusters
        bulk[-10:] = np.concatenate([5.0 + 1e-3 * rng.standard_normal(5), 10.0 + 1e-3 * rng.standard_normal(5)])
    return bulk


def dense_with_spectrum(ev: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    Q, _ = np.linalg.qr(rng.standard_normal((ev.size, ev.size)))
    return (Q * ev) @ Q.T


def arpack(matvec, P: int, k: int, tol: float, ncv: int | None, seed: int):
    count = [0]

    def mv(x):
        count[0] += 1
        return matvec(x)

    def mm(X):
        count[0] += X.shape[1]
        return np.column_stack([matvec(X[:, j]) for j in range(X.shape[1])])

    L = sla.LinearOperator((P, P), matvec=mv, matmat=mm, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(P)
    t0 = time.perf_counter()
    vals = sla.eigsh(L, k=k, which="LA", tol=tol, ncv=ncv, v0=v0, return_eigenvectors=False)
    return np.sort(vals)[::-1], count[0], time.perf_counter() - t0


def compare(name: str, A: torch.Tensor, matvec, ref: np.ndarray, k: int, tol: float, seed: int) -> dict:
    P = A.shape[0]
    ours = lanczos(A, k=k, tol=tol, seed=seed, return_eigenvectors=False)
    ncv_ours = ours.settings["max_steps"]
    ar_default = arpack(matvec, P, k, tol, None, seed)
    ar_same = arpack(matvec, P, k, tol, ncv_ours, seed)
    scale = np.abs(ref).max()
    row = {
        "case": name, "P": P, "k": k, "tol": tol,
        "ours": ours.num_matvecs, "ours_conv": ours.all_converged,
        "ours_err": float(np.abs(ours.eigenvalues.numpy() - ref[:k]).max() / scale),
        "arpack": ar_default[1], "arpack_err": float(np.abs(ar_default[0] - ref[:k]).max() / scale),
        "arpack_ncv": ar_same[1],
    }
    row["ratio"] = row["ours"] / row["arpack"]
    row["ratio_ncv"] = row["ours"] / row["arpack_ncv"]
    return row


def print_rows(rows: list[dict]) -> None:
    head = (f"{'case':<22}{'P':>6}{'k':>4}{'tol':>8}{'ours':>7}{'ARPACK':>8}{'ratio':>7}"
            f"{'ARPACK(ncv=ours)':>18}{'ratio':>7}{'err ours':>10}{'err ARPACK':>11}")
    print(head)
    for r in rows:
        print(f"{r['case']:<22}{r['P']:>6}{r['k']:>4}{r['tol']:>8.0e}{r['ours']:>7}{r['arpack']:>8}"
              f"{r['ratio']:>7.2f}{r['arpack_ncv']:>18}{r['ratio_ncv']:>7.2f}{r['ours_err']:>10.1e}"
              f"{r['arpack_err']:>11.1e}" + ("" if r["ours_conv"] else "  (ours not converged)"))
    ratios = np.array([r["ratio"] for r in rows])
    ratios_ncv = np.array([r["ratio_ncv"] for r in rows])
    print(f"ours/ARPACK matvecs: geometric mean {np.exp(np.log(ratios).mean()):.2f}, max {ratios.max():.2f} "
          f"(same ncv: {np.exp(np.log(ratios_ncv).mean()):.2f}, max {ratios_ncv.max():.2f}); "
          f"fewer in {(ratios < 1).sum()}/{len(rows)} cases")


def synthetic(quick: bool) -> list[dict]:
    rows = []
    sizes = [1000] if quick else [1000, 3000]
    for P in sizes:
        for kind in ["10 outliers", "power-law", "clustered"]:
            rng = np.random.default_rng(P)
            ev = spectrum(kind, P, rng)
            M = dense_with_spectrum(ev, rng)
            A = torch.tensor(M)
            ref = np.sort(ev)[::-1]
            for k in [1, 5, 10, 20]:
                for tol in [1e-3, 1e-6]:
                    rows.append(compare(kind, A, lambda x, M=M: M @ x, ref, k, tol, seed=1))
    return rows


def hessian_rows() -> list[dict]:
    from diagnostics.curvature import HessianOperator
    from diagnostics.zoo.data import digits_arrays
    from diagnostics.zoo.models import MLPDigits

    torch.manual_seed(0)
    x, y = digits_arrays("train")
    model = MLPDigits(hidden=(32,), seed=0).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(200):  # some training, so that the spectrum has its outliers
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x.double()), y).backward()
        opt.step()
    H = HessianOperator(model, None, (x.double(), y))
    P = H.shape[0]
    Hd = H @ torch.eye(P, dtype=torch.float64)
    Hd = 0.5 * (Hd + Hd.T)
    ref = np.sort(np.linalg.eigvalsh(Hd.numpy()))[::-1]

    def matvec(v):
        return (H @ torch.from_numpy(np.ascontiguousarray(v))).numpy()

    rows = []
    for k in [1, 5, 10]:
        for tol in [1e-3, 1e-6]:
            r = compare("digits MLP Hessian", H, matvec, ref, k, tol, seed=1)
            rows.append(r)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hessian", action="store_true", help="also the Hessian of a digits MLP")
    parser.add_argument("--quick", action="store_true", help="one size only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("== synthetic network-like spectra (dense) ==")
    print_rows(synthetic(args.quick))
    if args.hessian:
        print("== Hessian of a digits MLP (64-32-10, float64, trained 200 GD steps) ==")
        print_rows(hessian_rows())


if __name__ == "__main__":
    main()
