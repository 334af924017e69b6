"""The catalogue closes the loop between everything that names a metric or a meta key.

Diagnostics declare the IDs they write (``Diagnostic.metrics``), the report's panels the IDs they draw
(``Panel.metrics``), the synthetic run writes IDs, ``docs/metrics.md`` defines them, and the Monitor, the
store and ``combine`` write meta keys. None of them imports the others; each is checked here against
:mod:`diagnostics.store.catalog`, so a metric added to one and forgotten in another fails a test. The
registries are read through their APIs (``diagnostics.metrics.registry()`` and ``variants()``,
``diagnostics.reports.registry()``), never through file paths.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from diagnostics.store import RunWriter, catalog, open_run
from diagnostics.store.catalog import META, METRICS

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def diagnostics_registry():
    """Every registered diagnostic by name: the presets' classes and the variants selected by name."""
    from diagnostics.metrics import registry, variants

    return {**registry(), **variants()}


@pytest.fixture(scope="module")
def panels():
    from diagnostics.reports import registry

    return registry()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from diagnostics.testing.synthetic import write_synthetic_run

    path = write_synthetic_run(tmp_path_factory.mktemp("catalog") / "run", steps=41, layers=1, seed=0)
    run = open_run(path)
    yield run
    run.close()


# --- diagnostics <-> catalogue ----------------------------------------------------------------------------


def test_every_declared_metric_is_in_the_catalogue(diagnostics_registry):
    from diagnostics.metrics import get_diagnostic

    problems = []
    for name, cls in sorted(diagnostics_registry.items()):
        declared = set(cls.metrics) | set(get_diagnostic(name).metrics)
        for metric in sorted(declared):
            spec = METRICS.get(metric)
            if spec is None:
                problems.append(f"{name} declares {metric!r}, which is not in diagnostics/store/catalog.py")
            elif name != spec.diagnostic:
                problems.append(f"{name} declares {metric!r}, but the catalogue says {spec.diagnostic} writes it")
    assert not problems, "\n".join(problems)


def test_every_catalogue_metric_is_declared_by_its_diagnostic(diagnostics_registry):
    from diagnostics.metrics import get_diagnostic

    problems = []
    for spec in METRICS.values():
        if spec.diagnostic is None:
            if spec.writer in diagnostics_registry:
                problems.append(f"{spec.id}: writer {spec.writer!r} is a registered diagnostic; name it in diagnostic=")
            continue
        if spec.diagnostic not in diagnostics_registry:
            problems.append(f"{spec.id}: diagnostic {spec.diagnostic!r} is not registered")
            continue
        inst = get_diagnostic(spec.diagnostic, **spec.options)
        if spec.id not in inst.metrics:
            problems.append(f"{spec.id}: {spec.diagnostic}({dict(spec.options)}) does not declare it in .metrics")
        if inst.name != spec.writer:
            problems.append(f"{spec.id}: {spec.diagnostic}({dict(spec.options)}) is named {inst.name!r} in the "
                            f"status table, the catalogue says {spec.writer!r}")
    assert not problems, "\n".join(problems)


# --- panels <-> catalogue ---------------------------------------------------------------------------------


def test_every_panel_metric_is_in_the_catalogue(panels):
    unknown = sorted({f"{p.id}: {m}" for p in panels for m in p.metrics if m not in METRICS})
    assert not unknown, f"panels draw metric IDs the catalogue does not know: {unknown}"


def test_every_catalogue_metric_is_shown_or_says_why(panels):
    shown = {m: [p.id for p in panels if m in p.metrics] for m in METRICS}
    hidden = sorted(m for m, ids in shown.items() if not ids and not METRICS[m].not_shown)
    contradictions = sorted(f"{m} (panels {ids})" for m, ids in shown.items() if ids and METRICS[m].not_shown)
    assert not hidden, f"no report panel declares {hidden}; add them to a panel's metrics or give not_shown a reason"
    assert not contradictions, f"marked not_shown but declared by a panel: {contradictions}"


# --- synthetic run, docs --------------------------------------------------------------------------------


def test_synthetic_run_writes_every_catalogue_metric(synthetic):
    assert synthetic.metrics() == sorted(METRICS)


def test_synthetic_rows_have_the_catalogue_kind(synthetic):
    series = synthetic.series()
    problems = []
    for metric, rows in series.groupby("metric"):
        kind = METRICS[metric].kind
        keys, indexed = set(rows["key"]), bool((rows["index"] != 0).any())
        if kind in (catalog.SCALAR, catalog.PER_LAYER, catalog.PER_DIAGNOSTIC) and indexed:
            problems.append(f"{metric} ({kind}) has rows with index != 0")
        if kind in (catalog.SCALAR, catalog.VECTOR) and keys != {"all"}:
            problems.append(f"{metric} ({kind}) has keys {sorted(keys)[:3]}, expected only 'all'")
        if kind in (catalog.PER_LAYER_VECTOR, catalog.PER_DIAGNOSTIC) and "all" in keys:
            problems.append(f"{metric} ({kind}) has rows under 'all'")
    assert not problems, "\n".join(problems)


def test_docs_define_every_metric_and_meta_key():
    text = (ROOT / "docs/metrics.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"`([a-z][a-z0-9_]*)`", text))
    assert not sorted(set(METRICS) - documented), "docs/metrics.md does not define these metric IDs"
    assert not sorted(set(META) - documented), "docs/metrics.md does not describe these meta keys"
    headings = set(re.findall(r"^## (.+?)\s*$", text, re.M))
    families = {spec.family for spec in METRICS.values()}
    assert families <= headings, f"catalogue families without a section in docs/metrics.md: {families - headings}"


def test_catalogue_entries_are_well_formed():
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", m) for m in METRICS)
    assert all(spec.meaning and spec.keys and spec.family for spec in METRICS.values())
    assert catalog.written_by("hessian_top") == ("hessian_eigenvalue", "hessian_residual", "hessian_converged",
                                                 "hessian_bottom_eigenvalue", "hessian_probe_step")
    with pytest.raises(KeyError, match="no_such_writer"):
        catalog.written_by("no_such_writer")


# --- meta keys ----------------------------------------------------------------------------------------------


def test_store_writes_exactly_the_store_keys(tmp_path):
    with RunWriter(tmp_path / "run") as w:
        w.write_step(0)
    with open_run(tmp_path / "run") as run:
        assert set(run.meta) == set(catalog.store_meta_keys())


def test_synthetic_meta_keys_are_in_the_catalogue(synthetic):
    assert set(synthetic.meta) <= set(META), sorted(set(synthetic.meta) - set(META))


def test_monitor_writes_catalogue_meta_keys(tmp_path):
    torch = pytest.importorskip("torch")
    from diagnostics import Monitor

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    with Monitor(model, run=tmp_path / "run", diagnostics="cheap", optimizer=opt) as monitor:
        for step in range(2):
            loss = torch.nn.functional.cross_entropy(model(batch[0]), batch[1])
            opt.zero_grad()
            loss.backward()
            monitor.step(step, batch, loss)
            opt.step()
    with open_run(tmp_path / "run") as run:
        keys = set(run.meta)
        monitor_seconds_keys = set(run.series("monitor_seconds")["key"])
        metrics = set(run.metrics())
    assert keys <= set(META), f"the Monitor writes meta keys the catalogue does not know: {sorted(keys - set(META))}"
    expected = set(catalog.store_meta_keys()) | set(catalog.monitor_meta_keys())
    assert expected <= keys, f"catalogue meta keys the Monitor did not write: {sorted(expected - keys)}"
    assert metrics <= set(METRICS)
    # monitor_seconds is keyed by the writers' status-table names
    assert monitor_seconds_keys <= {spec.writer for spec in METRICS.values()}
