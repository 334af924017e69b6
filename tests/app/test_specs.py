"""Resolution of model, data and loss specs, and TOML config files."""

from __future__ import annotations

import textwrap

import pytest
import torch

from diagnostics.errors import ConfigError, SpecError
from diagnostics.app.specs import (
    load_config,
    load_object,
    merge_options,
    resolve_data,
    resolve_loss,
    resolve_model,
)

USER_FILE = textwrap.dedent(
    """
    import torch

    class Net(torch.nn.Module):
        def __init__(self, width=3):
            super().__init__()
            self.fc = torch.nn.Linear(4, width)

        def forward(self, x):
            return self.fc(x)

    def build():
        return Net(width=2)

    instance = Net()
    not_a_model = 42

    def needs_args(width):
        return Net(width)

    def batches(batch_size=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        return [(torch.randn(batch_size, 4, generator=g), torch.randint(0, 3, (batch_size,), generator=g))
                for _ in range(5)]

    fixed = [(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))]

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 10
        def __getitem__(self, i):
            return torch.full((4,), float(i)), i % 3

    def loss(model, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y)

    class Loss:
        def __call__(self, model, batch):
            return loss(model, batch)

    def broken():
        raise RuntimeError("boom")
    """
)


@pytest.fixture()
def user_file(tmp_path):
    path = tmp_path / "user_code.py"
    path.write_text(USER_FILE)
    return path


def test_file_spec_class_factory_and_instance(user_file):
    assert resolve_model(f"{user_file}:Net").fc.out_features == 3
    assert resolve_model(f"{user_file}:build").fc.out_features == 2
    assert resolve_model(f"{user_file}:instance").fc.out_features == 3


def test_module_spec(monkeypatch, user_file):
    monkeypatch.syspath_prepend(str(user_file.parent))
    assert resolve_model("user_code:build").fc.out_features == 2
    assert load_object("torch.nn:Linear") is torch.nn.Linear
    assert load_object("torch:nn.Linear") is torch.nn.Linear


def test_relative_file_spec_uses_base_dir(user_file):
    assert resolve_model("user_code.py:Net", base_dir=user_file.parent).fc.out_features == 3


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("no_such_module_xyz:Net", "module 'no_such_module_xyz' not found"),
        ("missing/file.py:Net", "not found"),
        ("{file}:Nope", "has no attribute 'Nope'"),
        ("{file}:not_a_model", "not a model and not callable"),
        ("{file}:needs_args", "needs argument(s) width"),
        ("{file}:broken", "raised RuntimeError: boom"),
        ("{file}:batches", "not a torch.nn.Module"),
        ("no-colon-and-not-builtin", "neither a built-in name"),
    ],
)
def test_model_spec_errors_name_the_failing_part(user_file, spec, fragment):
    with pytest.raises(SpecError) as info:
        resolve_model(spec.format(file=user_file))
    assert fragment in str(info.value)


def test_data_specs(user_file):
    batches = resolve_data(f"{user_file}:batches", batch_size=3, num_batches=2)
    assert len(batches) == 2 and batches[0][0].shape == (3, 4)
    # Deterministic: the same batches every time.
    again = resolve_data(f"{user_file}:batches", batch_size=3, num_batches=2)
    assert torch.equal(batches[1][0], again[1][0])
    assert len(resolve_data(f"{user_file}:fixed")) == 1
    # A map-style Dataset is batched.
    data = resolve_data(f"{user_file}:Data", batch_size=4)
    assert [len(b[1]) for b in data] == [4, 4, 2]


def test_data_spec_errors(user_file):
    with pytest.raises(SpecError, match="neither an iterable of batches"):
        resolve_data(f"{user_file}:not_a_model")
    with pytest.raises(SpecError, match="yields no batches"):
        resolve_data([])
    with pytest.raises(ConfigError, match="batch size"):
        resolve_data(f"{user_file}:fixed", batch_size=0)


def test_loss_specs(user_file):
    assert resolve_loss(None) is None
    assert resolve_loss("default") is None
    fn = resolve_loss(f"{user_file}:loss")
    obj = resolve_loss(f"{user_file}:Loss")
    model = resolve_model(f"{user_file}:Net")
    batch = resolve_data(f"{user_file}:fixed")[0]
    assert torch.isclose(fn(model, batch), obj(model, batch))
    with pytest.raises(SpecError, match="not callable"):
        resolve_loss(f"{user_file}:not_a_model")
    with pytest.raises(SpecError, match="omit --loss"):
        resolve_loss("mse")


def test_config_file_and_override(tmp_path, user_file):
    config = tmp_path / "sub" / "analysis.toml"
    config.parent.mkdir()
    config.write_text(
        textwrap.dedent(
            """
            [analyze]
            model = "../user_code.py:Net"
            data = "pkg.mod:data"
            checkpoints = ["ckpts"]
            batch-size = 16
            run = "runs/a"
            """
        )
    )
    options = load_config(config)
    assert options["model"] == f"{config.parent / '../user_code.py'}:Net"
    assert resolve_model(options["model"]).fc.out_features == 3
    assert options["data"] == "pkg.mod:data"
    assert options["checkpoints"] == [str(config.parent / "ckpts")]
    assert options["run"] == str(config.parent / "runs/a")
    merged = merge_options(options, {"batch_size": 4, "run": None, "checkpoints": (), "force": None})
    assert merged["batch_size"] == 4
    assert merged["run"] == options["run"]
    assert merged["checkpoints"] == options["checkpoints"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("modle = 'x'", "unknown option 'modle'"),
        ("batches = 'four'", "must be int"),
        ("batches = true", "must be int"),
        ("model = [", "not valid TOML"),
    ],
)
def test_config_errors(tmp_path, text, fragment):
    config = tmp_path / "c.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert fragment in str(info.value)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
