import socket

import pytest
import torch

from diagnostics.errors import ConfigError, DataError
from diagnostics.zoo import DATASETS, MODELS, VOCAB_SIZE, decode, encode, get_data, get_loss, get_model
from diagnostics.zoo.data import char_batches, digits_arrays, pydoc_corpus, pydoc_tokens


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("zoo data must not use the network")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_registry_names():
    assert set(DATASETS) == {"digits", "pydoc-text", "gaussian-mixture"}


@pytest.mark.parametrize("name", ["digits", "pydoc-text", "gaussian-mixture"])
def test_data_is_local_and_deterministic(name, no_network):
    a = get_data(name, batch_size=8, num_batches=3, seed=1)
    b = get_data(name, batch_size=8, num_batches=3, seed=1)
    c = get_data(name, batch_size=8, num_batches=3, seed=2)
    assert len(a) == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert any(not torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))


def test_global_rng_untouched():
    state = torch.get_rng_state()
    for name in DATASETS:
        get_data(name, num_batches=2)
    assert torch.equal(torch.get_rng_state(), state)


def test_digits_split_and_standardisation():
    xtr, ytr = digits_arrays("train")
    xte, yte = digits_arrays("test")
    assert xtr.shape == (1438, 64) and xte.shape == (359, 64)
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert set(ytr.unique().tolist()) == set(range(10))
    torch.testing.assert_close(xtr.mean(0), torch.zeros(64), atol=1e-5, rtol=0)
    std = xtr.std(0)
    assert ((std - 1).abs() < 1e-4).sum() >= 58  # a few border pixels are constant
    epoch = get_data("digits", batch_size=100)
    assert len(epoch) == 15 and sum(len(y) for _, y in epoch) == 1438
    assert torch.equal(get_data("digits", split="val", batch_size=400)[0][0].sort(0)[0], xte.sort(0)[0])


def test_pydoc_text_batches():
    (x, y), *_ = get_data("pydoc-text", batch_size=4, num_batches=2, block_size=32)
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert 0 <= int(x.min()) and int(x.max()) < VOCAB_SIZE
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    assert len(get_data("pydoc-text")) == 10
    assert len(pydoc_corpus()) > 100_000
    tr, te = pydoc_tokens("train"), pydoc_tokens("test")
    assert tr.numel() > 8 * te.numel() > 0
    xt = get_data("pydoc-text", num_batches=1, split="test")[0][0]
    assert not torch.equal(xt, get_data("pydoc-text", num_batches=1)[0][0])


def test_vocab_roundtrip():
    s = "def f(x):\n    return x  # ok"
    assert decode(encode(s)) == s
    assert decode(encode("“é”")) == '"?"'


def test_gaussian_mixture():
    (x, y), *_ = get_data("gaussian-mixture", batch_size=32, num_batches=1)
    assert x.shape == (32, 64) and x.dtype == torch.float32
    batches = get_data("gaussian-mixture", batch_size=10, num_batches=1, num_classes=3, dim=5, num_samples=30)
    assert batches[0][0].shape == (10, 5) and int(batches[0][1].max()) <= 2


def test_each_model_runs_on_its_data_with_its_loss():
    for name, entry in MODELS.items():
        model = get_model(name)
        batch = get_data(entry.data, batch_size=4, num_batches=1)[0]
        loss = get_loss(name)(model, batch)
        assert loss.dim() == 0 and torch.isfinite(loss)
        loss.backward()


def test_errors():
    with pytest.raises(ConfigError, match="split"):
        get_data("digits", split="dev")
    with pytest.raises(ConfigError, match="unknown zoo dataset"):
        get_data("mnist")
    with pytest.raises(ConfigError, match="batch_size"):
        get_data("digits", batch_size=0)
    with pytest.raises(ConfigError, match="bad option"):
        get_data("digits", colour=True)
    with pytest.raises(DataError, match="too short"):
        char_batches(torch.arange(5), 2, 8, 1)
