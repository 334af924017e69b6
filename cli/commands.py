"""The ``tdiag`` commands: analyze, ls, export, combine, demo (and report, from ``report_cmd``).

Each command is a thin layer over a library function. Every :class:`~diagnostics.errors.DiagnosticsError`
becomes one line on stderr and exit code 2, never a traceback; an interrupt (Ctrl-C) exits with 130 and
says how to resume. ``register(group)`` adds the commands to the ``tdiag`` click group.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click
from diagnostics.cli.errors import EXIT_USER_ERROR, handle_errors, one_line
from diagnostics.cli.report_cmd import report

from diagnostics.errors import ConfigError
from diagnostics.store.summary import run_summary

__all__ = [
    "register",
    "handle_errors",
    "analyze",
    "ls",
    "export",
    "combine",
    "demo",
    "run_summary",
    "COMMAND_NAMES",
    "EXIT_USER_ERROR",
]



# --------------------------------------------------------------------------------------- analyze


@click.command()
@click.argument("checkpoints", nargs=-1, type=click.Path(path_type=str))
@click.option(
    "--model",
    "model",
    metavar="SPEC",
    help="Zoo name (mlp-digits, cnn-digits, tiny-gpt), 'pkg.module:attr', 'file.py:attr' or 'hf:DIR'.",
)
@click.option(
    "--data",
    "data",
    metavar="SPEC",
    help="Zoo name (digits, pydoc-text, gaussian-mixture) or a spec of batches; default: the zoo model's data.",
)
@click.option(
    "--loss",
    "loss",
    metavar="SPEC",
    help="loss_fn(model, batch) spec; default: the zoo model's loss, the model's own loss for hf:DIR, else cross-entropy/MSE.",
)
@click.option(
    "--diagnostics",
    "diagnostics",
    metavar="LIST|PRESET",
    help="Comma-separated diagnostic names or a preset: cheap, standard, full (default standard).",
)
@click.option("--batches", type=int, help="Batches of data each checkpoint is measured on (default 4).")
@click.option("--batch-size", type=int, help="Batch size for zoo data and data factories.")
@click.option("--device", help="cpu or cuda (default cpu).")
@click.option("--run", "run", metavar="DIR", help="Run directory to write (resumed if it exists).")
@click.option("--force", is_flag=True, default=None, help="Recompute checkpoints already in the run.")
@click.option(
    "--unsafe-pickle",
    is_flag=True,
    default=None,
    help="Allow checkpoints that are full pickles. Loading them can run code stored in the file: only for files you trust.",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=str),
    help="TOML file with these options (top level or an [analyze] table); flags override it.",
)
@click.option("--seed", type=int, help="Seed for zoo data and data factories (default 0).")
@click.option("--quiet", "-q", is_flag=True, default=None, help="No progress bar or summary.")
@handle_errors
def analyze(checkpoints: tuple[str, ...], config_file: str | None, **flags: Any) -> None:
    """Run diagnostics over saved checkpoints and write them to a run store.

    CHECKPOINTS are files (.pt, .pth, .ckpt, .bin, .safetensors), Hugging Face model directories, or
    directories of them; they are analysed in step order. Checkpoints already in the run are skipped,
    so an interrupted analysis resumes where it stopped.

    \b
    Example:
      tdiag analyze checkpoints/ --model mlp-digits --data digits --run runs/analysis
    """
    from diagnostics.app.analyze import analyze_checkpoints
    from diagnostics.app.specs import load_config, merge_options

    config = load_config(config_file) if config_file else {}
    options = merge_options(config, {"checkpoints": checkpoints, **flags})
    paths = options.pop("checkpoints", None)
    if not paths:
        raise ConfigError(
            "no checkpoints given: pass checkpoint files or directories (or 'checkpoints' in --config)"
        )
    for required in ("model", "run"):
        if not options.get(required):
            raise ConfigError(f"--{required} is required (on the command line or in --config)")
    quiet = bool(options.pop("quiet", False))
    result = analyze_checkpoints(
        paths,
        model=options["model"],
        data=options.get("data"),
        loss=options.get("loss"),
        diagnostics=options.get("diagnostics"),
        batches=options.get("batches"),
        batch_size=options.get("batch_size"),
        device=options.get("device") or "cpu",
        run=options["run"],
        force=bool(options.get("force")),
        unsafe_pickle=bool(options.get("unsafe_pickle")),
        seed=options.get("seed") or 0,
        quiet=quiet,
    )
    if not quiet:
        skipped = (
            f", {len(result.skipped)} already in the run (use --force to recompute)" if result.skipped else ""
        )
        click.echo(
            f"analysed {len(result.analyzed)} checkpoint(s){skipped} in {result.seconds:.1f} s -> {result.run_dir}"
        )


# --------------------------------------------------------------------------------------- ls


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


@click.command()
@click.argument("run", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--events", "max_events", type=int, default=20, show_default=True, help="Events to list.")
@handle_errors
def ls(run: str, as_json: bool, max_events: int) -> None:
    """Summarise a run: its metrics with steps and last values, and its events."""
    summary = run_summary(run, max_events=max_events)
    if as_json:
        click.echo(json.dumps(summary, indent=2, allow_nan=True))
        return
    head = f"run {summary['run']} ({summary['path']})"
    if summary["model"]:
        head += f": {summary['model']}, {summary['num_params']:,} parameters"
    click.echo(head)
    if summary["steps"]:
        click.echo(
            f"{summary['steps']} steps, {summary['first_step']} to {summary['last_step']}"
            + (
                f"; {summary['checkpoints_analysed']} checkpoints analysed"
                if summary["checkpoints_analysed"]
                else ""
            )
        )
    else:
        click.echo("empty run: nothing recorded yet")
        return
    click.echo("")
    rows = [
        [
            m["metric"],
            str(m["keys"]),
            str(m["steps"]),
            f"{m['first_step']}-{m['last_step']}",
            _fmt(m["last_value"])
            if m["last_value"] is not None
            else f"{_fmt(m['last_min'])} .. {_fmt(m['last_max'])}",
        ]
        for m in summary["metrics"]
    ]
    click.echo(
        _table(rows, ["metric", "keys", "steps", "range", "last value (all, or min .. max over keys)"])
    )
    click.echo("")
    if summary["num_events"]:
        shown = len(summary["events"])
        click.echo(
            f"{summary['num_events']} event(s)"
            + (f", first {shown}:" if shown < summary["num_events"] else ":")
        )
        rows = [
            [str(e["step"]), e["kind"], e["severity"], e["key"] or "", one_line(e["message"])[:90]]
            for e in summary["events"]
        ]
        click.echo(_table(rows, ["step", "kind", "severity", "key", "message"]))
    else:
        click.echo("no events")
    if summary["not_ok"]:
        click.echo(
            "diagnostic statuses not ok: " + ", ".join(f"{k} {v}" for k, v in summary["not_ok"].items())
        )


# --------------------------------------------------------------------------------------- export


@click.command()
@click.argument("run", type=click.Path(path_type=str))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "parquet"]),
    default=None,
    help="Output format (default: from the file suffix, else csv).",
)
@click.option(
    "-o", "--output", "output", required=True, type=click.Path(path_type=str), help="File to write."
)
@click.option(
    "--table",
    type=click.Choice(["series", "events", "status", "sources"]),
    default="series",
    show_default=True,
    help="Which table to export.",
)
@click.option("--quiet", "-q", is_flag=True, help="Print nothing on success.")
@handle_errors
def export(run: str, fmt: str | None, output: str, table: str, quiet: bool) -> None:
    """Export a run's table (series by default) to CSV or Parquet, in long format."""
    from diagnostics.store import open_run

    if fmt is None:
        fmt = "parquet" if Path(output).suffix in (".parquet", ".pq") else "csv"
    with open_run(run) as r:
        path = r.export(output, format=fmt, table=table)
    if not quiet:
        click.echo(f"wrote {path}")


# --------------------------------------------------------------------------------------- combine


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option(
    "-o", "--output", "output", required=True, type=click.Path(path_type=str), help="Run directory to create."
)
@click.option("--overwrite", is_flag=True, help="Replace a run already at the output directory.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing on success.")
@handle_errors
def combine(runs: tuple[str, ...], output: str, overwrite: bool, quiet: bool) -> None:
    """Merge run stores (per-rank or per-job) into one run directory.

    Rows keep their step, metric, key and index; in-loop rows get their input run's name as source so
    per-rank rows stay apart. The merged run can be reported, listed, exported and resumed.
    """
    from diagnostics.store import combine_runs

    merged = combine_runs(list(runs), output, overwrite=overwrite)
    try:
        steps = len(merged.steps())
    finally:
        merged.close()
    if not quiet:
        click.echo(f"combined {len(runs)} run(s), {steps} steps -> {output}")


# --------------------------------------------------------------------------------------- demo


@click.command()
@click.option(
    "--out",
    "out",
    default="demo_output",
    show_default=True,
    type=click.Path(path_type=str),
    help="Directory for the runs, checkpoints and the report.",
)
@click.option("--quick", is_flag=True, help="A much shorter version (under a minute), for tests.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars; only the summary.")
@handle_errors
def demo(out: str, quick: bool, quiet: bool) -> None:
    """Train the zoo's tiny GPT twice (stable, exploding), analyse checkpoints, write a report."""
    from diagnostics.app.demo import run_demo

    result = run_demo(out, quick=quick, quiet=quiet)
    for line in result.summary_lines():
        click.echo(line)


#: Names of every command ``register`` adds.
COMMAND_NAMES = ("analyze", "report", "ls", "export", "combine", "demo")


def register(group: click.Group) -> click.Group:
    """Add every command to ``group`` (the ``tdiag`` click group); returns the group."""
    for cmd in (analyze, report, ls, export, combine, demo):
        group.add_command(cmd)
    return group
