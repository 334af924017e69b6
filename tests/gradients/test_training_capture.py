"""Per-sample gradients read off a training forward and backward, against a loop of single-sample
autograd.grad (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diagnostics.gradients.per_sample_layers import layer_owners
from diagnostics.gradients.training_capture import FlatGradientBuffer, TrainingStepCapture
from tests.gradients.test_gradients_per_sample_layers import assert_close, lm_loss, tiny_gpt, tokens
from tests.reference import per_sample_gradients_loop


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.LayerNorm(7), nn.Linear(7, 3)).double()


def ce(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def captured(model: nn.Module, steps, n: int) -> dict[str, torch.Tensor] | str:  # noqa: ANN001
    selected = dict(model.named_parameters())
    with TrainingStepCapture(model, layer_owners(model, selected), n) as capture:
        steps()
    return capture.gradients(selected)


def test_a_training_step_gives_the_first_samples_gradients():
    model, batch = mlp(), data(10)

    def step() -> None:
        ce(model, batch).backward()

    got = captured(model, step, 4)
    names = [n for n, _ in model.named_parameters()]
    ref = per_sample_gradients_loop(model, ce, tuple(t[:4] for t in batch), names)
    assert_close(got, ref)


def test_a_kept_buffer_is_written_again_while_it_fits_and_replaced_when_it_does_not():
    model, buffer = mlp(), FlatGradientBuffer()
    selected = dict(model.named_parameters())
    names = list(selected)
    flats = []
    for n, seed in ((4, 1), (4, 2), (3, 3)):
        batch = data(10, seed)
        with TrainingStepCapture(model, layer_owners(model, selected), n, buffer=buffer) as capture:
            ce(model, batch).backward()
        got = capture.gradients(selected)
        assert_close(got, per_sample_gradients_loop(model, ce, tuple(t[:n] for t in batch), names))
        assert capture.flat.shape == (n, sum(p.numel() for p in selected.values()))
        flats.append(capture.flat)
        model.zero_grad(set_to_none=True)
    assert flats[1].data_ptr() == flats[0].data_ptr()  # the same n and parameters: the kept buffer
    assert flats[2].data_ptr() != flats[0].data_ptr()  # another n: a new one


def test_a_buffer_over_its_limit_is_not_kept():
    model = mlp()
    selected = dict(model.named_parameters())
    P = sum(p.numel() for p in selected.values())
    buffer = FlatGradientBuffer(max_bytes=4 * P * 8 - 1)  # just under 4 samples of float64 gradients
    small = buffer.take(selected, 3)[0]
    assert buffer.take(selected, 3)[0].data_ptr() == small.data_ptr()
    big = buffer.take(selected, 4)[0]
    assert big.shape == (4, P) and buffer.take(selected, 4)[0].data_ptr() != big.data_ptr()
    assert buffer.take(selected, 3)[0].data_ptr() == small.data_ptr()  # the small one is still kept


def test_the_training_step_itself_is_unchanged_and_the_hooks_go():
    model, batch = mlp(), data(10)
    ce(model, batch).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    def step() -> None:
        ce(model, batch).backward()

    captured(model, step, 4)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, plain[n]), n
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_only_the_first_training_forward_is_kept():
    # Validation forwards first (under no_grad, and in eval mode with gradients enabled), then two
    # accumulated micro-batches: the first of them.
    model, first, second = mlp(), data(6, seed=1), data(6, seed=2)

    def steps() -> None:
        with torch.no_grad():
            model(second[0])
        model.eval()
        model(second[0])
        model.train()
        ce(model, first).backward()
        ce(model, second).backward()

    got = captured(model, steps, 3)
    names = [n for n, _ in model.named_parameters()]
    assert_close(got, per_sample_gradients_loop(model, ce, tuple(t[:3] for t in first), names))


def test_a_model_that_is_one_layer():
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    batch = data(8)

    def step() -> None:
        ce(model, batch).backward()

    got = captured(model, step, 8)
    assert_close(got, per_sample_gradients_loop(model, ce, batch, ["weight", "bias"]))


@pytest.mark.parametrize("overrides", [{}, {"tie_weights": True}, {"qk_layernorm": True}],
                         ids=["untied", "tied", "qk-layernorm"])
@pytest.mark.parametrize("batch_size", [5, 6], ids=["fewer-samples-than-positions", "as-many"])
def test_a_position_lookup_shared_by_the_batch_is_read_from_the_sum_it_is_added_to(overrides, batch_size):
    model = tiny_gpt(**overrides)
    batch = tokens(batch_size, 6)
    got = captured(model, lambda: lm_loss(model, batch).backward(), 3)
    assert not isinstance(got, str), got
    names = [n for n, _ in model.named_parameters()]
    assert_close(got, per_sample_gradients_loop(model, lm_loss, tuple(t[:3] for t in batch), names))


def test_one_index_per_sample_is_not_taken_for_positions():
    class Classes(nn.Module):  # a per-sample lookup [B] -> [B, d], added to a per-sample feature
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.lin, self.head = nn.Embedding(7, 5), nn.Linear(5, 5), nn.Linear(5, 3)

        def forward(self, xc: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            return self.head(self.lin(xc[0]) + self.emb(xc[1]))

    torch.manual_seed(0)
    model = Classes().double()
    x, y = data(8)
    cls = torch.randint(0, 7, (8,))
    got = captured(model, lambda: nn.functional.cross_entropy(model((x, cls)), y).backward(), 2)
    assert isinstance(got, str) and "not the lookup's positions" in got


def test_a_shared_lookup_used_otherwise_is_named():
    class Scaled(nn.Module):  # the positions are multiplied, not added: their gradient cannot be read
        def __init__(self) -> None:
            super().__init__()
            self.tok, self.pos, self.head = nn.Embedding(11, 8), nn.Embedding(6, 8), nn.Linear(8, 11)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.head(self.tok(idx) * self.pos(torch.arange(idx.shape[1])))

    torch.manual_seed(0)
    model = Scaled().double()
    batch = tokens(4, 6)
    got = captured(model, lambda: lm_loss(model, batch).backward(), 2)
    assert isinstance(got, str) and "shared by the batch (Embedding) is used by MulBackward0" in got


def test_nothing_captured_says_so():
    model = mlp()
    assert captured(model, lambda: None, 2) == "no training forward with gradients ran while the hooks were held"


def hf_loss(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return m(input_ids=batch[0], labels=batch[1]).loss


def assert_hf_capture_matches_loop(model: nn.Module) -> None:
    batch = tokens(5, 6, vocab=23)
    got = captured(model, lambda: hf_loss(model, batch).backward(), 3)
    assert not isinstance(got, str), got
    names = [n for n, _ in model.named_parameters()]
    ref = per_sample_gradients_loop(model.eval(), hf_loss, tuple(t[:3] for t in batch), names)
    # Hugging Face's loss casts the logits to float32: sample-by-sample and batched roundings differ there.
    assert_close(got, ref, tol=1e-5)


def test_huggingface_gpt_neox_with_sdpa_and_rotary_positions():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPTNeoXConfig(vocab_size=23, hidden_size=8, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=16,
                                        max_position_embeddings=16, attn_implementation="sdpa",
                                        hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    assert_hf_capture_matches_loop(transformers.GPTNeoXForCausalLM(config).double().train())


def test_huggingface_gpt2_conv1d_and_position_ids():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=23, n_positions=16, n_embd=8, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
    torch.manual_seed(0)
    assert_hf_capture_matches_loop(transformers.GPT2LMHeadModel(config).double().train())


class WithSpare(nn.Module):
    """An MLP beside a layer its forward never calls: a zero gradient for every sample."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.spare = mlp(), nn.Linear(5, 2).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def moments_against_the_loop(model: nn.Module, loss_fn, batch, n: int):  # noqa: ANN001, ANN201
    """The capture's moments of a training step on ``batch``, checked against those of brute-force
    per-sample gradients of its first ``n`` samples."""
    from diagnostics.gradients import gradient_moments

    selected = dict(model.named_parameters())
    with TrainingStepCapture(model, layer_owners(model, selected), n) as capture:
        loss_fn(model, batch).backward()
    got = capture.moments(selected)
    assert not isinstance(got, str), got
    ref = gradient_moments(per_sample_gradients_loop(model, loss_fn, tuple(t[:n] for t in batch), list(selected)))
    assert got.n == n and list(got.mean) == list(selected)
    assert_close(got.mean, ref.mean)
    assert_close(got.var, ref.var)
    assert got.flat is not None and got.flat[0].numel() == sum(p.numel() for p in selected.values())
    return got


@pytest.mark.parametrize("overrides", [{}, {"tie_weights": True}], ids=["untied", "tied"])
def test_moments_straight_from_the_capture_equal_those_of_the_samples_gradients(overrides):
    """Reduced parameter by parameter without the [n, P] buffer (a tied weight kept until its last call):
    the moments of the brute-force per-sample gradients; an MLP's too, where a layer the forward never
    calls has zero mean and variance."""
    moments_against_the_loop(tiny_gpt(**overrides), lm_loss, tokens(6, 6), 4)

    torch.manual_seed(0)
    got = moments_against_the_loop(WithSpare(), ce, data(8), 5)
    assert not got.mean["spare.weight"].any() and not got.var["spare.bias"].any()


@pytest.mark.parametrize("overrides", [{}, {"tie_weights": True}], ids=["untied", "tied"])
def test_the_ratios_straight_from_the_capture_summarise_as_the_samples_gradients(overrides):
    """The reduction to GSNR's ratios parameter by parameter: the summaries of brute-force per-sample
    gradients' moments, and a layer the forward never calls as zero gradients."""
    from diagnostics.gradients import gradient_moments

    def check(model: nn.Module, loss_fn, batch, n: int) -> None:  # noqa: ANN001
        selected = dict(model.named_parameters())
        with TrainingStepCapture(model, layer_owners(model, selected), n) as capture:
            loss_fn(model, batch).backward()
        got = capture.reduction(selected)
        assert not isinstance(got, str), got
        assert got.corrected.dtype == torch.float64  # float64 parameters: ratios kept in float64
        ref = gradient_moments(per_sample_gradients_loop(model, loss_fn, tuple(t[:n] for t in batch), list(selected)))
        for a, b in zip(got.summaries(), ref.summaries(), strict=True):
            for k in b.mean:
                assert a.mean[k] == pytest.approx(b.mean[k], rel=1e-6, abs=1e-9), k
                assert a.median[k] == pytest.approx(b.median[k], rel=1e-6, abs=1e-9), k
        assert got.noise_parts().trace == pytest.approx(ref.noise_parts().trace, rel=1e-9)

    check(tiny_gpt(**overrides), lm_loss, tokens(6, 6), 4)

    torch.manual_seed(0)
    check(WithSpare(), ce, data(8), 5)


def test_a_float32_models_ratios_are_kept_in_float32_within_its_rounding():
    """float32 parameters: the ratios are kept in float32, and summarise as the float64 moments of the same
    captured gradients do, to float32 rounding of the tensor's largest ratio."""
    from diagnostics.gradients import gradient_moments

    model = tiny_gpt(tie_weights=True).float()
    selected = dict(model.named_parameters())
    with TrainingStepCapture(model, layer_owners(model, selected), 4) as capture:
        lm_loss(model, tokens(6, 6)).backward()
    got = capture.reduction(selected)
    assert not isinstance(got, str), got
    assert got.corrected.dtype == torch.float32
    ref = gradient_moments(capture.gradients(selected))
    ratios = ref.gsnr(), ref.gsnr_raw()
    for which, (a, b) in enumerate(zip(got.summaries(), ref.summaries(), strict=True)):
        for k in b.mean:
            values = [torch.cat([r.reshape(-1) for r in kind.values()]) if k == "all" else kind[k].reshape(-1)
                      for kind in (ratios[0], ratios[which])]
            scale = max(float(v.abs().max()) for v in values)
            assert abs(a.mean[k] - b.mean[k]) <= 3e-7 * scale, (k, a.mean[k], b.mean[k])
            assert abs(a.median[k] - b.median[k]) <= 3e-7 * scale, (k, a.median[k], b.median[k])


def test_moments_of_nothing_captured_say_why():
    model = mlp()
    selected = dict(model.named_parameters())
    with TrainingStepCapture(model, layer_owners(model, selected), 4) as capture:
        pass
    assert capture.moments(selected) == "no training forward with gradients ran while the hooks were held"
    assert capture.reduction(selected) == "no training forward with gradients ran while the hooks were held"


def test_buffers_of_reduced_parameters_are_taken_again_smallest_first():
    from diagnostics.gradients.training_capture import _take

    a, b = torch.empty(10), torch.empty(40)
    spare = [b, a]
    assert _take(spare, 8, torch.float32, torch.device("cpu")) is a and spare == [b]
    assert _take(spare, 8, torch.float64, torch.device("cpu")) is not b and spare == []  # no fit: all freed
    spare = [a]
    new = _take(spare, 11, torch.float32, torch.device("cpu"))
    assert new.numel() == 11 and spare == []
