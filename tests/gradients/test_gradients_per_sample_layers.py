"""Layer-wise per-sample gradients (one batched backward) against a Python loop of autograd.grad (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import diagnostics.gradients.per_sample as per_sample_module
from diagnostics.errors import ConfigError, LossError
from diagnostics.gradients import per_sample_gradients
from diagnostics.gradients.per_sample_layers import layer_owners
from diagnostics.zoo.models import GPTConfig, TinyGPT
from tests.cases import get_case
from tests.reference import assert_same_state, per_sample_gradients_loop, snapshot_state


def assert_close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], tol: float = 1e-10) -> None:
    """Each tensor within ``tol`` relative to its norm, or to 1e-6 of the whole gradient's norm: some
    gradients are zero up to rounding (a key bias shifts every logit of a row equally)."""
    assert list(got) == list(ref)
    whole = float(torch.cat([r.flatten() for r in ref.values()]).norm())
    for n in ref:
        assert got[n].shape == ref[n].shape, n
        err = float((got[n] - ref[n]).norm())
        assert err <= tol * max(float(ref[n].norm()), 1e-6 * whole), (n, err, float(ref[n].norm()))


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def tiny_gpt(**overrides) -> nn.Module:
    cfg = GPTConfig(vocab_size=11, d_model=8, n_layers=2, n_heads=2, block_size=6, **overrides)
    return TinyGPT(cfg, seed=0).double()


def tokens(n: int, t: int, vocab: int = 11, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, t), generator=g), torch.randint(0, vocab, (n, t), generator=g)


def assert_matches_loop(model: nn.Module, loss_fn, batch, tol: float = 1e-10) -> dict[str, torch.Tensor]:  # noqa: ANN001
    got = per_sample_gradients(model, loss_fn, batch, method="layers")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert list(got) == names
    assert_close(got, per_sample_gradients_loop(model, loss_fn, batch, names), tol)
    return got


@pytest.mark.parametrize("overrides", [{}, {"tie_weights": True}, {"bias": False}, {"qk_layernorm": True}],
                         ids=["untied", "tied", "no-bias", "qk-layernorm"])
def test_tiny_gpt_with_shared_position_lookup(overrides: dict) -> None:
    # pos_emb is looked up with arange(T): one lookup shared by every sample, split per sample here.
    model = tiny_gpt(**overrides)
    assert layer_owners(model, dict(model.named_parameters())) is not None
    assert_matches_loop(model, lm_loss, tokens(5, 6))


def test_mlp_case_and_selection() -> None:
    c = get_case("mlp")
    assert_matches_loop(c.model, c.loss_fn, c.batches[0])
    got = per_sample_gradients(c.model, c.loss_fn, c.batches[0], params=["2.*"], method="layers")
    assert_close(got, per_sample_gradients_loop(c.model, c.loss_fn, c.batches[0], ["2.weight", "2.bias"]))


class Lookup(nn.Module):
    """Token embedding with a padding row, a position embedding looked up with ids of shape [1, T] (as
    Hugging Face models do), a LayerNorm over the last two dimensions, a linear map applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(7, 4, padding_idx=0)
        self.pos = nn.Embedding(5, 4)
        self.norm = nn.LayerNorm([3, 4])
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = torch.arange(x.shape[1])[None]
        h = self.norm(self.tok(x) + self.pos(ids))
        return self.head(torch.tanh(self.mix(torch.tanh(self.mix(h)))))


def test_padding_row_hf_position_ids_and_a_layer_called_twice() -> None:
    torch.manual_seed(0)
    model = Lookup().double()
    x, y = tokens(4, 3, vocab=7, seed=1)
    x[0, 1] = 0  # the padding row gets no gradient
    got = assert_matches_loop(model, lm_loss, (x, y))
    assert float(got["tok.weight"][:, 0].abs().max()) == 0.0


def test_huggingface_gpt_neox_with_sdpa() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPTNeoXConfig(vocab_size=23, hidden_size=8, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=16,
                                        max_position_embeddings=16, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(config).double().eval()

    def hf_loss(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return m(input_ids=batch[0], labels=batch[1]).loss

    assert layer_owners(model, dict(model.named_parameters())) is not None
    # Hugging Face's loss casts the logits to float32: sample-by-sample and batched roundings differ there.
    assert_matches_loop(model, hf_loss, tokens(3, 5, vocab=23), tol=1e-5)


def test_huggingface_gpt2_conv1d_and_position_ids() -> None:
    # GPT-2's maps are Conv1D (weight [in, out]); its position embedding is looked up with ids [1, T].
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=23, n_positions=16, n_embd=8, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double().eval()

    def hf_loss(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return m(input_ids=batch[0], labels=batch[1]).loss

    owners = layer_owners(model, dict(model.named_parameters()))
    assert owners is not None and any(type(m).__name__ == "Conv1D" for m, _ in owners)
    assert_matches_loop(model, hf_loss, tokens(3, 5, vocab=23), tol=1e-5)


def test_unsupported_layers_use_vmap() -> None:
    c = get_case("cnn_bn")  # Conv2d and BatchNorm2d
    assert layer_owners(c.model, dict(c.model.named_parameters())) is None
    with pytest.raises(ConfigError, match="method='vmap'"):
        per_sample_gradients(c.model, c.loss_fn, c.batches[0], method="layers")
    t = get_case("transformer")  # a bare nn.Parameter added to the embeddings
    assert layer_owners(t.model, dict(t.model.named_parameters())) is None
    with pytest.raises(ConfigError, match="method must be one of"):
        per_sample_gradients(c.model, c.loss_fn, c.batches[0], method="backpack")


def test_as_many_positions_as_samples_is_refused_not_guessed() -> None:
    # pos_emb's ids arange(4) with 4 samples: a per-sample lookup and a shared one look the same.
    model = tiny_gpt()
    batch = tokens(4, 4)
    with pytest.raises(ConfigError, match="cannot be split by sample"):
        per_sample_gradients(model, lm_loss, batch, method="layers")
    got = per_sample_gradients(model, lm_loss, batch)  # auto: vmap
    assert_close(got, per_sample_gradients_loop(model, lm_loss, batch, list(got)))


def _spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """The number of samples of each call ``per_sample_gradients`` makes to ``name``."""
    calls: list[int] = []
    real = getattr(per_sample_module, name)
    monkeypatch.setattr(per_sample_module, name, lambda *a: calls.append(a[-1]) or real(*a))
    return calls


@pytest.fixture
def vmapped(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    return _spy(monkeypatch, "_vmapped")


@pytest.fixture
def looped(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    return _spy(monkeypatch, "_looped")


def test_auto_checks_against_single_sample_gradients_once_then_uses_layers(vmapped, looped) -> None:  # noqa: ANN001
    model = tiny_gpt()
    for seed in range(3):
        batch = tokens(5, 6, seed=seed)
        got = per_sample_gradients(model, lm_loss, batch)
        assert_close(got, per_sample_gradients_loop(model, lm_loss, batch, list(got)))
    assert looped == [2] and vmapped == []  # the first call's check, on its first two samples
    assert list(per_sample_module._LAYERWISE_CHECKED[model].values()) == [True]


def test_a_sample_whose_own_loss_is_not_finite_is_named_by_vmap(vmapped, looped) -> None:  # noqa: ANN001
    """A loss that is finite on the batch but NaN on one sample: the check's single-sample reference gives
    way to vmap, whose error names the sample."""
    model = tiny_gpt()

    def nan_alone(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        loss = lm_loss(m, batch)
        return loss * float("nan") if batch[0].shape[0] == 1 else loss

    with pytest.raises(LossError, match="sample 0"):
        per_sample_gradients(model, nan_alone, tokens(5, 6))
    assert looped == [2] and vmapped == [2]


def test_the_check_fails_a_layer_split_that_is_wrong(monkeypatch: pytest.MonkeyPatch, looped) -> None:  # noqa: ANN001
    """The single-sample reference really is compared: layer-wise gradients made wrong are refused."""
    real = per_sample_module.layerwise_per_sample_gradients

    def doubled(*args):  # noqa: ANN002, ANN202
        grads, loss = real(*args)
        return {k: 2 * v for k, v in grads.items()}, loss

    monkeypatch.setattr(per_sample_module, "layerwise_per_sample_gradients", doubled)
    model = tiny_gpt()
    batch = tokens(5, 6)
    got = per_sample_gradients(model, lm_loss, batch)
    assert looped == [2]
    assert list(per_sample_module._LAYERWISE_CHECKED[model].values()) == [False]
    assert_close(got, per_sample_gradients_loop(model, lm_loss, batch, list(got)))  # vmap's, not the doubled


def test_auto_keeps_vmap_where_the_layers_disagree(vmapped, looped) -> None:  # noqa: ANN001
    # A summed loss is not a mean over samples: the layer-wise gradients come out N times too large.
    model = tiny_gpt()

    def summed(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        logits = m(batch[0])
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1),
                                           reduction="sum")

    for seed in range(2):
        batch = tokens(5, 6, seed=seed)
        got = per_sample_gradients(model, summed, batch)
        assert_close(got, per_sample_gradients_loop(model, summed, batch, list(got)))
    assert looped == [2] and vmapped == [5, 5]  # the check on two samples, then vmap on the whole batch
    assert list(per_sample_module._LAYERWISE_CHECKED[model].values()) == [False]


def test_leaves_grad_modes_and_rng_unchanged() -> None:
    model = tiny_gpt(dropout=0.1)
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = snapshot_state(model)
    per_sample_gradients(model, lm_loss, tokens(5, 6), method="layers")
    assert_same_state(before, snapshot_state(model))
    assert model.training


class InPlaceOnLookup(nn.Module):
    """Adds to the position lookup in place: widening that lookup to the batch cannot be written to."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(7, 4)
        self.pos = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pos(torch.arange(x.shape[1]))
        h += 0.0
        return self.head(self.tok(x) + h)


def test_auto_falls_back_when_the_widened_lookup_is_written_in_place() -> None:
    torch.manual_seed(0)
    model = InPlaceOnLookup().double()
    batch = tokens(4, 3, vocab=7)
    with pytest.raises(RuntimeError):
        per_sample_gradients(model, lm_loss, batch, method="layers")
    got = per_sample_gradients(model, lm_loss, batch)
    assert_close(got, per_sample_gradients_loop(model, lm_loss, batch, list(got)))
    assert list(per_sample_module._LAYERWISE_CHECKED[model].values()) == [False]


def test_gradients_agree_within_a_thousandth_of_the_largest_entry_chunk_by_chunk(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(per_sample_module, "_AGREEMENT_CHUNK", 3)  # every comparison crosses chunks
    agree = per_sample_module.gradients_agree
    ref = {"w": torch.tensor([[1.0, -4.0, 2.0, 0.5], [0.0, 3.0, -1.0, 2.0]]), "b": torch.zeros(2, 1)}
    near = {"w": ref["w"] + torch.tensor([[0, 0, 0, 0], [0, 0, 0, 3.9e-3]]), "b": ref["b"] + 3e-6}
    assert agree(near, ref)
    far = {"w": ref["w"] + torch.tensor([[0, 0, 0, 0], [0, 0, 0, 4.1e-3]]), "b": ref["b"]}
    assert not agree(far, ref)  # 4.1e-3 > 1e-3 x 4, the largest |entry|, found in the last chunk
    assert not agree({"w": ref["w"], "b": ref["b"] + 5e-6}, ref)  # above 1e-3 x 1e-3 x 4: the floor
    nan = {"w": ref["w"].clone(), "b": ref["b"]}
    nan["w"][1, 3] = float("nan")
    assert not agree(nan, ref)
