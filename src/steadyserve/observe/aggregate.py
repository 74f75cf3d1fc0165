"""Merge replicas' Prometheus text into the gateway's /metrics, adding deployment/replica labels.

Why aggregate instead of listing per-replica scrape targets: replicas live on ephemeral
loopback ports that Prometheus cannot discover, and one scrape of the gateway should show
the whole deployment. Each replica's own /metrics stays available for direct scraping.

Parsing is CPU work proportional to the replicas' output: the gateway calls
`merge_replica_metrics` in a worker thread, fetches each body within
`REPLICA_METRICS_TIMEOUT_S`, and leaves out a body over `MAX_REPLICA_METRICS_BYTES` (also
checked here), so one replica with a runaway label cannot stall or bloat the scrape.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

MAX_REPLICA_METRICS_BYTES = 4 * 1024 * 1024
REPLICA_METRICS_TIMEOUT_S = 1.0


class _Merged:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def merge_replica_metrics(texts: Mapping[tuple[str, str], str | bytes]) -> bytes:
    """`texts` maps (deployment, replica id) to that replica's exposition text (UTF-8 bytes
    or str). A text over MAX_REPLICA_METRICS_BYTES, or that does not parse, is left out."""
    merged: dict[str, Metric] = {}
    for (deployment, replica), raw in sorted(texts.items()):
        if len(raw) > MAX_REPLICA_METRICS_BYTES:
            continue
        try:
            text = raw.decode() if isinstance(raw, bytes) else raw
            families = list(text_string_to_metric_families(text))
        except ValueError:  # UnicodeDecodeError included
            continue  # a replica that answered garbage is skipped, not the whole scrape
        for fam in families:
            target = merged.get(fam.name)
            if target is None:
                target = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                labels = {**s.labels, "deployment": deployment, "replica": replica}
                target.samples.append(Sample(s.name, labels, s.value, s.timestamp, s.exemplar))
    if not merged:
        return b""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(list(merged.values())))
    return generate_latest(registry)


def summed_registry(own: CollectorRegistry, texts: Sequence[bytes]) -> _Merged:
    """This process's families with its data-plane workers' (their exposition `texts`)
    added, sample by sample with the same name and labels: counters and histogram buckets
    sum exactly, gauges of in-flight work and queues add up to the gateway's. A collector
    object: `generate_latest` renders it, the alert engine's sampler reads it. A worker
    text that does not parse is left out of this round."""
    merged: dict[str, Metric] = {}
    index: dict[tuple[str, str, tuple[tuple[str, str], ...]], int] = {}

    def add(fam: Metric) -> None:
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue  # a creation time does not add up
            target = merged.get(fam.name)
            if target is None:
                target = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type,
                                                   fam.unit)
            key = (fam.name, s.name, tuple(sorted(s.labels.items())))
            at = index.get(key)
            if at is None:
                index[key] = len(target.samples)
                target.samples.append(Sample(s.name, dict(s.labels), s.value, None, None))
            else:
                old = target.samples[at]
                target.samples[at] = Sample(old.name, old.labels, old.value + s.value, None, None)

    for fam in own.collect():
        add(fam)
    for raw in texts:
        try:
            families = list(text_string_to_metric_families(raw.decode()))
        except ValueError:
            continue
        for fam in families:
            add(fam)
    return _Merged(list(merged.values()))
