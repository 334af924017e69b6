"""Hessian products of a Hugging Face GPT-2 whose attention runs through ``F.scaled_dot_product_attention``.

The same weights with Hugging Face's eager attention (explicit matmuls and softmax) give the reference.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from diagnostics.curvature import HessianOperator  # noqa: E402


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    ids = batch["input_ids"]
    return model(input_ids=ids, labels=ids).loss


def gpt2(attn: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2, attn_pdrop=0.0, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_implementation=attn,
    )
    return transformers.GPT2LMHeadModel(config).double()


@pytest.mark.parametrize("backend", ["fwd_rev", "rev_rev"])
def test_sdpa_gpt2_matches_eager_attention(backend: str) -> None:
    fused, eager = gpt2("sdpa"), gpt2("eager")
    eager.load_state_dict(fused.state_dict())
    data = [{"input_ids": torch.randint(0, 32, (3, 12), generator=torch.Generator().manual_seed(1))}]
    a = HessianOperator(fused, lm_loss, data, backend=backend)
    # The same backend on both sides: Hugging Face's loss casts logits to float32, so the two backends
    # differ from each other at float32 rounding (about 3e-9 here) whatever the attention kernel.
    b = HessianOperator(eager, lm_loss, data, backend=backend)
    V = torch.randn(a.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got, want = a @ V, b @ V
    assert float((got - want).norm() / want.norm()) < 1e-12
