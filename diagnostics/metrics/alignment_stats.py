"""Spectral-alignment statistics: per-token cosines with a weight's top right singular vector.

For a linear map y = W x (W of shape [out, in]) with SVD W = sum_k sigma_k u_k v_k^T, the alignment of
token i is a_i = <x_i, v_1> / ||x_i|| in [-1, 1]. Since u_1^T W x = sigma_1 v_1^T x, its sign is the
same whether the input is compared with v_1 or the output with u_1. A distribution of a_i that becomes
one-sided (all signs equal) lets gradient steps add up along v_1 and grow sigma_1; see docs/metrics.md,
"Spectral alignment" (after Qiu, Wu, Tan, Wang, Yao 2025, arXiv 2510.04202).

These are pure tensor-in functions; the ``spectral_alignment`` diagnostic and the benchmark trainer call
them. One implementation of the statistics, :func:`batched_alignment_statistics`, serves one distribution
and many; they are returned as plain floats / lists so they can go to the store unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from diagnostics.errors import ConfigError

__all__ = [
    "QUANTILES",
    "NUM_BINS",
    "alignment_cosines",
    "alignment_statistics",
    "batched_alignment_statistics",
    "finish_cosines",
]

#: Quantile levels stored under ``sa_quantile`` index 0..4.
QUANTILES: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)
#: Number of equal-width histogram bins on [-1, 1] stored under ``sa_histogram`` index 0..19.
NUM_BINS: int = 20


def alignment_cosines(x: torch.Tensor, v1: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Cosines between each input row and the top right singular vector.

    a_i = <x_i, v_1> / (||x_i|| ||v_1||). ``v1`` need not be normalised. Rows with (near) zero norm get
    cosine 0, which counts as neither positive nor negative in ``alignment_statistics``.

    Args:
        x: layer inputs, shape [T, in] (tokens x input features); leading batch dims are flattened.
        v1: right singular vector, shape [in].
        eps: norms below this are treated as zero.

    Returns:
        Tensor [T] of cosines in [-1, 1], in float32 or the input dtype if wider. Cost: one [T, in]
        matvec plus row norms, O(T * in).

    Raises:
        ConfigError: if the last dimension of ``x`` does not match ``v1``.
    """
    if v1.dim() != 1:
        raise ConfigError(f"v1 must be a 1-D vector of shape [in], got shape {tuple(v1.shape)}")
    if x.dim() < 1 or x.shape[-1] != v1.shape[0]:
        raise ConfigError(
            f"inputs x of shape {tuple(x.shape)} do not match v1 of length {v1.shape[0]}: "
            "the last dimension of x must be the layer's input features"
        )
    x = x.reshape(-1, x.shape[-1])
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dtype)
    v = v1.to(device=x.device, dtype=dtype)
    v_norm = torch.linalg.vector_norm(v)
    if v_norm <= eps:
        raise ConfigError("v1 has zero norm: pass the top right singular vector of the weight")
    dots = x @ (v / v_norm)
    norms = torch.linalg.vector_norm(x, dim=1)
    safe = norms > eps
    out = torch.where(safe, dots / torch.where(safe, norms, torch.ones_like(norms)), torch.zeros_like(dots))
    # Rounding can put |a| a hair above 1; the histogram's edges assume [-1, 1].
    return out.clamp_(-1.0, 1.0)


def alignment_statistics(cosines: torch.Tensor) -> dict[str, Any]:
    """Summary statistics of one cosine distribution.

    - ``positive_fraction`` p+ = fraction of tokens with a_i > 0.
    - ``sign_diversity`` = 1 - |2 p+ - 1| (1: balanced signs, 0: all one sign). Exact zeros count as
      neither sign in p+, and diversity uses p+ against p- computed the same way, i.e.
      1 - |p+ - p-| / (p+ + p-), so it is invariant to a global sign flip of v_1 even with zeros
      (1 when every cosine is 0: no evidence of one-sidedness). Without zeros this equals 1 - |2 p+ - 1|.
    - ``mean``, ``mean_abs``: mean of a_i and of |a_i|.
    - ``quantiles``: a_i quantiles at QUANTILES (0.05, 0.25, 0.5, 0.75, 0.95), linear interpolation.
    - ``histogram``: NUM_BINS (20) equal bins on [-1, 1], as fractions summing to 1 (the last bin
      includes 1.0).
    - ``num_tokens``: T.

    Args:
        cosines: Tensor [T] (any shape is flattened) of values in [-1, 1].

    Returns:
        dict with the keys above; floats, lists of floats and an int. Cost O(T log T) (quantiles sort).

    Raises:
        ConfigError: if ``cosines`` is empty.

    Example:
        >>> st = alignment_statistics(torch.tensor([0.5, -0.5, 0.25, 0.75]))
        >>> st["positive_fraction"], st["sign_diversity"], st["mean"]
        (0.75, 0.5, 0.25)
    """
    row = cosines.detach().reshape(1, -1)
    return {k: v[0] for k, v in batched_alignment_statistics(row).items()}


def _row_quantiles(a: torch.Tensor) -> torch.Tensor:
    """``[M, len(QUANTILES)]`` quantiles of each row of ``a`` ``[M, T]``, linear interpolation between order
    statistics (numpy's default); from one sort, so without ``torch.quantile``'s limit on the input size."""
    t = a.shape[1]
    at = torch.tensor(QUANTILES, dtype=a.dtype, device=a.device) * (t - 1)
    lo = at.floor().long()
    hi = torch.clamp(lo + 1, max=t - 1)
    ordered = a.sort(dim=1).values
    return torch.lerp(ordered[:, lo], ordered[:, hi], at - lo)


def batched_alignment_statistics(cos: torch.Tensor, detail: bool = True) -> dict[str, list[Any]]:
    """Alignment statistics of M cosine distributions with the same token count, in one pass.

    The definitions of :func:`alignment_statistics`, per row. Non-finite cosines count as 0 (neither
    sign) and values are clamped to [-1, 1].

    Args:
        cos: [M, T] cosines (T >= 1).
        detail: also compute the quantiles and the histogram (the only parts that need the sort and
            the bincount).

    Returns:
        dict of per-row lists: ``positive_fraction``, ``sign_diversity``, ``mean``, ``mean_abs`` (floats),
        ``quantiles``, ``histogram`` (lists of floats; only with ``detail``), ``num_tokens`` (ints).
        Cost O(M T log T) with ``detail``, O(M T) without; one host transfer either way.
    """
    # Torch, not numpy: right after a training step torch's code is warm and numpy's is not; in the Monitor
    # a numpy version of the same statistics took twice as long (benchmarks/RESULTS.md).
    a = cos.detach().to(dtype=torch.float64)
    m, t = a.shape
    if t == 0:
        raise ConfigError("no tokens to compute alignment statistics over: the input batch is empty")
    a = torch.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0).clamp_(-1.0, 1.0)
    sign = a.sign()
    # Per row: p+ - p-, p+ + p-, mean and mean |a| as one [4, M] sum (sign(a) is +-1 or 0).
    parts = [torch.stack([sign, sign.abs(), a, a.abs()]).sum(-1).div_(t).T]
    if detail:
        parts.append(_row_quantiles(a))
        # floor(a * B/2) + B/2, not floor((a + 1) * B/2): a + 1 rounds a tiny negative cosine up to 1,
        # into the bin above zero.
        idx = (torch.floor(a * (NUM_BINS / 2.0)).long() + NUM_BINS // 2).clamp_(0, NUM_BINS - 1)
        idx += torch.arange(m, device=a.device)[:, None] * NUM_BINS  # one bincount for every row
        counts = torch.bincount(idx.reshape(-1), minlength=m * NUM_BINS).reshape(m, NUM_BINS)
        parts.append(counts.to(a.dtype).div_(t))
    # One host transfer for every per-row number.
    table = (parts[0] if len(parts) == 1 else torch.cat(parts, 1)).tolist()
    for row in table:
        diff, signed = row[0], row[1]
        pos = (signed + diff) / 2.0
        row[0], row[1] = pos, (1.0 - abs(diff) / signed if signed > 0 else 1.0)
    nq = len(QUANTILES)
    out: dict[str, list[Any]] = {
        "positive_fraction": [r[0] for r in table],
        "sign_diversity": [r[1] for r in table],
        "mean": [r[2] for r in table],
        "mean_abs": [r[3] for r in table],
    }
    if detail:
        out["quantiles"] = [r[4 : 4 + nq] for r in table]
        out["histogram"] = [r[4 + nq :] for r in table]
    out["num_tokens"] = [t] * m
    return out


def finish_cosines(cos: torch.Tensor) -> torch.Tensor:
    """``cos`` with non-finite entries (rows with inf/NaN inputs) set to 0, which counts as neither
    sign, and clamped to [-1, 1]; in place. Cost O(numel)."""
    return torch.nan_to_num_(cos, nan=0.0, posinf=0.0, neginf=0.0).clamp_(-1.0, 1.0)
