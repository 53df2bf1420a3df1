"""docs/metrics.md has a row for every metric family of inference/metrics.py,
and for the front ends' family of live inference workers (inference/workers/directory.py)."""

from __future__ import annotations

import re

from prometheus_client.metrics import MetricWrapperBase

from inference import metrics
from inference.workers import directory as workers
from tests.processes import ROOT

# A row of a metrics table: | `name` | type | labels | meaning |
ROW = re.compile(r"^\| `(chatsite_\w+)` \| (\w+) \| ([\w, ]+) \|", flags=re.MULTILINE)


def documented_rows() -> dict[str, tuple[str, tuple[str, ...]]]:
    text = (ROOT / "docs" / "metrics.md").read_text()
    return {
        name: (kind, tuple(label.strip() for label in labels.split(",")))
        for name, kind, labels in ROW.findall(text)
    }


def defined_families() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Each family as Prometheus shows it (a counter's name ends in _total),
    with its type and label names."""
    families = {}
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            (family,) = metric.describe()
            name = family.name + "_total" if family.type == "counter" else family.name
            families[name] = (family.type, tuple(metric._labelnames))
    for family in workers.WorkersCollector([]).describe():
        families[family.name] = (family.type, tuple(family._labelnames))
    return families


def test_it_documents_every_metric_family_with_its_type_and_labels() -> None:
    defined = defined_families()
    # The lookup finds the module's families, the newest included, and the workers'.
    assert "chatsite_decode_batch_size" in defined
    assert "chatsite_inference_workers" in defined

    documented = documented_rows()

    missing = sorted(defined.keys() - documented.keys())
    assert not missing, f"no row in docs/metrics.md for {missing}"
    unknown = sorted(documented.keys() - defined.keys())
    assert not unknown, f"rows in docs/metrics.md for families the code lacks: {unknown}"
    for name, (kind, labels) in defined.items():
        assert documented[name] == (kind, labels), f"{name}: type and labels differ from the code"
