"""Reading /metrics the way Prometheus does: with prometheus-client's parser."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families


def prompt_cache_tokens(model: str, source: str) -> float:
    """Prompt tokens this process's engines reused from ``source`` (slot or ram)."""
    value = REGISTRY.get_sample_value(
        "chatsite_prompt_cache_tokens_total", {"model": model, "source": source}
    )
    return value or 0.0


class Scrape:
    """One parsed exposition; ``value`` sums the samples matching the labels."""

    def __init__(self, text: str) -> None:
        self.samples = [
            (sample.name, dict(sample.labels), sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]

    def value(self, name: str, **labels: str) -> float:
        return sum(
            value
            for sample_name, sample_labels, value in self.samples
            if sample_name == name and _matches(sample_labels, labels)
        )

    def names(self) -> set[str]:
        return {name for name, _, _ in self.samples}


def _matches(sample_labels: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    return all(sample_labels.get(key) == value for key, value in wanted.items())


def delta(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)
