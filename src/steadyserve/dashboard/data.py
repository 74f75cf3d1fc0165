"""What the dashboard page draws, from the gateway's metrics and time-series store (pure).

`snapshot` reads the cumulative counters and current gauges of every deployment from metric
families (the gateway's registry, summed over its workers); the page polls it every 2 s and
draws rates and latency percentiles from the difference of two snapshots. `history` reads the
gateway's own series store — per-minute points kept for 3 days, the request counters and the
request-duration histogram restored from the database after a restart
(observe.restore) — so the charts open on the last hours or days, throughput, errors and
latency alike, not on an empty axis.

`batch_sizes` reads the replicas' batch-size histograms out of their merged /metrics text
(`Gateway.replica_metrics`), summed over each deployment's replicas; the routes fetch it at
most every few seconds (`Periodic`). `replica_counts` gives actual against target
replicas; `jobs_view` shapes the
asynchronous jobs section from the queue's counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from prometheus_client.parser import text_string_to_metric_families

from ..observe.timeseries import SeriesStore
from ..policies.alert_rules import bucket_quantile
from ..policies.jobs import STATES as JOB_STATES

REQUESTS = "steadyserve_requests_total"
BUCKETS = "steadyserve_request_duration_seconds_bucket"
BATCH_SIZE = "steadyserve_replica_batch_size"
MAX_HISTORY_MIN = 3 * 24 * 60
HISTORY_POINTS = 720  # rows per deployment in one history answer, at most
T = TypeVar("T")
USAGE_REFRESH_S = 10.0  # per-key usage is read from the database at most this often
JOBS_REFRESH_S = 5.0  # asynchronous jobs are counted in the database at most this often
JOB_FAILURES_SHOWN = 10  # the newest failed, dead or expired jobs
JOB_ERROR_CHARS = 300  # of each one's error message
LOOKUPS = "steadyserve_cache_lookups_total"
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


def history(store: SeriesStore, now: float, minutes: int,
            max_points: int = HISTORY_POINTS) -> dict[str, list[list[float | None]]]:
    """{deployment: [[t, requests/s, 5xx/s, p50 ms, p95 ms, p99 ms], ...]} over the last
    `minutes`, one row per step (t: the step's end), oldest first.

    The step is the store's (per minute beyond its raw window), widened so that a window
    has at most `max_points` rows; rates and percentiles are exact per step because both
    come from counter increases (latency from the request-duration histogram's buckets,
    summed over handlers). A step with no point of a deployment has no row, except one row
    of nulls where its history stops (a gateway restart): the chart shows a gap there.
    """
    window = min(max(1, minutes), MAX_HISTORY_MIN) * 60.0
    tier = store.tier_for(window)
    base = store.raw_step_s if tier == "raw" else store.coarse_step_s
    step = base * max(1, math.ceil(window / base / max_points))
    end = math.floor(now / step) * step  # the last finished step
    steps = int(window // step)
    totals: dict[str, list[float | None]] = {}
    errors: dict[str, list[float]] = {}
    buckets: dict[str, dict[float, list[float]]] = {}

    def add(into: list[Any], incs: list[float | None]) -> None:
        for k, inc in enumerate(incs):
            if inc is not None:
                into[k] = (into[k] or 0.0) + inc

    for labels in store.keys(REQUESTS):
        lab = dict(labels)
        d = lab.get("deployment")
        if d is None:
            continue
        incs = store.step_increases((REQUESTS, labels), end, step, steps, tier)
        add(totals.setdefault(d, [None] * steps), incs)
        if lab.get("code") == "5xx":
            add(errors.setdefault(d, [0.0] * steps), incs)
    for labels in store.keys(BUCKETS):
        lab = dict(labels)
        d, le = lab.get("deployment"), lab.get("le")
        if d is None or le is None:
            continue
        try:
            bound = float(le)
        except ValueError:
            continue
        per_le = buckets.setdefault(d, {})
        add(per_le.setdefault(bound, [0.0] * steps),
            store.step_increases((BUCKETS, labels), end, step, steps, tier))
    out: dict[str, list[list[float | None]]] = {}
    for d, counts in totals.items():
        rows: list[list[float | None]] = []
        err = errors.get(d, [0.0] * steps)
        per_le = buckets.get(d, {})
        for k, count in enumerate(counts):
            t = end - (steps - k - 1) * step
            if count is None:
                if rows and rows[-1][1] is not None:
                    rows.append([t, None, None, None, None, None])
                continue
            cumulative = [(bound, incs[k]) for bound, incs in per_le.items()]
            rows.append([t, round(count / step, 4), round(err[k] / step, 4),
                         *(_ms(bucket_quantile(q, cumulative)) for q in (0.5, 0.95, 0.99))])
        if rows and rows[-1][1] is None:
            rows.pop()
        out[d] = rows
    return out


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else round(seconds * 1000, 3)


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


def replica_counts(replicas: Iterable[dict[str, Any]], target: int) -> dict[str, int]:
    """Actual against target: replicas that serve or will (not draining) by state, and
    those draining (retired by a rollout or a scale-down, finishing their requests)."""
    out = {"target": target, "actual": 0, "ready": 0, "starting": 0, "unhealthy": 0,
           "draining": 0}
    for r in replicas:
        if r.get("retiring") or r.get("state") == "stopping":
            out["draining"] += 1
            continue
        out["actual"] += 1
        state = r.get("state")
        if state in ("ready", "starting"):
            out[state] += 1
        else:  # unhealthy, or in backoff after a crash
            out["unhealthy"] += 1
    return out


def jobs_view(overview: dict[str, Any], now: float) -> dict[str, Any]:
    """The jobs section from `JobStore.overview`: one row per deployment with a count for
    every state (0 included, in the state machine's order) and its oldest queued job's
    submission time; the newest failures with their error, and the jobs waiting to be
    tried again with their last error (messages cut to `JOB_ERROR_CHARS`)."""
    oldest = overview.get("oldest_queued_at", {})
    rows = [{"deployment": d, "counts": {s: int(counts.get(s, 0)) for s in JOB_STATES},
             "oldest_queued_at": oldest.get(d)}
            for d, counts in sorted(overview.get("counts", {}).items())]
    return {"states": list(JOB_STATES), "deployments": rows,
            "failures": _job_rows(overview.get("failures", []), "finished_at"),
            "retrying": _job_rows(overview.get("retrying", []), "available_at"), "at": now}


def _job_rows(jobs: Iterable[dict[str, Any]], when: str) -> list[dict[str, Any]]:
    out = []
    for job in jobs:
        got = job.get("error")
        error: dict[str, Any] = got if isinstance(got, dict) else {}
        out.append({k: job.get(k) for k in ("id", "deployment", "handler", "state", "attempt",
                                            "failures", when)}
                   | {"error": {"code": str(error.get("code", "")),
                                "message": str(error.get("message", ""))[:JOB_ERROR_CHARS]}})
    return out


def cache_levels(families: Iterable[Any]) -> dict[str, dict[str, float | None]]:
    """{level: {hit, stale, miss, hit_ratio}} of the response cache's lookups per level (l1,
    l2) since the gateway started, summed over its processes; a stale answer counts as a hit
    (it was served) and hit_ratio is None before the first lookup."""
    out: dict[str, dict[str, float | None]] = {}
    for family in families:
        for s in family.samples:
            if s.name != LOOKUPS:
                continue
            level, result = s.labels.get("level"), s.labels.get("result")
            if level is None or result not in ("hit", "stale", "miss"):
                continue
            counts = out.setdefault(level, {"hit": 0.0, "stale": 0.0, "miss": 0.0})
            counts[result] = (counts[result] or 0.0) + s.value
    for counts in out.values():
        served = (counts["hit"] or 0.0) + (counts["stale"] or 0.0)
        total = served + (counts["miss"] or 0.0)
        counts["hit_ratio"] = round(served / total, 4) if total else None
    return dict(sorted(out.items()))
