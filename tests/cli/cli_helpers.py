"""Helpers shared by the command-line tests."""

from __future__ import annotations

import click
import torch
from click.testing import CliRunner


def invoke(runner: CliRunner, group: click.Group, *args: str):
    """Run a command; returns the click Result (stdout and stderr kept apart)."""
    return runner.invoke(group, [str(a) for a in args], catch_exceptions=False)


def assert_user_error(result, *fragments: str) -> None:
    """Exit code 2, one line on stderr containing every fragment, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def save_mlp_checkpoints(folder, steps=(2, 4, 6), *, fmt: str = "dict") -> list:
    """Train the zoo's digits MLP a few SGD steps and save checkpoints at ``steps``; returns the paths."""
    from diagnostics.zoo import get_data, get_loss, get_model

    folder.mkdir(parents=True, exist_ok=True)
    model = get_model("mlp-digits")
    loss_fn = get_loss("mlp-digits")
    batches = get_data("digits", batch_size=32, num_batches=max(steps))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    paths = []
    for i, batch in enumerate(batches, start=1):
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
        if i in steps:
            path = folder / f"ckpt_{i:04d}.pt"
            torch.save(
                {"model": model.state_dict(), "step": i} if fmt == "dict" else model.state_dict(), path
            )
            paths.append(path)
    return paths
