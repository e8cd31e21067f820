"""Metrics: the catalogue of what dbplane measures, the embedded history store and the
Prometheus exposition. Collection (dbplane.metrics.collect, coming) produces `Sample`s;
everything here only names, stores and renders them."""

from dbplane.metrics.catalog import METRICS, Metric, Sample

__all__ = ["METRICS", "Metric", "Sample"]
