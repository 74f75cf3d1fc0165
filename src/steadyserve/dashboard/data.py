"""What the dashboard page draws, from the gateway's metrics and time-series store (pure).

`snapshot` reads the cumulative counters and current gauges of every deployment from metric
families (the gateway's registry, summed over its workers); the page polls it every 2 s and
draws rates and latency percentiles from the difference of two snapshots. `history` reads the
gateway's own series store — per-minute points kept for 3 days, and request counters restored
from the database after a restart — so the charts open on the last hours, not on an empty
axis.

`batch_sizes` reads the replicas' batch-size histograms out of their merged /metrics text
(`Gateway.replica_metrics`), summed over each deployment's replicas; the routes fetch it at
most every few seconds (`BatchSizes`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from prometheus_client.parser import text_string_to_metric_families

from ..observe.timeseries import SeriesStore

REQUESTS = "steadyserve_requests_total"
BUCKETS = "steadyserve_request_duration_seconds_bucket"
BATCH_SIZE = "steadyserve_replica_batch_size"
MAX_HISTORY_MIN = 3 * 24 * 60
T = TypeVar("T")
USAGE_REFRESH_S = 10.0  # per-key usage is read from the database at most this often
USAGE_SHOWN = 10  # the keys with the most requests today
BATCH_REFRESH_S = 5.0  # the replicas' /metrics are fetched at most this often for the page
GAUGES = {"steadyserve_admission_limit": "limit", "steadyserve_admission_inflight": "inflight",
          "steadyserve_admission_queued": "queued",
          "steadyserve_autoscale_desired_replicas": "autoscale_desired",
          "steadyserve_autoscale_demand": "autoscale_demand"}


def snapshot(families: Iterable[Any]) -> dict[str, dict[str, Any]]:
    """{deployment: counters and gauges} from metric families (prometheus_client Metric)."""
    out: dict[str, dict[str, Any]] = {}

    def of(name: str) -> dict[str, Any]:
        return out.setdefault(name, {"requests": {}, "buckets": {}, "shed": 0.0,
                                     "cache": {"hit": 0.0, "miss": 0.0}, "replicas": {}})

    for family in families:
        for s in family.samples:
            d = s.labels.get("deployment")
            if d is None:
                continue
            if s.name == REQUESTS:
                codes = of(d)["requests"]
                codes[s.labels["code"]] = codes.get(s.labels["code"], 0.0) + s.value
            elif s.name == BUCKETS:
                buckets = of(d)["buckets"]
                buckets[s.labels["le"]] = buckets.get(s.labels["le"], 0.0) + s.value
            elif s.name in GAUGES:
                of(d)[GAUGES[s.name]] = s.value
            elif s.name == "steadyserve_shed_requests_total":
                of(d)["shed"] += s.value
            elif s.name == "steadyserve_cache_items_total":
                result = "hit" if s.labels.get("result") in ("hit", "stale") else "miss"
                of(d)["cache"][result] += s.value
            elif s.name == "steadyserve_replicas":
                of(d)["replicas"][s.labels["state"]] = s.value
    return out


def history(store: SeriesStore, now: float, minutes: int) -> dict[str, list[list[float]]]:
    """{deployment: [[t, requests/s, 5xx/s], ...]} per coarse step over the last `minutes`."""
    window = min(max(1, minutes), MAX_HISTORY_MIN) * 60.0
    step = store.coarse_step_s if window > store.raw_retention_s else store.raw_step_s
    totals: dict[str, dict[float, list[float]]] = {}
    for labels in store.keys(REQUESTS):
        lab = dict(labels)
        d = lab.get("deployment")
        if d is None:
            continue
        points = store.values((REQUESTS, labels), window, now)
        rows = totals.setdefault(d, {})
        for (t0, v0), (t1, v1) in itertools.pairwise(points):
            dt = t1 - t0
            if dt <= 0:
                continue
            slot = math.floor(t1 / step) * step
            inc = v1 - v0 if v1 >= v0 else v1  # a counter reset: the new value is the increase
            row = rows.setdefault(slot, [0.0, 0.0])
            row[0] += inc / dt
            if lab.get("code") == "5xx":
                row[1] += inc / dt
    return {d: [[t, round(r[0], 4), round(r[1], 4)] for t, r in sorted(rows.items())]
            for d, rows in totals.items()}


def _le(raw: str) -> str:
    """A bucket bound as people write it: "4" for "4.0", "+Inf" unchanged."""
    bound = float(raw)
    return "+Inf" if math.isinf(bound) else f"{bound:g}"


def batch_sizes(text: str | bytes) -> dict[str, dict[str, dict[str, Any]]]:
    """{deployment: {handler: {batches, items, mean, buckets: {le: cumulative count}}}} from
    merged replica metrics (each sample labelled with its deployment), summed over replicas.
    `mean` is None before the first batch. Text that does not parse gives {}."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    # only the batch-size lines: the rest of every replica's exposition is not parsed
    prefixes = (f"{BATCH_SIZE}_", f"# TYPE {BATCH_SIZE} ", f"# HELP {BATCH_SIZE} ")
    wanted = "\n".join(line for line in text.splitlines() if line.startswith(prefixes))
    out: dict[str, dict[str, dict[str, Any]]] = {}
    try:
        families = list(text_string_to_metric_families(wanted + "\n"))
    except ValueError:
        return {}
    for family in families:
        for s in family.samples:
            d, handler = s.labels.get("deployment"), s.labels.get("handler")
            if d is None or handler is None:
                continue
            h = out.setdefault(d, {}).setdefault(
                handler, {"batches": 0.0, "items": 0.0, "mean": None, "buckets": {}})
            if s.name == f"{BATCH_SIZE}_count":
                h["batches"] += s.value
            elif s.name == f"{BATCH_SIZE}_sum":
                h["items"] += s.value
            elif s.name == f"{BATCH_SIZE}_bucket" and "le" in s.labels:
                try:
                    le = _le(s.labels["le"])
                except ValueError:
                    continue
                h["buckets"][le] = h["buckets"].get(le, 0.0) + s.value
    for handlers in out.values():
        for h in handlers.values():
            h["mean"] = round(h["items"] / h["batches"], 2) if h["batches"] else None
            h["buckets"] = dict(sorted(h["buckets"].items(), key=lambda kv: float(kv[0])))
    return out


@dataclass(slots=True)
class Periodic(Generic[T]):
    """A value read again at most every `refresh_s` (the replicas' batch sizes, per-key usage
    from the database), and when it was last read (monotonic seconds)."""

    value: T
    refresh_s: float
    at: float = -math.inf

    def stale(self, now: float) -> bool:
        return now - self.at >= self.refresh_s

    def keep(self, value: T, now: float) -> None:
        self.value, self.at = value, now
