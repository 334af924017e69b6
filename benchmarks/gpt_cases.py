"""The GPTs the monitoring benchmarks share: the zoo's tiny GPT, a 3.2M-parameter one and GPT-2 small."""

from __future__ import annotations

import time
from collections.abc import Iterator
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


def gpt2_lm_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """Mean next-token cross-entropy of a Hugging Face causal LM on ``(ids, targets)``."""
    x, y = batch
    logits = model(input_ids=x).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def gpt2_small_case(batch_size: int, seq: int, num_batches: int) -> tuple[torch.nn.Module, Any, list[Any]]:
    """``(model, loss_fn, batches)``: Hugging Face GPT-2 small (124M parameters) from its config, random
    weights (``torch.manual_seed(0)``), the embedding tied with the output layer, SDPA attention, dropout
    off, float32, train mode (nothing downloaded), on ``num_batches`` batches of ``batch_size`` x ``seq``
    tokens of the stdlib help texts in the project's character encoding."""
    import transformers

    from diagnostics.zoo.data import char_batches, pydoc_tokens

    config = transformers.GPT2Config(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).float().train()
    return model, gpt2_lm_loss, list(char_batches(pydoc_tokens("train"), batch_size, seq, num_batches, seed=0))


def monitored_steps(model: torch.nn.Module, loss_fn: Any, batches: list[Any], opt: torch.optim.Optimizer,
                    monitor: Any) -> Iterator[tuple[int, float, float]]:
    """Train on ``batches`` with ``monitor.step`` after each backward; yields ``(step, seconds of the forward
    and backward, seconds of monitor.step)`` after each ``optimizer.step()``."""
    for step, batch in enumerate(batches):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        t1 = time.perf_counter()
        monitor.step(step, batch, loss)
        t2 = time.perf_counter()
        opt.step()
        yield step, t1 - t0, t2 - t1
