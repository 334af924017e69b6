"""The GPTs the monitoring benchmarks share: the zoo's tiny GPT and a 3.2M-parameter one."""

from __future__ import annotations

from typing import Any

import torch

from diagnostics.zoo.models import GPTConfig, TinyGPT
from diagnostics.zoo.registry import get_data, get_loss, get_model

#: 4 layers, d_model 256, 4 heads, block 128: 3.2M parameters, about 0.4-0.7 s a CPU step at batch 16.
LARGE_GPT = GPTConfig(d_model=256, n_layers=4, n_heads=4, block_size=128)


def gpt_case(size: str, num_batches: int, batch_size: int = 16) -> tuple[torch.nn.Module, Any, list[Any]]:
    """``(model, loss_fn, batches)``: the zoo's tiny GPT (``"tiny"``, 64-token blocks) or :data:`LARGE_GPT`
    (``"large"``), seeded, on ``num_batches`` batches of the stdlib's pydoc text."""
    if size == "large":
        model = TinyGPT(LARGE_GPT, seed=0)
        data = get_data("pydoc-text", batch_size=batch_size, num_batches=num_batches, block_size=LARGE_GPT.block_size)
    else:
        model = get_model("tiny-gpt")
        data = get_data("pydoc-text", batch_size=batch_size, num_batches=num_batches)
    return model, get_loss("tiny-gpt"), data
