"""Attention statistics without the whole attention matrix: largest logit and entropy per head.

For queries q_i, keys k_j and scale c, the softmax sees the logits s_ij = c <q_i, k_j> + b_ij, where b is
an additive float mask (0 when there is none); entries masked out (a False entry of a boolean mask, a
-inf or near-float-minimum additive mask entry, the upper triangle under ``is_causal``) take no part.
Per row, p_ij = softmax_j(s_ij) and the entropy is H_i = -sum_j p_ij log p_ij (nats). The functions here
return the largest allowed logit and, per head, the sum of the row entropies and the number of rows
that have at least one allowed entry, from which the diagnostic forms the mean entropy per head.

The logits are formed ``chunk_elements`` entries at a time (all heads of one batch element, a block of
queries), so the memory added is O(chunk_elements) whatever the sequence length: about six buffers of
that size (the logits, their masked copy, log-probabilities, probabilities, their product and a boolean
mask), about 50 MiB in float32 with the default 2**21. Definitions: docs/metrics.md, "Attention and
output logits" (Zhai et al. 2023 for entropy collapse; Dehghani et al. 2023, Wortsman et al. 2023 for
logit growth).

    >>> import torch
    >>> q = torch.zeros(1, 1, 3, 2); k = torch.zeros(1, 1, 3, 2)
    >>> st = sdpa_statistics(q, k, is_causal=True)   # uniform over 1, 2 and 3 allowed keys
    >>> round(st.logit_max, 6), [round(v, 6) for v in st.head_entropy_sum.tolist()], st.head_rows.tolist()
    (0.0, [1.791759], [3.0])
"""

from __future__ import annotations

import inspect
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["AttentionStats", "DEFAULT_CHUNK_ELEMENTS", "logit_statistics", "mha_query_key", "sdpa_statistics"]

#: Logit entries formed at once (all heads of a batch element times a block of queries times keys).
DEFAULT_CHUNK_ELEMENTS = 1 << 21


@dataclass
class AttentionStats:
    """Statistics of one attention call (or several, merged).

    Attributes:
        logit_max: largest allowed pre-softmax logit (-inf when no entry was allowed).
        head_entropy_sum: [H] float64 sum over rows (batch elements and queries) of each head's entropy.
        head_rows: [H] float64 number of rows with at least one allowed entry, per head.
    """

    logit_max: float
    head_entropy_sum: torch.Tensor
    head_rows: torch.Tensor

    def merge(self, other: AttentionStats) -> AttentionStats:
        """Both calls' statistics; heads are matched by position (the longer head list is kept)."""
        n = max(len(self.head_rows), len(other.head_rows))

        def pad(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.new_zeros(n - len(t))]) if len(t) < n else t

        return AttentionStats(
            max(self.logit_max, other.logit_max),
            pad(self.head_entropy_sum) + pad(other.head_entropy_sum),
            pad(self.head_rows) + pad(other.head_rows),
        )

    def head_entropy_mean(self) -> torch.Tensor:
        """[H'] mean entropy of each head that had rows."""
        keep = self.head_rows > 0
        return self.head_entropy_sum[keep] / self.head_rows[keep]


def _work_dtype(*ts: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def _floor(dtype: torch.dtype) -> float:
    # Additive masks use the dtype's most negative value (Hugging Face) instead of -inf; half of it is far
    # below any real logit, so entries at or below it count as masked.
    return torch.finfo(dtype).min / 2 if dtype.is_floating_point else -math.inf


def _chunk(s: torch.Tensor, allowed: torch.Tensor | None, floor: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    """(largest allowed logit, per-head entropy sum, per-head row count) of logits ``s`` [H, c, S] or
    [n, H, c, S] (n samples at once)."""
    masked = s <= floor
    if allowed is not None:
        masked = masked | ~allowed
    s = s.masked_fill(masked, -math.inf)
    top = s.amax(-1)  # -inf on rows with nothing allowed
    row_ok = top > -math.inf
    # entr(p) = -p log p is 0 at p = 0, so masked entries drop out; rows with nothing allowed give NaN
    # here and 0 below.
    ent = torch.special.entr(torch.softmax(s, -1)).sum(-1)
    ent = torch.where(row_ok, ent, torch.zeros((), dtype=ent.dtype, device=ent.device))
    dims = (0, -1) if s.dim() == 4 else (-1,)
    return top.amax(), ent.sum(dims), row_ok.sum(dims)


def _finish(tops: list[torch.Tensor], ent: torch.Tensor, rows: torch.Tensor) -> AttentionStats:
    top = float(torch.stack(tops).amax()) if tops else -math.inf
    return AttentionStats(top, ent.detach().to("cpu", torch.float64), rows.detach().to("cpu", torch.float64))


def _rows_per_chunk(heads: int, keys: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // max(1, heads * keys))


def logit_statistics(logits: torch.Tensor, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> AttentionStats:
    """Statistics of logits a model already formed, as the softmax over their last dimension sees them.

    Args:
        logits: [..., H, L, S] (or [L, S]); entries that are -inf or at most half the dtype's minimum
            count as masked. Dimension -3 is taken as the heads, the others before it as the batch.
        chunk_elements: entries processed at once (bounds the temporaries; the logits are not copied).

    Returns:
        :class:`AttentionStats` with one entry per head. Cost: O(logits.numel()).
    """
    s = logits.detach()
    s = s.reshape(1, 1, *s.shape) if s.dim() == 2 else s
    s = s.reshape(-1, *s.shape[-3:])  # [B, H, L, S]; a view for the usual contiguous logits
    _, heads, length, keys = s.shape
    floor, wd = _floor(s.dtype), _work_dtype(s)
    step = _rows_per_chunk(heads, keys, chunk_elements)
    ent = torch.zeros(heads, dtype=torch.float64, device=s.device)
    rows = torch.zeros(heads, dtype=torch.float64, device=s.device)
    tops = []
    per = chunk_elements // max(1, heads * length * keys)
    if per >= 2:  # whole samples fit in a chunk: fewer, larger kernels
        for b in range(0, s.shape[0], per):
            top, e, r = _chunk(s[b:b + per].to(wd), None, floor)
            tops.append(top)
            ent += e.double()
            rows += r.double()
        return _finish(tops, ent, rows)
    for b in range(s.shape[0]):
        for l0 in range(0, length, step):
            top, e, r = _chunk(s[b, :, l0:l0 + step].to(wd), None, floor)
            tops.append(top)
            ent += e.double()
            rows += r.double()
    return _finish(tops, ent, rows)


def _at(t: torch.Tensor, idx: tuple[int, ...], nlead: int) -> torch.Tensor:
    """``t``'s slice at the outer batch index ``idx`` (broadcast dimensions of size 1 read at 0)."""
    extra = nlead - (t.dim() - 2)
    if extra > 0:
        t = t[(None,) * extra]
    return t[tuple(i if t.shape[d] != 1 else 0 for d, i in enumerate(idx))]


def sdpa_statistics(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> AttentionStats:
    """Statistics of ``F.scaled_dot_product_attention(query, key, ...)``'s softmax, in chunks.

    Args:
        query: [..., H, L, E]; key: [..., H_k, S, E] (H_k divides H with ``enable_gqa``).
        attn_mask: boolean (True = take part, SDPA's convention) or additive float, broadcastable to
            [..., H, L, S].
        is_causal: query i attends to keys j <= i (SDPA's top-left alignment).
        scale: logit scale; 1 / sqrt(E) when None.
        chunk_elements: logit entries formed at once.

    Returns:
        :class:`AttentionStats` with one entry per query head. Cost: O(B H L S E) multiply-adds, as the
        attention itself; memory O(chunk_elements) beyond one batch element's keys.
    """
    q, k, m = query.detach(), key.detach(), None if attn_mask is None else attn_mask.detach()
    if q.dim() == 2:
        q, k = q[None], k[None]
    c = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    # Batch dimensions are those before the heads (dimension -3), broadcast between q, k and the mask.
    lead = tuple(torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], () if m is None else m.shape[:-3]))
    heads = q.shape[-3]
    nlead = len(lead) + 1
    length, keys = q.shape[-2], k.shape[-2]
    wd = _work_dtype(q, k, m)
    floor = _floor(m.dtype) if m is not None and m.is_floating_point() else -math.inf
    step = _rows_per_chunk(heads, keys, chunk_elements)
    ent = torch.zeros(heads, dtype=torch.float64, device=q.device)
    rows = torch.zeros(heads, dtype=torch.float64, device=q.device)
    tops = []
    cols = torch.arange(keys, device=q.device)
    for idx in itertools.product(*[range(n) for n in lead]):
        qb, kb = _at(q, idx, nlead), _at(k, idx, nlead)  # [H, L, E], [H_k, S, E]
        if enable_gqa and kb.shape[0] not in (1, heads):
            kb = kb.repeat_interleave(heads // kb.shape[0], 0)
        kt = kb.to(wd).transpose(-2, -1)
        mb = None if m is None else _at(m, idx, nlead)  # [H or 1, L or 1, S]
        for l0 in range(0, length, step):
            l1 = min(length, l0 + step)
            s = torch.matmul(qb[:, l0:l1].to(wd), kt).mul_(c)  # [H, c, S]
            allowed = None
            if mb is not None:
                mc = mb[:, l0:l1] if mb.shape[-2] != 1 else mb
                if mc.dtype == torch.bool:
                    allowed = mc
                else:
                    s = s + mc.to(wd)
            if is_causal:
                causal = cols[None, :] <= torch.arange(l0, l1, device=q.device)[:, None]
                allowed = causal if allowed is None else allowed & causal
            top, e, r = _chunk(s.expand(heads, -1, -1), allowed, floor)
            tops.append(top)
            ent += e.double()
            rows += r.double()
    return _finish(tops, ent, rows)


_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """nn.MultiheadAttention's masks as additive floats (a True boolean entry is masked out)."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, -math.inf)
    return mask.to(dtype)


def mha_query_key(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The queries, keys and additive mask inside ``F.multi_head_attention_forward(*args, **kwargs)``.

    Re-does the input projections of queries and keys (values are not needed), the key bias, the zero
    attention column, static keys, the attention mask and the key-padding mask as that function does.

    Returns:
        ``(q [B, H, L, E], k [B, H, S, E], mask)`` with ``mask`` additive, broadcastable to [B, H, L, S],
        or None; the logit scale is 1 / sqrt(E). Cost: two of the call's three input projections.
    """
    a = _MHA_SIGNATURE.bind(*args, **kwargs)
    a.apply_defaults()
    p = a.arguments
    query, key = p["query"].detach(), p["key"].detach()
    kpm = p["key_padding_mask"]
    if query.dim() == 2:
        query, key = query.unsqueeze(1), key.unsqueeze(1)
        kpm = None if kpm is None else kpm.unsqueeze(0)
    length, batch, dim = query.shape
    heads = int(p["num_heads"])
    hd = dim // heads
    if p["use_separate_proj_weight"]:
        wq, wk = p["q_proj_weight"], p["k_proj_weight"]
    else:
        wq, wk = p["in_proj_weight"][:dim], p["in_proj_weight"][dim:2 * dim]
    bias = p["in_proj_bias"]
    bq, bk = (None, None) if bias is None else (bias[:dim], bias[dim:2 * dim])
    q = F.linear(query, wq.detach(), None if bq is None else bq.detach())
    q = q.view(length, batch, heads, hd).permute(1, 2, 0, 3)
    if p["static_k"] is not None:
        k = p["static_k"].detach().view(batch, heads, -1, hd)
    else:
        k = F.linear(key, wk.detach(), None if bk is None else bk.detach())
        if p["bias_k"] is not None:
            k = torch.cat([k, p["bias_k"].detach().expand(1, batch, dim)])
        k = k.view(k.shape[0], batch, heads, hd).permute(1, 2, 0, 3)
    if p["add_zero_attn"]:
        k = torch.cat([k, k.new_zeros(batch, heads, 1, hd)], dim=2)
    src = k.shape[2]
    mask = None
    if p["attn_mask"] is not None:
        am = _additive(p["attn_mask"].detach(), q.dtype)
        am = am[None, None] if am.dim() == 2 else am.view(batch, heads, length, -1)
        mask = F.pad(am, (0, src - am.shape[-1]))
    if kpm is not None:
        pm = _additive(kpm.detach(), q.dtype).view(batch, 1, 1, -1)
        pm = F.pad(pm, (0, src - pm.shape[-1]))
        mask = pm if mask is None else mask + pm
    return q, k, mask
