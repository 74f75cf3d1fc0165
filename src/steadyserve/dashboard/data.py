"""What the dashboard page draws, from the gateway's metrics and time-series store (pure).

`snapshot` reads the cumulative counters and current gauges of every deployment from metric
families (the gateway's registry, summed over its workers); the page polls it every 2 s and
draws rates and latency percentiles from the difference of two snapshots. `history` reads the
gateway's own series store — per-minute points kept for 3 days, and request counters restored
from the database after a restart — so the charts open on the last hours, not on an empty
axis.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from typing import Any

from ..observe.timeseries import SeriesStore

REQUESTS = "steadyserve_requests_total"
BUCKETS = "steadyserve_request_duration_seconds_bucket"
MAX_HISTORY_MIN = 3 * 24 * 60
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
