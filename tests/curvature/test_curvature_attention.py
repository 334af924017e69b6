"""Curvature through fused attention (``F.scaled_dot_product_attention``) against a hand-written reference.

The reference model computes the same attention with explicit matmuls and a softmax, so its dense float64
Hessian does not depend on which kernel the fused call picks.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diagnostics.curvature import GGNOperator, HessianOperator
from diagnostics.gradients import per_sample_gradients
from diagnostics.loss import ClassificationLoss
from tests.reference import dense_ggn, dense_hessian, per_sample_gradients_loop

TOL = 1e-9


class TinyAttention(nn.Module):
    """One causal self-attention head over a sequence, mean-pooled into class logits."""

    def __init__(self, fused: bool, d: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.fused = fused
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)  # [N, 1, T, d] each
        if self.fused:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            T = x.shape[1]
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            mask = torch.ones(T, T, dtype=torch.bool).tril()
            y = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        return self.out(y.squeeze(1).mean(1))


def pair() -> tuple[nn.Module, nn.Module, list]:
    torch.manual_seed(0)
    fused = TinyAttention(fused=True).double()
    plain = TinyAttention(fused=False).double()
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(6, 5, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0, 2])
    return fused, plain, [(x, y)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("backend", ["fwd_rev", "rev_rev"])
def test_hessian_through_fused_attention_matches_dense(backend: str) -> None:
    fused, plain, data = pair()
    loss = ClassificationLoss()
    names = [n for n, _ in plain.named_parameters()]
    H = dense_hessian(plain, loss, data, names)
    op = HessianOperator(fused, loss, data, backend=backend)
    V = torch.randn(H.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert rel(op @ V, H @ V) < TOL


def test_ggn_through_fused_attention_matches_dense() -> None:
    fused, plain, data = pair()
    loss = ClassificationLoss()
    names = [n for n, _ in plain.named_parameters()]
    G = dense_ggn(plain, loss, data, names)
    op = GGNOperator(fused, loss, data)
    V = torch.randn(G.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert rel(op @ V, G @ V) < TOL


def test_per_sample_gradients_through_fused_attention() -> None:
    fused, plain, data = pair()
    loss = ClassificationLoss()
    got = per_sample_gradients(fused, loss, data[0])
    want = per_sample_gradients_loop(plain, loss, data[0], [n for n, _ in plain.named_parameters()])
    for name in want:
        assert rel(got[name], want[name]) < TOL


def test_the_fused_kernel_is_kept_outside_curvature() -> None:
    """The kernel choice is scoped: after a product the user's forward may use the fused kernel again."""
    fused, _, data = pair()
    op = HessianOperator(fused, ClassificationLoss(), data)
    op @ torch.ones(op.shape[0], dtype=torch.float64)
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: F401
        from torch.backends.cuda import flash_sdp_enabled, math_sdp_enabled, mem_efficient_sdp_enabled
    except ImportError:
        pytest.skip("this torch has no kernel selection API")
    assert math_sdp_enabled() and flash_sdp_enabled() and mem_efficient_sdp_enabled()


def test_multihead_attention_module() -> None:
    """``nn.MultiheadAttention`` calls the fused kernel; its Hessian products match double autograd on the
    same module forced to the math kernel (symmetry and agreement of both backends)."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.att = nn.MultiheadAttention(4, 2, batch_first=True)
            self.out = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y, _ = self.att(x, x, x, need_weights=False)
            return self.out(y.mean(1))

    net = Net().double()
    data = [(torch.randn(5, 6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1]))]
    loss = ClassificationLoss()
    a = HessianOperator(net, loss, data, backend="fwd_rev")
    b = HessianOperator(net, loss, data, backend="rev_rev")
    V = torch.randn(a.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert rel(a @ V, b @ V) < TOL
    assert abs(float(V[:, 0] @ (a @ V[:, 1])) - float(V[:, 1] @ (a @ V[:, 0]))) < 1e-9 * float((a @ V).norm())
