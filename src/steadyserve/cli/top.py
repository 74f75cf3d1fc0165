"""`steadyserve top`: a live table of every deployment, from two scrapes of /metrics.

Pure parts (`snapshot`, `rows`) turn scrape text into figures over the interval between two
scrapes — requests and errors per second, p50/p99 from the latency histogram's bucket
deltas, cache hit ratio — and the command redraws them with rich's Live every `--interval-s`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from . import exit_codes
from .credentials import auth_headers


@dataclass
class Snap:
    """One deployment's cumulative counters and current gauges in one scrape."""

    requests: float = 0.0
    errors: float = 0.0  # 5xx
    buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count
    inflight: float = 0.0
    limit: float = 0.0
    queued: float = 0.0
    cache_hits: float = 0.0
    cache_items: float = 0.0


def snapshot(text: str) -> dict[str, Snap]:
    out: dict[str, Snap] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            d = s.labels.get("deployment")
            if d is None:
                continue
            snap = out.setdefault(d, Snap())
            if s.name == "steadyserve_requests_total":
                snap.requests += s.value
                if s.labels.get("code") == "5xx":
                    snap.errors += s.value
            elif s.name == "steadyserve_request_duration_seconds_bucket":
                le = math.inf if s.labels["le"] == "+Inf" else float(s.labels["le"])
                snap.buckets[le] = snap.buckets.get(le, 0.0) + s.value
            elif s.name == "steadyserve_admission_inflight":
                snap.inflight = s.value
            elif s.name == "steadyserve_admission_limit":
                snap.limit = s.value
            elif s.name == "steadyserve_admission_queued":
                snap.queued = s.value
            elif s.name == "steadyserve_cache_items_total":
                snap.cache_items += s.value
                if s.labels.get("result") in ("hit", "stale"):
                    snap.cache_hits += s.value
    return out


def quantile(deltas: dict[float, float], q: float) -> float | None:
    """The q-quantile (seconds) from cumulative bucket deltas, linear within a bucket, as
    Prometheus' histogram_quantile; None without observations."""
    bounds = sorted(deltas)
    if not bounds or deltas[bounds[-1]] <= 0:
        return None
    rank = q * deltas[bounds[-1]]
    lower, below = 0.0, 0.0
    for le in bounds:
        count = deltas[le]
        if count >= rank:
            if math.isinf(le):
                return lower
            inside = count - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 0.0)
        lower, below = le, count
    return lower


def rows(before: dict[str, Snap], after: dict[str, Snap], seconds: float,
         ready: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """One row per deployment: rates over `seconds` between two snapshots."""
    out = []
    for name in sorted(set(after) | set(ready)):
        a, b = after.get(name, Snap()), before.get(name, Snap())
        deltas = {le: a.buckets.get(le, 0.0) - b.buckets.get(le, 0.0) for le in a.buckets}
        items = a.cache_items - b.cache_items
        p50, p99 = quantile(deltas, 0.5), quantile(deltas, 0.99)
        out.append({
            "deployment": name,
            "ready": ready.get(name, (0, 0))[0], "desired": ready.get(name, (0, 0))[1],
            "rps": max(0.0, a.requests - b.requests) / seconds,
            "errors_per_s": max(0.0, a.errors - b.errors) / seconds,
            "p50_ms": None if p50 is None else p50 * 1000,
            "p99_ms": None if p99 is None else p99 * 1000,
            "inflight": a.inflight, "limit": a.limit, "queued": a.queued,
            "cache_hit_ratio": (a.cache_hits - b.cache_hits) / items if items > 0 else None,
        })
    return out


def _get(url: str, path: str) -> bytes:
    with urllib.request.urlopen(urllib.request.Request(f"{url}{path}", headers=auth_headers(url)),
                                timeout=10) as r:
        return bytes(r.read())


def _ready(url: str) -> dict[str, tuple[int, int]]:
    import json

    listing = json.loads(_get(url, "/v1/deployments"))["deployments"]
    return {d["name"]: (int(d["ready_replicas"]), int(d["desired_replicas"])) for d in listing}


def _table(data: list[dict[str, Any]], url: str, seconds: float) -> Any:
    from rich.table import Table

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    table = Table(title=f"steadyserve top — {url} — last {seconds:.1f}s", title_justify="left")
    for col in ("deployment", "ready", "req/s", "5xx/s", "p50 ms", "p99 ms", "in flight",
                "limit", "queued", "cache hit"):
        table.add_column(col, justify="left" if col == "deployment" else "right")
    for r in data:
        table.add_row(r["deployment"], f"{r['ready']}/{r['desired']}", f"{r['rps']:.1f}",
                      f"{r['errors_per_s']:.1f}", ms(r["p50_ms"]), ms(r["p99_ms"]),
                      f"{r['inflight']:g}", f"{r['limit']:g}", f"{r['queued']:g}",
                      "-" if r["cache_hit_ratio"] is None else f"{r['cache_hit_ratio']:.0%}")
    return table


def top(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    console = Console()
    try:
        before, at = snapshot(_get(args.url, "/metrics").decode()), time.monotonic()
    except (OSError, urllib.error.URLError, ValueError) as exc:
        print(f"steadyserve: cannot read {args.url}/metrics: {exc}", file=sys.stderr)
        return exit_codes.FAILURE
    done = 0
    try:
        with Live(console=console, refresh_per_second=4, transient=False) as live:
            while args.iterations is None or done < args.iterations:
                time.sleep(args.interval_s)
                try:
                    after, now = snapshot(_get(args.url, "/metrics").decode()), time.monotonic()
                    table = _table(rows(before, after, now - at, _ready(args.url)), args.url,
                                   now - at)
                except (OSError, urllib.error.URLError, ValueError) as exc:
                    live.update(f"[red]cannot read {args.url}: {exc}[/red]")
                    continue
                live.update(table)
                before, at = after, now
                done += 1
    except KeyboardInterrupt:
        pass
    return exit_codes.OK
