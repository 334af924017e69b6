"""Tiny models as data: float64 models with a loss and two batches of unequal size.

Each case is small (P of a few dozen to a few hundred) so that dense Hessians and GGNs by brute force
(``tests/reference.py``) take well under a second. Models are built in train mode on purpose: operators
must switch to eval themselves and restore the flags.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from diagnostics.loss import ClassificationLoss, LanguageModelLoss, RegressionLoss

DTYPE = torch.float64


@dataclass
class Case:
    """A model, its loss (with forward/criterion) and two batches of different sizes."""

    name: str
    model: nn.Module
    loss_fn: Callable[[nn.Module, Any], Tensor]
    batches: list[Any]
    mode: str = "eval"
    blocks: list[list[str]] = field(default_factory=list)  # parameter selections to test as blocks


class _Seeded:
    # Build under a private stream so that constructing a case never moves the global RNG.
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._fork = torch.random.fork_rng(devices=[])

    def __enter__(self) -> None:
        self._fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        self._fork.__exit__(*exc)


def mlp_case() -> Case:
    """tanh MLP 4-6-3, cross-entropy, batches of 5 and 3."""
    with _Seeded(0):
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)
        batches = [(torch.randn(n, 4, dtype=DTYPE), torch.randint(0, 3, (n,))) for n in (5, 3)]
    return Case("mlp", model, ClassificationLoss(), batches, blocks=[["0.weight"], ["0.*", "2.bias"]])


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(18, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


def cnn_case() -> Case:
    """Conv(1->2, 3x3) + BatchNorm (eval: running statistics) + tanh + linear, on 5x5 images."""
    with _Seeded(1):
        model = SmallCNN().to(DTYPE)
        # Non-trivial running statistics, so that eval and train mode give different curvature.
        model.bn.running_mean.copy_(torch.randn(2, dtype=DTYPE) * 0.3)
        model.bn.running_var.copy_(torch.rand(2, dtype=DTYPE) + 0.5)
        nn.init.normal_(model.bn.weight, 1.0, 0.2)
        nn.init.normal_(model.bn.bias, 0.0, 0.2)
        batches = [(torch.randn(n, 1, 5, 5, dtype=DTYPE), torch.randint(0, 3, (n,))) for n in (4, 2)]
    return Case(
        "cnn_bn", model, ClassificationLoss(), batches, blocks=[["bn.*"], ["conv.weight", "fc.weight"]]
    )


class TinyCausalTransformer(nn.Module):
    """One pre-LN block: single-head causal attention and a small MLP, then LayerNorm and an LM head."""

    def __init__(self, vocab: int = 5, d: int = 8, t: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(t, d) * 0.1)
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4), nn.Tanh(), nn.Linear(4, d))
        self.lnf = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        _, t = idx.shape
        x = self.emb(idx) + self.pos[:t]
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        causal = torch.ones(t, t, dtype=torch.bool, device=idx.device).tril()
        attn = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + self.proj(attn @ v)
        x = x + self.mlp(self.ln2(x))
        return self.head(self.lnf(x))


def transformer_case() -> Case:
    """Tiny causal transformer (vocab 5, d=8, 3 tokens), next-token cross-entropy, batches of 3 and 2."""
    with _Seeded(2):
        model = TinyCausalTransformer().to(DTYPE)
        for p in model.parameters():  # LayerNorm starts at (1, 0): perturb so that its curvature is generic
            p.data.add_(torch.randn_like(p) * 0.1)
        batches = []
        for n in (3, 2):
            tokens = torch.randint(0, 5, (n, 4))
            batches.append((tokens[:, :3], tokens[:, 1:]))
    return Case(
        "transformer", model, LanguageModelLoss(), batches, blocks=[["ln1.*", "lnf.*"], ["qkv.weight"]]
    )


def regression_case() -> Case:
    """Softplus MLP 3-5-2, mean squared error, batches of 6 and 4."""
    with _Seeded(3):
        model = nn.Sequential(nn.Linear(3, 5), nn.Softplus(), nn.Linear(5, 2)).to(DTYPE)
        batches = [(torch.randn(n, 3, dtype=DTYPE), torch.randn(n, 2, dtype=DTYPE)) for n in (6, 4)]
    return Case("regression", model, RegressionLoss(), batches, blocks=[["2.*"]])


CASES: dict[str, Callable[[], Case]] = {
    "mlp": mlp_case,
    "cnn_bn": cnn_case,
    "transformer": transformer_case,
    "regression": regression_case,
}


def get_case(name: str) -> Case:
    """A fresh copy of the named case (models are rebuilt, so tests cannot leak state)."""
    return CASES[name]()


def dropout_case() -> Case:
    """An MLP with dropout, used in train mode to produce a non-deterministic operator."""
    with _Seeded(4):
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).to(DTYPE)
        batches = [(torch.randn(6, 4, dtype=DTYPE), torch.randint(0, 3, (6,)))]
    return Case("dropout", model, ClassificationLoss(), batches, mode="train")
