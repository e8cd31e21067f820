"""Samples rendered in the Prometheus text exposition format, version 0.0.4.

One family per metric name, in catalogue order, each with its HELP and TYPE lines. Sample
timestamps are left out, as Prometheus recommends for a live scrape: the server stamps the
scrape itself, and an explicit timestamp would stop it from marking vanished series stale.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from dbplane.metrics import catalog
from dbplane.metrics.catalog import Sample, canonical_labels

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def render(samples: Iterable[Sample]) -> str:
    """The exposition of `samples`. Every sample must be declared in the catalogue (KeyError
    for an unknown name, ValueError for an undeclared label: both are collector bugs); of two
    samples of the same series the last one wins, since a family may not repeat a series."""
    families: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for s in samples:
        metric = catalog.validate(s)
        labels = canonical_labels(s.labels)
        key = tuple((name, labels[name]) for name in metric.labels if name in labels)
        families.setdefault(s.name, {})[key] = s.value
    lines = []
    for metric in catalog.METRICS:
        series = families.get(metric.name)
        if not series:
            continue
        lines.append(f"# HELP {metric.name} {escape_help(metric.help)}")
        lines.append(f"# TYPE {metric.name} {metric.type}")
        for labels, value in series.items():
            lines.append(f"{metric.name}{format_labels(labels)} {format_value(value)}")
    return "".join(line + "\n" for line in lines)


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{name}="{escape_label_value(value)}"' for name, value in labels) + "}"


def format_value(value: float) -> str:
    """Go's float syntax as Prometheus reads it; whole numbers without a fraction (counters)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))
