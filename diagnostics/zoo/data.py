"""Built-in datasets: sklearn digits, character-level stdlib text, synthetic Gaussian mixtures.

Everything is local (no downloads: digits ship with scikit-learn, the text is the stdlib module
``pydoc_data.topics``) and deterministic: each function returns a list of ``(inputs, targets)`` batches
drawn with a private ``torch.Generator``, so the global RNG is never touched and the same arguments give
the same batches. Lists (not iterators) because curvature estimates need a fixed set of batches.
"""

from __future__ import annotations

import functools
import math

import torch

from diagnostics.errors import ConfigError, DataError

__all__ = [
    "Batch",
    "VOCAB",
    "VOCAB_SIZE",
    "encode",
    "decode",
    "pydoc_corpus",
    "pydoc_tokens",
    "char_batches",
    "digits_arrays",
    "digits_batches",
    "pydoc_text_batches",
    "gaussian_mixture_arrays",
    "gaussian_mixture_batches",
]

Batch = tuple[torch.Tensor, torch.Tensor]

_SPLITS = {"train": "train", "test": "test", "val": "test", "validation": "test"}

# Fixed character vocabulary: newline plus printable ASCII (32..126). Fixed rather than built from the
# text so that vocab_size (96) does not change with the Python version that ships pydoc_data.
VOCAB: str = "\n" + "".join(chr(c) for c in range(32, 127))
VOCAB_SIZE: int = len(VOCAB)
_UNKNOWN = "?"
_TRANSLATE = {"“": '"', "”": '"', "‘": "'", "’": "'", "–": "-", "—": "-", "…": "...", "\t": "    "}
_INDEX = {c: i for i, c in enumerate(VOCAB)}


def _split(split: str) -> str:
    if split not in _SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {sorted(_SPLITS)}")
    return _SPLITS[split]


def _check_sizes(batch_size: int, num_batches: int | None) -> None:
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if num_batches is not None and num_batches < 1:
        raise ConfigError(f"num_batches must be >= 1 or None, got {num_batches}")


def _batches_from_arrays(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, num_batches: int | None, seed: int, shuffle: bool
) -> list[Batch]:
    # One pass (epoch) when num_batches is None; otherwise cycle epochs, reshuffling each, until enough.
    n = x.shape[0]
    g = torch.Generator().manual_seed(seed)
    per_epoch = math.ceil(n / batch_size)
    wanted = per_epoch if num_batches is None else num_batches
    out: list[Batch] = []
    while len(out) < wanted:
        order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            out.append((x[idx], y[idx]))
            if len(out) == wanted:
                break
    return out


# --------------------------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=1)
def _digits_all() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DataError(
            "the 'digits' dataset needs scikit-learn: pip install 'training-diagnostics[digits]'"
        ) from exc
    raw = load_digits()
    x = torch.as_tensor(raw.data, dtype=torch.float64)
    y = torch.as_tensor(raw.target, dtype=torch.int64)
    # Fixed split, independent of any user seed: 80% train, 20% test.
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(20240101))
    n_train = int(round(0.8 * x.shape[0]))
    tr, te = perm[:n_train], perm[n_train:]
    mean = x[tr].mean(0)
    std = x[tr].std(0)
    # Some border pixels are constant in the training split; leave them centred rather than divide by 0.
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    xs = ((x - mean) / std).to(torch.float32)
    return xs[tr], y[tr], xs[te], y[te]


def digits_arrays(split: str = "train") -> Batch:
    """The whole digits split: inputs [N, 64] float32 standardised with train statistics, labels [N] int64.

    1797 images of 8x8 handwritten digits (sklearn.datasets.load_digits), fixed 80/20 split
    (1438 train, 359 test).
    """
    xtr, ytr, xte, yte = _digits_all()
    return (xtr, ytr) if _split(split) == "train" else (xte, yte)


def digits_batches(
    batch_size: int = 64, num_batches: int | None = None, seed: int = 0, split: str = "train", shuffle: bool = True
) -> list[Batch]:
    """Digits batches ``(x [B, 64] float32, y [B] int64)``; one epoch when ``num_batches`` is None."""
    _check_sizes(batch_size, num_batches)
    x, y = digits_arrays(split)
    return _batches_from_arrays(x, y, batch_size, num_batches, seed, shuffle)


# ----------------------------------------------------------------------------------------- pydoc-text


def encode(text: str) -> torch.Tensor:
    """Map text to token ids [len] (int64) in :data:`VOCAB`; common typographic characters become ASCII,
    other characters become '?'."""
    chars = "".join(_TRANSLATE.get(c, c) for c in text)
    unk = _INDEX[_UNKNOWN]
    return torch.tensor([_INDEX.get(c, unk) for c in chars], dtype=torch.int64)


def decode(ids: torch.Tensor | list[int]) -> str:
    """Inverse of :func:`encode` (up to the characters it replaced)."""
    return "".join(VOCAB[int(i)] for i in ids)


@functools.lru_cache(maxsize=1)
def pydoc_corpus() -> str:
    """The stdlib help texts (``pydoc_data.topics.topics`` values, sorted by topic, joined by blank lines)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@functools.lru_cache(maxsize=2)
def _tokens(split: str) -> torch.Tensor:
    ids = encode(pydoc_corpus())
    cut = int(0.9 * ids.numel())
    return ids[:cut] if split == "train" else ids[cut:]


def pydoc_tokens(split: str = "train") -> torch.Tensor:
    """Token ids [L] of the corpus: the first 90% is ``train``, the last 10% ``test`` (about 465k chars)."""
    return _tokens(_split(split))


def char_batches(
    tokens: torch.Tensor, batch_size: int, block_size: int, num_batches: int, seed: int = 0
) -> list[Batch]:
    """Random windows of a token stream: ``x [B, T]`` and next-token targets ``y [B, T]`` (int64).

    Window starts are uniform over the stream, drawn with a private generator seeded by ``seed``.
    """
    _check_sizes(batch_size, num_batches)
    if block_size < 1:
        raise ConfigError(f"block_size must be >= 1, got {block_size}")
    if tokens.numel() <= block_size + 1:
        raise DataError(f"token stream of length {tokens.numel()} is too short for block_size={block_size}")
    g = torch.Generator().manual_seed(seed)
    offsets = torch.arange(block_size + 1)
    out = []
    for _ in range(num_batches):
        starts = torch.randint(0, tokens.numel() - block_size - 1, (batch_size,), generator=g)
        win = tokens[starts[:, None] + offsets]
        out.append((win[:, :-1].contiguous(), win[:, 1:].contiguous()))
    return out


def pydoc_text_batches(
    batch_size: int = 16, num_batches: int | None = None, seed: int = 0, split: str = "train", block_size: int = 64
) -> list[Batch]:
    """Character-level LM batches from the stdlib help texts: ``(x [B, T], y [B, T])`` int64, y = x shifted.

    ``num_batches`` defaults to 10 (the stream has no natural epoch for random windows).
    """
    split = _split(split)
    # Different splits use different streams of starts even with the same seed.
    return char_batches(
        _tokens(split), batch_size, block_size, 10 if num_batches is None else num_batches,
        seed=seed * 2 + (split == "test"),
    )


# ----------------------------------------------------------------------------------- gaussian-mixture


def gaussian_mixture_arrays(
    num_samples: int = 2048,
    num_classes: int = 10,
    dim: int = 64,
    separation: float = 3.0,
    split: str = "train",
    mixture_seed: int = 0,
) -> Batch:
    """Samples of an isotropic Gaussian mixture: x [N, dim] float32, y [N] int64 (balanced classes).

    Class means are drawn once from N(0, I) scaled to norm ``separation`` (seed ``mixture_seed``); each
    sample is its class mean plus N(0, I) noise. Train and test splits use different noise draws.
    """
    if num_samples < 1 or num_classes < 2 or dim < 1:
        raise ConfigError(
            f"gaussian-mixture needs num_samples >= 1, num_classes >= 2, dim >= 1; got "
            f"{num_samples}, {num_classes}, {dim}"
        )
    g = torch.Generator().manual_seed(mixture_seed)
    means = torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    means = separation * means / means.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(mixture_seed * 2 + 1 + (_split(split) == "test"))
    y = torch.arange(num_samples) % num_classes
    y = y[torch.randperm(num_samples, generator=g)]
    x = means[y] + torch.randn(num_samples, dim, generator=g, dtype=torch.float64)
    return x.to(torch.float32), y


def gaussian_mixture_batches(
    batch_size: int = 64,
    num_batches: int | None = None,
    seed: int = 0,
    split: str = "train",
    shuffle: bool = True,
    **kwargs,
) -> list[Batch]:
    """Gaussian-mixture batches ``(x [B, dim] float32, y [B] int64)``; one epoch when num_batches is None.

    Extra keyword arguments go to :func:`gaussian_mixture_arrays` (num_samples, num_classes, dim,
    separation, mixture_seed). Defaults (dim 64, 10 classes) fit the ``mlp-digits`` model.
    """
    _check_sizes(batch_size, num_batches)
    x, y = gaussian_mixture_arrays(split=split, **kwargs)
    return _batches_from_arrays(x, y, batch_size, num_batches, seed, shuffle)
