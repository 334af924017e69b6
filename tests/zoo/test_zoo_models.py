import pytest
import torch

from diagnostics.errors import ConfigError
from diagnostics.zoo import MODELS, GPTConfig, TinyGPT, count_parameters, get_loss, get_model


def test_registry_names():
    assert set(MODELS) == {"mlp-digits", "cnn-digits", "tiny-gpt"}


@pytest.mark.parametrize("name", ["mlp-digits", "cnn-digits"])
def test_digit_models_shapes(name):
    m = get_model(name)
    assert m(torch.randn(5, 64)).shape == (5, 10)
    assert m(torch.randn(5, 1, 8, 8)).shape == (5, 10)


def test_mlp_options_and_counts():
    m = get_model("mlp-digits")
    assert count_parameters(m) == 64 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10
    relu = get_model("mlp-digits", activation="relu", hidden=(16,), num_classes=3, in_features=8)
    assert isinstance(relu.net[1], torch.nn.ReLU)
    assert relu(torch.randn(2, 8)).shape == (2, 3)
    with pytest.raises(ConfigError, match="activation"):
        get_model("mlp-digits", activation="swish")


def test_cnn_has_batchnorm():
    m = get_model("cnn-digits")
    assert any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())


def test_tiny_gpt_shapes_and_param_count():
    m = get_model("tiny-gpt")
    n = count_parameters(m)
    assert 100_000 <= n <= 2_000_000
    x = torch.randint(0, 96, (3, 20))
    assert m(x).shape == (3, 20, 96)
    big = get_model("tiny-gpt", d_model=128, n_layers=4, n_heads=8, block_size=128)
    assert count_parameters(big) <= 2_000_000


def test_tiny_gpt_param_count_formula():
    cfg = GPTConfig(vocab_size=50, block_size=16, d_model=32, n_layers=3, n_heads=2)
    d, v, t, L = 32, 50, 16, 3
    per_block = 4 * (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 2 * 2 * d
    expected = v * d + t * d + L * per_block + 2 * d + d * v
    assert count_parameters(TinyGPT(cfg)) == expected
    qk = TinyGPT(GPTConfig(vocab_size=50, block_size=16, d_model=32, n_layers=3, n_heads=2, qk_layernorm=True))
    assert count_parameters(qk) == expected + L * 2 * 2 * (d // 2)


@pytest.mark.parametrize("name", list(MODELS))
def test_deterministic_init_and_global_rng_untouched(name):
    state = torch.get_rng_state()
    a, b = get_model(name, seed=3), get_model(name, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    for (na, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), na
    c = get_model(name, seed=4)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_causality():
    m = get_model("tiny-gpt", n_layers=1)
    x = torch.randint(0, 96, (1, 10))
    y = x.clone()
    y[0, 7] = (x[0, 7] + 1) % 96
    out_x, out_y = m(x), m(y)
    torch.testing.assert_close(out_x[:, :7], out_y[:, :7])
    assert not torch.allclose(out_x[:, 7:], out_y[:, 7:])


def test_attention_logits_observable_by_hook():
    m = get_model("tiny-gpt", n_layers=2, n_heads=4, block_size=16)
    seen = {}
    handles = [
        mod.register_forward_hook(lambda mod_, inp, out, name=name: seen.__setitem__(name, out))
        for name, mod in m.named_modules()
        if name.endswith("attn.logits")
    ]
    try:
        m(torch.randint(0, 96, (2, 12)))
    finally:
        for h in handles:
            h.remove()
    assert set(seen) == {"blocks.0.attn.logits", "blocks.1.attn.logits"}
    assert seen["blocks.0.attn.logits"].shape == (2, 4, 12, 12)
    assert torch.isfinite(seen["blocks.0.attn.logits"]).all()


def test_forward_mode_ad_works():
    m = get_model("tiny-gpt", n_layers=1, block_size=8, qk_layernorm=True)
    params = {k: v.detach() for k, v in m.named_parameters()}
    tangents = {k: torch.randn_like(v) for k, v in params.items()}
    batch = (torch.randint(0, 96, (2, 8)), torch.randint(0, 96, (2, 8)))
    loss = get_loss("tiny-gpt")

    def f(p):
        return loss(lambda x: torch.func.functional_call(m, p, (x,)), batch)

    _, jvp = torch.func.jvp(f, (params,), (tangents,))
    assert torch.isfinite(jvp)


def test_gpt_knobs():
    base = get_model("tiny-gpt", seed=0)
    scaled = get_model("tiny-gpt", seed=0, residual_init_scale=10.0)
    assert scaled.blocks[0].mlp.fc2.weight.std() > 5 * base.blocks[0].mlp.fc2.weight.std()
    torch.testing.assert_close(scaled.blocks[0].mlp.fc1.weight, base.blocks[0].mlp.fc1.weight)
    assert isinstance(get_model("tiny-gpt", qk_layernorm=True).blocks[0].attn.q_norm, torch.nn.LayerNorm)
    tied = get_model("tiny-gpt", tie_weights=True)
    assert tied.head.weight is tied.tok_emb.weight
    assert get_model("tiny-gpt").config_dict()["d_model"] == 64


def test_gpt_errors():
    with pytest.raises(ConfigError, match="divisible"):
        get_model("tiny-gpt", d_model=30, n_heads=4)
    with pytest.raises(ConfigError, match="unknown tiny-gpt option"):
        get_model("tiny-gpt", depth=3)
    with pytest.raises(ConfigError, match="block_size"):
        get_model("tiny-gpt", block_size=8)(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ConfigError, match="unknown zoo model"):
        get_model("resnet")
