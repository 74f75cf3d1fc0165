"""Cache benchmark for steadyserve: eviction policies, gateway response-cache hits, the risk
example's feature cache on SQLite and PostgreSQL, and cache-affinity routing.

    .venv/bin/python benchmarks/cache.py                  # the full run (about 3½ minutes)
    .venv/bin/python benchmarks/cache.py --quick          # a ~1½ minute smoke run
    .venv/bin/python benchmarks/cache.py --only hit-ratio
    .venv/bin/python benchmarks/cache.py --wait-load 300  # first wait for a 1-minute load < 1.0

Phases (--only picks one):
  hit-ratio      in process, no sockets: W-TinyLFU vs LRU through `cache.MemoryCache` on Zipf
                 and scan-polluted streams; the SHARDS estimate (`HitCurve`) vs the exact LRU
  gateway-hits   `steadyserve run benchmarks/cache_echo.py:CacheEcho` (1 replica): answered from
                 the gateway's cache vs `Cache-Control: no-store`, and a FastAPI app with a dict
                 cache, under wrk -c64 and -c1
  risk-features  the risk example (2 replicas) on SQLite and PostgreSQL, feature cache on / off,
                 Zipf accounts with `Cache-Control: no-store`; and the model in process
  affinity       the risk example with a feature cache for ~5 % of accounts per replica,
                 `[cache] affinity = true` vs `false`

Prints one table (every figure, its ratio, and its target where it has one) and writes
benchmarks/results/cache-<timestamp>.json. Targets are reported, never asserted: the exit status
is 1 only if something failed to start or run, 2 if wrk is missing. Everything listens on
127.0.0.1 on ports the OS picks; every load run is bounded in time; only processes started here
are stopped (by PID), and the PostgreSQL schema created here is dropped at the end.

The server plumbing (starting `steadyserve run` and uvicorn, readiness, stopping, CPU
accounting, /metrics scraping, the table) comes from `serving.py` in this folder.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import serving as sv  # noqa: E402  (benchmarks/serving.py: servers, wrk accounting, table)

REPO = sv.REPO
RESULTS = sv.RESULTS
LUA = BENCH / "cache_bodies.lua"
ECHO_SERVICE = "benchmarks/cache_echo.py:CacheEcho"
ECHO_DEPLOYMENT = "cache-echo"
ECHO_PATH = f"/v1/deployments/{ECHO_DEPLOYMENT}/echo"
ECHO_BODY = {"text": "a cached answer: the same body on every request"}
RISK_SERVICE = "steadyserve.examples.risk.service:RiskScorer"
RISK_PATH = "/v1/deployments/risk/score"
NO_STORE = "Cache-Control: no-store"
DEFAULT_PG_URL = os.environ.get("STEADYSERVE_TEST_POSTGRES_URL",
                                "postgresql://postgres@127.0.0.1:5432/test")
PHASES = ("hit-ratio", "gateway-hits", "risk-features", "affinity")
LOAD_QUIET = 1.0  # --wait-load: wait until the 1-minute load average is below this

TARGETS = {
    "hit_rps_c64": 3000.0,   # gateway cache hits, wrk -c64 -t2, req/s (≥)
    "hit_p50_c1_ms": 0.5,    # gateway cache hits, wrk -c1, p50 (≤)
}

Row = tuple[str, str, str, str, str]  # section, measure, value, target, verdict
log = sv.log


# ---------------------------------------------------------------------------------------------
# settings and bookkeeping

class CpuWatch(sv.CpuWatch):
    """serving.CpuWatch, plus the CPU of children the watched roots have already reaped: a
    PostgreSQL backend ends when its connection closes, and its time then moves to the
    postmaster's children_user/system."""

    def _tree(self) -> float:
        import psutil

        total = super()._tree()
        for pid in self.pids:
            with contextlib.suppress(psutil.Error):
                t = psutil.Process(pid).cpu_times()
                total += t.children_user + t.children_system
        return total


def postgres_pids() -> list[int]:
    """The local PostgreSQL postmaster(s): during the PostgreSQL runs its work is ours."""
    import psutil

    out = []
    for proc in psutil.process_iter(["name", "ppid"]):
        if proc.info["name"] not in ("postgres", "postmaster"):
            continue
        try:
            parent = psutil.Process(proc.info["ppid"]).name() if proc.info["ppid"] else ""
        except psutil.Error:
            parent = ""
        if parent not in ("postgres", "postmaster"):
            out.append(proc.pid)
    return out


@dataclass
class Bench:
    quick: bool
    duration_s: int  # each measured wrk run
    warm_s: int  # wrk warm-up before a measured run
    c1_s: int  # the -c1 latency runs
    raw_s: float  # timed part of each raw-model measurement
    seed: int
    log_dir: Path
    tmp: Path
    pg_url: str | None
    keys: int = 20_000  # hit-ratio: distinct keys
    requests: int = 100_000  # hit-ratio: requests per stream
    noise: dict[str, dict[str, Any]] = field(default_factory=dict)
    phase_load: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    pg_schema: str | None = None  # created by make_pg_schema, dropped by drop_pg_schema
    _risk: dict[str, Any] | None = None  # the prepared risk data (model, databases, bodies)

    def note_noise(self, label: str, watch: sv.CpuWatch) -> dict[str, Any]:
        r = watch.result
        self.noise[label] = r
        if r["foreign_pct"] > sv.NOISY_PCT or r["steal_pct"] > sv.NOISY_PCT:
            log(f"  WARNING: other processes used {r['foreign_pct']:.0f}% of the CPU "
                f"(steal {r['steal_pct']:.0f}%) during {label}: this figure is disturbed")
        return r

    def noisy(self, *labels: str) -> str:
        bad = any(self.noise.get(lb, {}).get("foreign_pct", 0.0) > sv.NOISY_PCT
                  or self.noise.get(lb, {}).get("steal_pct", 0.0) > sv.NOISY_PCT for lb in labels)
        return " (noisy)" if bad else ""

    # wrk ------------------------------------------------------------------------------------
    def wrk(self, label: str, port: int, path: str, bodies: Path, *, conns: int, seconds: float,
            threads: int = 1, offset: int = 0, headers: Sequence[str] = (),
            watch: list[int] | None = None) -> dict[str, Any]:
        """One time-bounded wrk run with cache_bodies.lua; parsed like serving.py's runs."""
        argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{max(1, round(seconds))}s",
                "--timeout", "10s", "-s", str(LUA), f"http://127.0.0.1:{port}{path}", "--",
                str(bodies), str(offset), str(threads), *headers]
        log(f"wrk {label}: -t{threads} -c{conns} {max(1, round(seconds))}s {path}"
            + (f" [{', '.join(headers)}]" if headers else "") + (f" from line {offset}" if offset else ""))
        r, cpu = sv.run_wrk(argv, label, self.log_dir, seconds, watch, CpuWatch)
        out = {
            "connections": conns, "threads": threads, "offset": offset, **sv.wrk_figures(r),
            "other_load": self.note_noise(label, cpu),
        }
        log(f"  {out['ok_rps']:.0f} ok req/s  p50 {out['p50_ms']:.3f} ms  p99 {out['p99_ms']:.2f} ms  "
            f"errors {out['errors']} (non-2xx {out['non_2xx_3xx']}, socket {out['socket_errors']})")
        return out


def http_post(port: int, path: str, body: bytes, headers: dict[str, str] | None = None,
              timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=body,
                     headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt_ratio(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def fmt_hit(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def load1() -> float:
    return os.getloadavg()[0]


@contextlib.contextmanager
def phase_watch(b: Bench, name: str, pids: list[int] | None = None) -> Iterator[None]:
    """Load average at the start and end of a phase, and other processes' CPU during it
    (`pids`: trees whose CPU counts as the benchmark's own, e.g. the PostgreSQL server)."""
    start = load1()
    log(f"=== phase {name} (1-minute load average {start:.2f})")
    cpu = CpuWatch(pids).__enter__()
    try:
        yield
    finally:
        cpu.__exit__(None, None, None)
        b.phase_load[name] = {"load1_start": start, "load1_end": load1(), **cpu.result}
        log(f"=== phase {name} done: 1-minute load average {start:.2f} → {load1():.2f}, other "
            f"processes used {cpu.result['foreign_pct']:.0f}% of the CPU")


# ---------------------------------------------------------------------------------------------
# workloads

def zipf_ranks(n_keys: int, n: int, s: float, rng: Any) -> Any:
    """n draws of ranks 0..n_keys-1 with P(rank r) ∝ 1/(r+1)^s (numpy array)."""
    import numpy as np

    weights = 1.0 / np.arange(1, n_keys + 1, dtype=np.float64) ** s
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), n_keys - 1)


def zipf_keys(n_keys: int, n: int, s: float, seed: int) -> list[int]:
    """Keys 0..n_keys-1, popularity ∝ 1/rank^s, ranks shuffled so a key's number says nothing."""
    import numpy as np

    rng = np.random.default_rng(seed)
    by_rank = rng.permutation(n_keys)
    return [int(k) for k in by_rank[zipf_ranks(n_keys, n, s, rng)]]


def scan_mix(n_keys: int, n: int, seed: int, block: int = 4_000, scan: int = 1_000) -> list[int]:
    """Zipf(1.0) over n_keys in blocks of `block` requests, each followed by a scan of `scan`
    never-seen sequential keys (one-time keys: 20 % of the requests with the defaults)."""
    zipf = zipf_keys(n_keys, n, 1.0, seed)
    out: list[int] = []
    z = 0
    next_scan_key = 10 * n_keys
    while len(out) < n:
        take = min(block, n - len(out))
        out.extend(zipf[z:z + take])
        z += take
        take = min(scan, n - len(out))
        out.extend(range(next_scan_key, next_scan_key + take))
        next_scan_key += take
    return out


def simulate(trace: Sequence[int], policy: str, entry_bytes: int, capacity: int) -> dict[str, Any]:
    """Drive `MemoryCache` as a read-through user does: get; on a miss, store."""
    from steadyserve.cache import MemoryCache
    from steadyserve.cache.memory import ENTRY_OVERHEAD_BYTES

    cache = MemoryCache(capacity, policy)
    value_bytes = entry_bytes - ENTRY_OVERHEAD_BYTES  # the cache adds the overhead back
    get, store = cache.get, cache.store
    t = time.perf_counter()
    for key in trace:
        if get(key, 0.0) is None:
            store(key, None, value_bytes, now=0.0, ttl_s=1e12)
    took = time.perf_counter() - t
    st = cache.stats
    return {"policy": policy, "hit_ratio": st.hits / len(trace), "hits": st.hits,
            "misses": st.misses, "evictions": cache.evictions, "rejections": cache.rejections,
            "entries": len(cache), "us_per_request": took / len(trace) * 1e6}


def simulate_sized_sketch(trace: Sequence[int], entry_bytes: int, capacity: int) -> float:
    """W-TinyLFU with its sketch sized for the real entry count (`TinyLfuPolicy(avg_entry_bytes=
    entry_bytes)`; MemoryCache sizes it for `avg_entry_bytes`, 1 KiB unless told), driven as
    MemoryCache drives it."""
    from steadyserve.policies.eviction import TinyLfuPolicy

    policy = TinyLfuPolicy(capacity, avg_entry_bytes=entry_bytes)
    hits = 0
    for key in trace:
        policy.record_access(key)
        if key in policy:
            hits += 1
        else:
            policy.admit(key, entry_bytes)
    return hits / len(trace)


def shards(trace: Sequence[int], entry_bytes: int, capacity: int, rate: float) -> dict[str, Any]:
    from steadyserve.policies.eviction import key_hash
    from steadyserve.policies.hitcurve import HitCurve

    curve = HitCurve(sample_rate=rate)
    t = time.perf_counter()
    for key in trace:
        curve.record(key_hash(key), entry_bytes)
    took = time.perf_counter() - t
    return {"rate": rate, "estimate": curve.curve([capacity])[0],
            "sampled_references": curve.references, "tracked_keys": curve.tracked_keys,
            "us_per_request": took / len(trace) * 1e6}


# ---------------------------------------------------------------------------------------------
# phase 1: hit ratio in process

def phase_hit_ratio(b: Bench, res: dict[str, Any], rows: list[Row]) -> None:
    out: dict[str, Any] = {"keys": b.keys, "requests": b.requests, "seed": b.seed}
    res["hit_ratio"] = out
    sec = "hit ratio"
    start = len(rows)
    entry = 4096  # bytes per entry as MemoryCache counts them (value + ENTRY_OVERHEAD_BYTES)
    small = 320  # about a risk feature row (~195 B of msgpack + 120 B overhead)
    n, k = b.requests, b.keys
    cap_entries = k // 20
    streams: list[tuple[str, str, list[int], int]] = []
    log(f"hit ratio: building streams ({n:,} requests over {k:,} keys, seed {b.seed})")
    z10 = zipf_keys(k, n, 1.0, b.seed)
    streams.append(("zipf-1.0", "Zipf(1.0)", z10, entry))
    streams.append(("zipf-0.8", "Zipf(0.8)", zipf_keys(k, n, 0.8, b.seed), entry))
    streams.append(("scan-mix", "Zipf(1.0) + 20 % one-time scan keys", scan_mix(k, n, b.seed), entry))
    streams.append(("zipf-1.0-small", f"Zipf(1.0), {small} B entries (MemoryCache's sketch: 1 KiB entries)",
                    z10, small))
    out["streams"] = {}
    results = {}
    with CpuWatch() as cpu:  # one window: sub-second ones are below the clock-tick resolution
        for name, _title, trace, size in streams:
            results[name] = {p: simulate(trace, p, size, cap_entries * size) for p in ("tinylfu", "lru")}
    b.note_noise("hit-ratio simulations", cpu)
    for name, title, trace, size in streams:
        capacity = cap_entries * size
        runs = results[name]
        t, lru = runs["tinylfu"]["hit_ratio"], runs["lru"]["hit_ratio"]
        out["streams"][name] = {"title": title, "entry_bytes": size, "capacity_bytes": capacity,
                                "distinct_keys": len(set(trace)), **runs}
        log(f"  {title}: W-TinyLFU {t:.4f}  LRU {lru:.4f}  ({runs['tinylfu']['us_per_request']:.1f} / "
            f"{runs['lru']['us_per_request']:.1f} µs per request)")
        rows.append((sec, f"{title}: W-TinyLFU / LRU", f"{t:.4f} / {lru:.4f}", "", ""))
        rows.append((sec, "  TinyLFU/LRU", f"{fmt_ratio(ratio(t, lru))} ({100 * (t - lru):+.1f} points)",
                     "", ""))
    sized = simulate_sized_sketch(z10, small, cap_entries * small)
    out["streams"]["zipf-1.0-small"]["tinylfu_sketch_sized_for_entries"] = sized
    rows.append((sec, f"  W-TinyLFU with the sketch sized for {small} B entries (TinyLfuPolicy)",
                 f"{sized:.4f} ({100 * (sized - results['zipf-1.0-small']['tinylfu']['hit_ratio']):+.1f} "
                 "points)", "", ""))
    first = out["streams"]["zipf-1.0"]
    rows[start:start] = [(sec, "stream; cache capacity",
                 f"{n:,} requests over {k:,} keys (seed {b.seed}); "
                 f"{cap_entries:,} entries = 5 % of the keys' bytes ({first['capacity_bytes']:,} B)",
                 "", "")]
    rows.append((sec, "µs per request through MemoryCache (Zipf 1.0)",
                 f"W-TinyLFU {first['tinylfu']['us_per_request']:.2f}, "
                 f"LRU {first['lru']['us_per_request']:.2f}", "", ""))
    exact = first["lru"]["hit_ratio"]
    out["shards"] = []
    with CpuWatch() as cpu:
        estimates = [shards(z10, entry, first["capacity_bytes"], rate) for rate in (0.1, 0.01)]
    b.note_noise("hit-ratio shards", cpu)
    for s in estimates:
        rate = s["rate"]
        s["exact_lru"] = exact
        s["error_points"] = 100 * (s["estimate"] - exact)
        out["shards"].append(s)
        log(f"  SHARDS R={rate}: {s['estimate']:.4f} vs exact LRU {exact:.4f}")
        rows.append((sec, f"SHARDS R={rate:g}: LRU hit ratio at 5 %",
                     f"{s['estimate']:.4f} vs exact {exact:.4f} ({s['error_points']:+.2f} points; "
                     f"{s['sampled_references']:,} sampled refs, {s['us_per_request']:.2f} µs/ref)",
                     "", ""))


# ---------------------------------------------------------------------------------------------
# phase 2: gateway cache hits vs the replica vs a FastAPI dict cache

def uvicorn_argv(app: str, port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "--app-dir", str(BENCH), app,
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--log-level", "warning", "--no-access-log"]


def cache_items(d: dict[str, float], deployment: str) -> dict[str, float]:
    """{result: items} of steadyserve_cache_items_total in a scrape delta."""
    out: dict[str, float] = {}
    for key, v in d.items():
        if key.startswith("steadyserve_cache_items_total{") and f"deployment={deployment}" in key:
            result = key.split("result=", 1)[1].split(",", 1)[0].rstrip("}")
            out[result] = out.get(result, 0.0) + v
    return out


def phase_gateway_hits(b: Bench, res: dict[str, Any], rows: list[Row]) -> None:
    out: dict[str, Any] = {}
    res["gateway_hits"] = out
    sec = "gateway hits"
    bodies = b.tmp / "echo-body.jsonl"
    body = json.dumps(ECHO_BODY)
    bodies.write_text(body + "\n")
    port = sv.free_port()
    srv = sv.Server("steadyserve-cache-echo", sv.steadyserve_argv(ECHO_SERVICE, 1, port), port,
                    b.log_dir / "steadyserve-cache-echo.log",
                    env={"STEADYSERVE_DATA_DIR": str(b.tmp / "gateway-echo")})
    ss: dict[str, Any] = {}
    out["steadyserve"] = ss
    with sv.running(srv, ss):
        srv.wait_all_replicas(ECHO_DEPLOYMENT)
        # the first request fills the cache; the second must be a hit; no-store must bypass it
        seen = []
        for hdr in ({}, {}, {"Cache-Control": "no-store"}):
            status, headers, _ = http_post(port, ECHO_PATH, body.encode(), hdr)
            seen.append((status, headers.get("x-steadyserve-cache", "-")))
        ss["check"] = seen
        log(f"  check: {seen}")
        if [s for s, _ in seen] != [200] * 3 or seen[1][1] != "hit" or seen[2][1] != "-":
            raise sv.StartFailed(f"cached echo does not behave as expected: {seen}")
        w = [srv.pid]
        b.wrk("hit-warmup", port, ECHO_PATH, bodies, conns=64, threads=2, seconds=b.warm_s, watch=w)
        before = sv.scrape(port, b.log_dir / "metrics-echo-before.txt")
        ss["hit_c64"] = b.wrk("hit-c64", port, ECHO_PATH, bodies, conns=64, threads=2,
                              seconds=b.duration_s, watch=w)
        mid = sv.scrape(port, b.log_dir / "metrics-echo-hit.txt")
        ss["hit_c1"] = b.wrk("hit-c1", port, ECHO_PATH, bodies, conns=1, seconds=b.c1_s, watch=w)
        ss["hit_items"] = cache_items(sv.delta(mid, before), ECHO_DEPLOYMENT)
        b.wrk("nostore-warmup", port, ECHO_PATH, bodies, conns=64, threads=2, seconds=b.warm_s,
              headers=[NO_STORE], watch=w)
        before2 = sv.scrape(port)
        ss["nostore_c64"] = b.wrk("nostore-c64", port, ECHO_PATH, bodies, conns=64, threads=2,
                                  seconds=b.duration_s, headers=[NO_STORE], watch=w)
        ss["nostore_c1"] = b.wrk("nostore-c1", port, ECHO_PATH, bodies, conns=1, seconds=b.c1_s,
                                 headers=[NO_STORE], watch=w)
        after = sv.scrape(port, b.log_dir / "metrics-echo-after.txt")
        ss["nostore_items"] = cache_items(sv.delta(after, before2), ECHO_DEPLOYMENT)
        ss["gateway_counters"] = sv.error_counts(sv.delta(after, before))
    port = sv.free_port()
    peer = sv.Server("fastapi-dict-cache", uvicorn_argv("cache_fastapi_peer:app", port), port,
                     b.log_dir / "fastapi-dict-cache.log")
    fa: dict[str, Any] = {}
    out["fastapi"] = fa
    with sv.running(peer, fa):
        w = [peer.pid]
        b.wrk("peer-warmup", port, ECHO_PATH, bodies, conns=64, threads=2, seconds=b.warm_s, watch=w)
        fa["c64"] = b.wrk("peer-c64", port, ECHO_PATH, bodies, conns=64, threads=2,
                          seconds=b.duration_s, watch=w)
        fa["c1"] = b.wrk("peer-c1", port, ECHO_PATH, bodies, conns=1, seconds=b.c1_s, watch=w)

    hit, hit1 = ss["hit_c64"], ss["hit_c1"]
    ns, ns1 = ss["nostore_c64"], ss["nostore_c1"]
    rps, p50 = hit["ok_rps"], hit1["p50_ms"]
    items = ss["hit_items"]
    total_items = sum(items.values())
    out["ratios"] = r = {
        "hit_over_nostore_rps": ratio(rps, ns["ok_rps"]),
        "nostore_over_hit_p50_c1": ratio(ns1["p50_ms"], p50),
        "hit_over_peer_rps": ratio(rps, fa["c64"]["ok_rps"]),
        "hit_over_peer_p50_c1": ratio(p50, fa["c1"]["p50_ms"]),
    }
    rows.append((sec, "cache hit req/s (wrk -c64 -t2, one fixed body)", f"{rps:,.0f}",
                 f"≥ {TARGETS['hit_rps_c64']:,.0f}",
                 sv.verdict(rps, TARGETS["hit_rps_c64"], True) + b.noisy("hit-c64")))
    rows.append((sec, "  p50 / p99 (c64)", f"{hit['p50_ms']:.2f} / {hit['p99_ms']:.2f} ms", "", ""))
    rows.append((sec, "cache hit p50 (wrk -c1)", f"{p50:.3f} ms",
                 f"≤ {TARGETS['hit_p50_c1_ms']:.1f} ms",
                 sv.verdict(p50, TARGETS["hit_p50_c1_ms"], False) + b.noisy("hit-c1")))
    rows.append((sec, "  p99 (c1)", f"{hit1['p99_ms']:.3f} ms", "", ""))
    rows.append((sec, "  answered from the gateway cache (c64 run)",
                 f"{items.get('hit', 0):,.0f} of {total_items:,.0f} items"
                 + (f" ({100 * items.get('hit', 0) / total_items:.2f} %)" if total_items else ""),
                 "", ""))
    errors = hit["errors"] + hit1["errors"]
    rows.append((sec, "  errors (non-2xx + socket)", str(errors), "0", "ok" if errors == 0 else "MISS"))
    rows.append((sec, "no-store req/s (c64; every request to the replica)", f"{ns['ok_rps']:,.0f}",
                 "", ""))
    rows.append((sec, "  p50 / p99 (c64)", f"{ns['p50_ms']:.2f} / {ns['p99_ms']:.2f} ms", "", ""))
    rows.append((sec, "  p50 / p99 (c1)", f"{ns1['p50_ms']:.3f} / {ns1['p99_ms']:.3f} ms", "", ""))
    ns_err = ns["errors"] + ns1["errors"]
    ns_items = sum(ss["nostore_items"].values())
    rows.append((sec, "  errors; items the cache saw", f"{ns_err}; {ns_items:,.0f}", "0; 0",
                 "ok" if ns_err == 0 and ns_items == 0 else "MISS"))
    rows.append((sec, "hit / no-store req/s (c64)", fmt_ratio(r["hit_over_nostore_rps"]), "", ""))
    rows.append((sec, "no-store / hit p50 (c1)", fmt_ratio(r["nostore_over_hit_p50_c1"]), "", ""))
    rows.append((sec, "fastapi + dict cache req/s (c64 -t2)", f"{fa['c64']['ok_rps']:,.0f}", "", ""))
    rows.append((sec, "  p50 (c1)", f"{fa['c1']['p50_ms']:.3f} ms", "", ""))
    rows.append((sec, "steadyserve hit / fastapi req/s (c64)", fmt_ratio(r["hit_over_peer_rps"]),
                 "", ""))
    rows.append((sec, "steadyserve hit / fastapi p50 (c1; > 1 = slower)",
                 fmt_ratio(r["hit_over_peer_p50_c1"]), "", ""))


# ---------------------------------------------------------------------------------------------
# the risk example: data, servers, metrics

def risk_transactions(n: int, n_accounts: int, s: float, seed: int) -> list[dict[str, Any]]:
    """n score requests' transactions: Zipf(s) accounts (ranks shuffled), amounts, categories
    and hours drawn like the example's generator (fixed seed)."""
    import numpy as np

    from steadyserve.examples.risk.data import CATEGORY_NAMES, MERCHANT_CATEGORIES

    rng = np.random.default_rng(seed)
    by_rank = rng.permutation(n_accounts) + 1  # account ids are 1..n_accounts
    accounts = by_rank[zipf_ranks(n_accounts, n, s, rng)]
    shares = np.array([MERCHANT_CATEGORIES[c][0] for c in CATEGORY_NAMES])
    cats = rng.choice(len(CATEGORY_NAMES), size=n, p=shares / shares.sum())
    amounts = np.maximum(0.5, np.round(rng.lognormal(3.5, 0.9, n), 2))
    hours = rng.integers(0, 24, n)
    return [{"account_id": int(a), "amount": float(x), "merchant_category": CATEGORY_NAMES[int(c)],
             "hour": int(h)} for a, x, c, h in zip(accounts, amounts, cats, hours, strict=True)]


def prepare_risk(b: Bench, with_pg: bool) -> dict[str, Any]:
    """Once per run: the model (trained into the tmp data dir), the SQLite feature database,
    the PostgreSQL schema (if asked for and reachable), the request bodies, and a feature
    row's size in the cache."""
    if b._risk is not None:
        return b._risk
    import numpy as np

    from steadyserve.cache.memory import ENTRY_OVERHEAD_BYTES
    from steadyserve.cache.readthrough import encoded_size
    from steadyserve.examples.risk.data import N_ACCOUNTS
    from steadyserve.examples.risk.features import FeatureStore
    from steadyserve.examples.risk.model import load_or_train

    data_dir = b.tmp / "risk-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    prep: dict[str, Any] = {"data_dir": data_dir, "accounts": N_ACCOUNTS, "databases": {}}
    t = time.perf_counter()
    load_or_train(data_dir)
    prep["train_s"] = time.perf_counter() - t
    log(f"risk: model trained in {prep['train_s']:.1f} s")
    urls = {"sqlite": f"sqlite:///{data_dir / 'risk-features.db'}"}
    if b.pg_url and with_pg:
        try:
            urls["postgresql"] = make_pg_schema(b, b.pg_url)
        except Exception as exc:  # any failure: report it, go on without PostgreSQL
            prep["postgresql_error"] = str(exc).splitlines()[0][:120]
            log(f"risk: PostgreSQL not usable, skipping it: {prep['postgresql_error']}")
    for kind, url in urls.items():
        store = FeatureStore(url)
        try:
            t = time.perf_counter()
            inserted = store.ensure_seeded()
            seed_s = time.perf_counter() - t
            sample = store.get_many(range(1, 2001))
        finally:
            store.close()
        entry = float(np.mean([encoded_size(r) for r in sample.values()])) + ENTRY_OVERHEAD_BYTES
        prep["databases"][kind] = {"url": url, "seeded_rows": inserted, "seed_s": seed_s,
                                   "entry_bytes": entry}
        log(f"risk: {kind} seeded with {inserted:,} accounts in {seed_s:.1f} s "
            f"(a cached feature row ≈ {entry:.0f} B)")
    prep["entry_bytes"] = prep["databases"]["sqlite"]["entry_bytes"]
    n_bodies = 50_000
    txs = risk_transactions(n_bodies, N_ACCOUNTS, 1.0, b.seed)
    bodies = b.tmp / "risk-bodies.jsonl"
    with bodies.open("w") as f:
        for tx in txs:
            f.write(json.dumps({"transactions": [tx]}, separators=(",", ":")) + "\n")
    prep["bodies"] = bodies
    prep["transactions"] = txs
    prep["distinct_accounts_in_bodies"] = len({tx["account_id"] for tx in txs})
    log(f"risk: {n_bodies:,} score bodies over {prep['distinct_accounts_in_bodies']:,} distinct "
        "accounts (Zipf 1.0)")
    b._risk = prep
    return prep


def make_pg_schema(b: Bench, base: str) -> str:
    """A fresh schema for this run (dropped by drop_pg_schema); the URL that lands in it."""
    import psycopg

    schema = f"ss_cache_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(base, connect_timeout=3, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    b.pg_schema = schema
    sep = "&" if "?" in base else "?"
    log(f"risk: PostgreSQL schema {schema} created")
    return f"{base}{sep}options=-csearch_path%3D{schema}"


def drop_pg_schema(b: Bench) -> None:
    schema = b.pg_schema
    if not schema or not b.pg_url:
        return
    import psycopg

    try:
        with psycopg.connect(b.pg_url, connect_timeout=3, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        log(f"PostgreSQL schema {schema} dropped")
    except psycopg.Error as exc:
        log(f"WARNING: could not drop PostgreSQL schema {schema}: {exc}")
        b.failures.append(f"drop schema {schema}: {exc}")


def toml_str(s: str) -> str:
    return json.dumps(s)  # a TOML basic string for ASCII text


def risk_config(b: Bench, label: str, url: str, cache_bytes: int | None, affinity: bool,
                balance: float | None = None) -> Path:
    prep = b._risk
    assert prep is not None
    env = {"STEADYSERVE_DATABASE_URL": url, "STEADYSERVE_DATA_DIR": str(prep["data_dir"])}
    if cache_bytes is not None:
        env["RISK_FEATURE_CACHE_BYTES"] = str(cache_bytes)
    lines = [
        f"data_dir = {toml_str(str(b.tmp / 'gateway-risk'))}",
        f"database_url = {toml_str('sqlite:///' + str(b.tmp / 'gateway-risk' / 'steadyserve.db'))}",
        "[cache]",
        f"affinity = {'true' if affinity else 'false'}",
        *([f"affinity_balance = {balance}"] if balance is not None else []),
        "[deployments.risk]",
        f"service = {toml_str(RISK_SERVICE)}",
        "replicas = 2",
        "[deployments.risk.env]",
        *(f"{k} = {toml_str(v)}" for k, v in env.items()),
    ]
    path = b.log_dir / f"steadyserve-{label}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def replica_cache(port: int, cache: str, save: Path | None = None) -> dict[str, dict[str, float]]:
    """{replica: {"hits", "misses"}} of the replicas' ReadThrough cache `cache` (gateway /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        status, body = sv.http_get(port, "/metrics", timeout=5.0)
    except OSError:
        return {}
    if status != 200:
        return {}
    if save is not None:
        save.write_bytes(body)
    names = {"steadyserve_replica_cache_hits_total": "hits",
             "steadyserve_replica_cache_misses_total": "misses"}
    out: dict[str, dict[str, float]] = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            if s.name in names and s.labels.get("cache") == cache:
                rep = out.setdefault(s.labels.get("replica", "?"), {"hits": 0.0, "misses": 0.0})
                rep[names[s.name]] += s.value
    return out


def hit_ratios(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
               ) -> dict[str, Any]:
    per: dict[str, float | None] = {}
    hits = misses = 0.0
    for rep, a in sorted(after.items()):
        b0 = before.get(rep, {"hits": 0.0, "misses": 0.0})
        h, m = a["hits"] - b0["hits"], a["misses"] - b0["misses"]
        hits += h
        misses += m
        per[rep] = h / (h + m) if h + m else None
    return {"combined": hits / (hits + misses) if hits + misses else None, "per_replica": per,
            "hits": hits, "misses": misses}


def serve_risk(b: Bench, label: str, url: str, cache_bytes: int | None, affinity: bool,
               warm_s: float, also_watch: list[int] | None = None,
               balance: float | None = None) -> dict[str, Any]:
    """`steadyserve run` with the risk deployment (2 replicas); warm-up then one measured wrk
    -c32 run on Zipf accounts with `Cache-Control: no-store`, continuing the body stream."""
    prep = b._risk
    assert prep is not None
    out: dict[str, Any] = {"cache_bytes": cache_bytes, "affinity": affinity, "affinity_balance": balance}
    port = sv.free_port()
    cfg = risk_config(b, label, url, cache_bytes, affinity, balance)
    gw_dir = b.tmp / "gateway-risk"
    srv = sv.Server(f"steadyserve-{label}", [*sv.steadyserve_argv(None, None, port), "--config", str(cfg)],
                    port, b.log_dir / f"steadyserve-{label}.log",
                    env={"STEADYSERVE_DATA_DIR": str(gw_dir),
                         "STEADYSERVE_DATABASE_URL": f"sqlite:///{gw_dir / 'steadyserve.db'}"})
    bodies = prep["bodies"]
    with sv.running(srv, out):
        out["all_replicas_ready_s"] = round(srv.wait_all_replicas("risk"), 3)
        first = bodies.open().readline().strip().encode()
        status, _, reply = http_post(srv.port, RISK_PATH, first, {"Cache-Control": "no-store"})
        if status != 200 or b'"score"' not in reply:
            raise sv.StartFailed(f"{label}: score request answered {status}: {reply[:300]!r}")
        w = [srv.pid, *(also_watch or [])]
        warm = b.wrk(f"{label}-warmup", port, RISK_PATH, bodies, conns=32, seconds=warm_s,
                     headers=[NO_STORE], watch=w)
        offset = warm["requests"] + 32  # lines sent: the answered ones + those still in flight
        c0 = replica_cache(port, "risk_features")
        m0 = sv.scrape(port, b.log_dir / f"metrics-{label}-before.txt")
        out["wrk"] = b.wrk(label, port, RISK_PATH, bodies, conns=32, seconds=b.duration_s,
                           offset=offset, headers=[NO_STORE], watch=w)
        c1 = replica_cache(port, "risk_features", b.log_dir / f"metrics-{label}-after.txt")
        m1 = sv.scrape(port)
        out["warmup_requests"] = offset
        out["feature_cache"] = hit_ratios(c0, c1)
        d = sv.delta(m1, m0)
        out["mean_batch_size"] = sv.batch_sizes(d)
        out["gateway_counters"] = sv.error_counts(d)
    fc = out["feature_cache"]
    log(f"  feature-cache hit ratio {fmt_hit(fc['combined'])} "
        f"({', '.join(f'{k} {fmt_hit(v)}' for k, v in fc['per_replica'].items())})")
    return out


def raw_model(b: Bench, label: str, url: str, cache_bytes: int, batch: int,
              window: tuple[int, int], also_watch: list[int] | None = None) -> dict[str, Any]:
    """`RiskScorer` configured in process as its tests do (the same store, the trained model),
    scoring the body file's transactions in batches: rows/s and the feature cache's hit ratio.

    `window` = (start, count): the served run's measured lines. Lines [0, start) go through
    untimed (the served warm-up), then [start, start + count) are timed, so the cache sees
    what the replicas saw; the timed part stops early after `raw_s` (never before 3 calls)."""
    from steadyserve.examples.risk.features import FeatureStore
    from steadyserve.examples.risk.model import load_or_train
    from steadyserve.examples.risk.service import RiskScorer

    prep = b._risk
    assert prep is not None
    txs = prep["transactions"]
    scorer = RiskScorer()
    scorer.configure(FeatureStore(url), load_or_train(prep["data_dir"]), cache_bytes)
    try:
        start, count = window
        start = min(start, len(txs) - 3 * batch)
        stop = min(len(txs), start + max(count, 3 * batch))
        with CpuWatch(also_watch) as cpu:
            for i in range(0, start, batch):
                scorer.score(txs[i:min(i + batch, start)])
            s0 = scorer.features.stats()
            pos, rows_done, calls = start, 0, 0
            t = time.perf_counter()
            while pos < stop:
                chunk = txs[pos:min(pos + batch, stop)]
                results = scorer.score(chunk)
                rows_done += len(chunk)
                calls += 1
                pos += len(chunk)
                elapsed = time.perf_counter() - t
                if elapsed >= b.raw_s and calls >= 3:
                    break
            s1 = scorer.features.stats()
        b.note_noise(f"raw-{label}", cpu)
        bad = [r for r in results if not isinstance(r, dict)]
        if bad:
            raise sv.StartFailed(f"raw {label}: scoring returned {bad[0]!r}")
    finally:
        scorer.teardown()
    hits, misses = s1["hits"] - s0["hits"], s1["misses"] - s0["misses"]
    out = {"batch": batch, "rows_per_s": rows_done / elapsed, "rows": rows_done,
           "seconds": elapsed, "window": [start, stop], "cache_bytes": cache_bytes,
           "hit_ratio": hits / (hits + misses) if hits + misses else None}
    log(f"raw {label}: {out['rows_per_s']:,.0f} rows/s over lines {start:,}..{start + rows_done:,}, "
        f"feature-cache hit ratio {fmt_hit(out['hit_ratio'])}")
    return out


def served_rows(sec: str, title: str, r: dict[str, Any], b: Bench, label: str) -> list[Row]:
    w, fc = r["wrk"], r["feature_cache"]
    per = ", ".join(f"{fmt_hit(v)}" for v in fc["per_replica"].values())
    batches = ", ".join(f"{v:.1f}" for v in r["mean_batch_size"].values()) or "n/a"
    hit = (f"{fmt_hit(fc['combined'])} ({per})" if fc["combined"] is not None else "n/a (cache off)")
    out: list[Row] = [
        (sec, f"{title}: req/s; p50 / p99; errors",
         f"{w['ok_rps']:,.0f}; {w['p50_ms']:.2f} / {w['p99_ms']:.2f} ms; {w['errors']}", "",
         b.noisy(label).strip() or ("" if w["errors"] == 0 else "MISS")),
        (sec, "  feature-cache hit ratio (per replica); mean batch", f"{hit}; {batches}", "", ""),
    ]
    if w["errors"] and r.get("gateway_counters"):
        out.append((sec, "  gateway counters", sv.summarise_counters(r["gateway_counters"]), "", ""))
    return out


# ---------------------------------------------------------------------------------------------
# phase 3: the risk example's feature cache on SQLite and PostgreSQL

RAW_BATCHES = (64, 4)  # the handler's max_batch_size, and about what the replicas run at -c32


def phase_risk_features(b: Bench, res: dict[str, Any], rows: list[Row]) -> None:
    prep = prepare_risk(b, with_pg=True)
    out: dict[str, Any] = {"databases": {}}
    res["risk_features"] = out
    sec = "risk features"
    rows.append((sec, "workload", f"{len(prep['transactions']):,} score bodies, Zipf(1.0) over "
                 f"{prep['accounts']:,} accounts ({prep['distinct_accounts_in_bodies']:,} distinct); "
                 "1 transaction/request; 2 replicas; cache on = 32 MiB", "", ""))
    if "postgresql_error" in prep:
        rows.append((sec, "postgresql", f"skipped: {prep['postgresql_error']}", "", "FAIL"))
        b.failures.append(f"risk-features: postgresql: {prep['postgresql_error']}")
    for kind, db in prep["databases"].items():
        try:
            out["databases"][kind] = risk_database(b, kind, db, rows, sec)
        except Exception as exc:  # a database that fails midway: report it, go on
            b.failures.append(f"risk-features {kind}: {exc!r}")
            log(f"FAILED risk-features {kind}: {exc!r}")
            rows.append((sec, kind, "FAILED: " + repr(exc)[:80], "", "FAIL"))


def risk_database(b: Bench, kind: str, db: dict[str, Any], rows: list[Row], sec: str) -> dict[str, Any]:
    """Served (cache on, off) and raw (cache on, off; each RAW_BATCHES size) on one database."""
    from steadyserve.examples.risk.service import DEFAULT_FEATURE_CACHE_BYTES

    d: dict[str, Any] = {"seed_s": db["seed_s"], "entry_bytes": db["entry_bytes"]}
    pg = postgres_pids() if kind == "postgresql" else []
    for mode, cache_bytes in (("on", None), ("off", 0)):
        label = f"risk-{kind}-cache-{mode}"
        try:
            d[f"served_{mode}"] = serve_risk(b, label, db["url"], cache_bytes, True, b.warm_s, pg)
        except (sv.StartFailed, subprocess.TimeoutExpired) as exc:
            b.failures.append(f"{label}: {exc}")
            log(f"FAILED {label}: {exc}")
            rows.append((sec, f"{kind}, cache {mode}", "FAILED: " + str(exc).splitlines()[0][:70],
                         "", "FAIL"))
            continue
        rows.extend(served_rows(sec, f"{kind}, cache {mode}, served (wrk -c32)",
                                d[f"served_{mode}"], b, label))
    for mode, cache_bytes in (("on", DEFAULT_FEATURE_CACHE_BYTES), ("off", 0)):
        served = d.get(f"served_{mode}")
        window = (served["warmup_requests"], served["wrk"]["requests"]) if served else (5_000, 15_000)
        for batch in RAW_BATCHES:
            d[f"raw_{mode}_b{batch}"] = raw_model(b, f"{kind}-cache-{mode}-b{batch}", db["url"],
                                                  cache_bytes, batch, window, pg)
        rr = [d[f"raw_{mode}_b{batch}"] for batch in RAW_BATCHES]
        hits = " | ".join(fmt_hit(r["hit_ratio"]) for r in rr)
        rows.append((sec, f"{kind}, cache {mode}, raw model: rows/s at batch "
                     + " | ".join(str(x) for x in RAW_BATCHES),
                     " | ".join(f"{r['rows_per_s']:,.0f}" for r in rr)
                     + (f" (hit ratio {hits})" if mode == "on" else ""), "",
                     b.noisy(*(f"raw-{kind}-cache-{mode}-b{x}" for x in RAW_BATCHES)).strip()))
    on, off = d.get("served_on"), d.get("served_off")
    on_rps = on["wrk"]["ok_rps"] if on else None
    off_rps = off["wrk"]["ok_rps"] if off else None
    r: dict[str, Any] = {"served_on_over_off": ratio(on_rps, off_rps)}
    for batch in RAW_BATCHES:
        r[f"raw_b{batch}_on_over_off"] = ratio(d[f"raw_on_b{batch}"]["rows_per_s"],
                                               d[f"raw_off_b{batch}"]["rows_per_s"])
        r[f"served_over_raw_b{batch}_on"] = ratio(on_rps, d[f"raw_on_b{batch}"]["rows_per_s"])
        r[f"served_over_raw_b{batch}_off"] = ratio(off_rps, d[f"raw_off_b{batch}"]["rows_per_s"])
    d["ratios"] = r
    raw_on_off = " | ".join(fmt_ratio(r[f"raw_b{x}_on_over_off"]) for x in RAW_BATCHES)
    rows.append((sec, f"{kind}: cache on / off — served | raw "
                 + " | ".join(f"b{x}" for x in RAW_BATCHES),
                 f"{fmt_ratio(r['served_on_over_off'])} | {raw_on_off}", "", ""))
    for mode in ("on", "off"):
        rows.append((sec, f"{kind}: served/raw, cache {mode}, raw at batch "
                     + " | ".join(str(x) for x in RAW_BATCHES),
                     " | ".join(fmt_ratio(r[f"served_over_raw_b{x}_{mode}"], 3) for x in RAW_BATCHES),
                     "", ""))
    rows.append((sec, f"{kind}: seeding 100k accounts; a cached feature row",
                 f"{db['seed_s']:.1f} s; ≈ {db['entry_bytes']:.0f} B with overhead", "", ""))
    return d


# ---------------------------------------------------------------------------------------------
# phase 4: cache-affinity routing

def model_split(ids: Sequence[int], start: int, stop: int, capacity: int, entry_bytes: int,
                replicas: Sequence[str], by_key: bool, seed: int) -> float:
    """One MemoryCache(tinylfu) of `capacity` per replica, fed ids[:stop]: each key to its home
    on the gateway's hash ring of these replica ids (affinity that never spills), or each
    request to a random replica (no affinity); the combined hit ratio over ids[start:stop]."""
    import random

    from steadyserve.cache import MemoryCache
    from steadyserve.cache.memory import ENTRY_OVERHEAD_BYTES
    from steadyserve.policies.affinity import HashRing, stable_hash

    n = max(1, len(replicas))
    caches = [MemoryCache(capacity, "tinylfu") for _ in range(n)]
    ring = HashRing(list(replicas) or ["replica"])
    rng = random.Random(seed)
    value = int(entry_bytes) - ENTRY_OVERHEAD_BYTES
    hits = 0
    for i, key in enumerate(ids[:stop]):
        c = caches[ring.home(stable_hash(str(key)))] if by_key else caches[rng.randrange(n)]
        if c.get(key, 0.0) is None:
            c.store(key, None, value, now=0.0, ttl_s=1e12)
        elif i >= start:
            hits += 1
    return hits / max(1, stop - start)


def phase_affinity(b: Bench, res: dict[str, Any], rows: list[Row]) -> None:
    prep = prepare_risk(b, with_pg=False)
    out: dict[str, Any] = {}
    res["affinity"] = out
    sec = "affinity"
    db = prep["databases"]["sqlite"]
    share = 0.05
    cache_bytes = int(share * prep["accounts"] * db["entry_bytes"])
    out["cache_bytes"] = cache_bytes
    rows.append((sec, "feature cache per replica (sqlite, Zipf 1.0, no-store)",
                 f"RISK_FEATURE_CACHE_BYTES={cache_bytes:,} ≈ {share:.0%} of {prep['accounts']:,} "
                 f"accounts at {db['entry_bytes']:.0f} B", "", ""))
    warm = b.warm_s * 2  # a small cache fills in the warm-up; the hot set has to settle too
    # (label, affinity, affinity_balance): the default bound 1.25 lets a replica take 1.25 × the
    # average load via affinity and spills the rest; 100 never spills (context for the gain)
    runs = [("affinity-on", True, None, "affinity = true"),
            ("affinity-off", False, None, "affinity = false"),
            ("affinity-nospill", True, 100.0, "affinity = true, affinity_balance = 100")]
    ids = [tx["account_id"] for tx in prep["transactions"]]
    for label, on, balance, title in runs:
        try:
            out[label] = r = serve_risk(b, label, db["url"], cache_bytes, on, warm, balance=balance)
        except (sv.StartFailed, subprocess.TimeoutExpired) as exc:
            b.failures.append(f"{label}: {exc}")
            log(f"FAILED {label}: {exc}")
            rows.append((sec, label, "FAILED: " + str(exc).splitlines()[0][:70], "", "FAIL"))
            continue
        fc, w = r["feature_cache"], r["wrk"]
        per = ", ".join(fmt_hit(v) for v in fc["per_replica"].values())
        # the same request window replayed in process through two caches of this size, split
        # by key (what affinity could give with no spill) or at random (no affinity)
        start = r["warmup_requests"]
        stop = min(len(ids), start + w["requests"])
        r["in_process_model"] = model_split(ids, start, stop, cache_bytes, db["entry_bytes"],
                                            list(fc["per_replica"]), on, b.seed)
        rows.append((sec, f"{title}: combined hit ratio (per replica)",
                     f"{fmt_hit(fc['combined'])} ({per})", "", ""))
        rows.append((sec, "  req/s; p50 / p99; errors",
                     f"{w['ok_rps']:,.0f}; {w['p50_ms']:.2f} / {w['p99_ms']:.2f} ms; {w['errors']}",
                     "", b.noisy(label).strip() or ("" if w["errors"] == 0 else "MISS")))
        rows.append((sec, "  in process, same window: 2 caches, "
                     + ("keys at their ring home" if on else "requests at random"),
                     f"{r['in_process_model']:.3f}", "", ""))
    on_r, off_r = out.get("affinity-on"), out.get("affinity-off")
    if on_r and off_r:
        h_on, h_off = on_r["feature_cache"]["combined"], off_r["feature_cache"]["combined"]
        gain_rps = ratio(on_r["wrk"]["ok_rps"], off_r["wrk"]["ok_rps"])
        out["gain"] = g = {"hit_points": None if h_on is None or h_off is None else 100 * (h_on - h_off),
                           "hit_ratio_ratio": ratio(h_on, h_off), "rps_ratio": gain_rps,
                           "model_points": 100 * (on_r["in_process_model"] - off_r["in_process_model"])}
        rows.append((sec, "gain from affinity (default bound)",
                     ("n/a" if g["hit_points"] is None else
                      f"{g['hit_points']:+.1f} points of hit ratio (×{fmt_ratio(g['hit_ratio_ratio'])}); ")
                     + f"req/s ×{fmt_ratio(gain_rps)}; in process {g['model_points']:+.1f} points", "", ""))
    ns = out.get("affinity-nospill")
    if ns and off_r and ns["feature_cache"]["combined"] is not None \
            and off_r["feature_cache"]["combined"] is not None:
        pts = 100 * (ns["feature_cache"]["combined"] - off_r["feature_cache"]["combined"])
        out["gain_nospill"] = {"hit_points": pts,
                               "rps_ratio": ratio(ns["wrk"]["ok_rps"], off_r["wrk"]["ok_rps"])}
        rows.append((sec, "gain with affinity_balance = 100 (no spill)",
                     f"{pts:+.1f} points of hit ratio; req/s ×{fmt_ratio(out['gain_nospill']['rps_ratio'])}",
                     "", ""))


# ---------------------------------------------------------------------------------------------

def wait_for_load(limit_s: float) -> dict[str, Any]:
    """Poll the 1-minute load average until it is below LOAD_QUIET, for at most limit_s."""
    t = time.monotonic()
    seen = [load1()]
    while seen[-1] >= LOAD_QUIET and time.monotonic() - t < limit_s:
        log(f"waiting for a quiet machine: 1-minute load average {seen[-1]:.2f} "
            f"(want < {LOAD_QUIET}; {limit_s - (time.monotonic() - t):.0f} s left)")
        time.sleep(min(10.0, max(1.0, limit_s - (time.monotonic() - t))))
        seen.append(load1())
    out = {"waited_s": round(time.monotonic() - t, 1), "load1": seen[-1],
           "quiet": seen[-1] < LOAD_QUIET, "polls": seen}
    log(f"1-minute load average {seen[-1]:.2f} after waiting {out['waited_s']:.0f} s"
        + ("" if out["quiet"] else f"  <- still ≥ {LOAD_QUIET}"))
    return out


def uptime_line() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5,
                              check=False).stdout.strip()
    return ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 3 s per wrk measurement, 20k-request streams")
    p.add_argument("--only", choices=PHASES, help="run one phase")
    p.add_argument("--duration-s", type=int, help="seconds per measured wrk run (default 10; quick 3)")
    p.add_argument("--wait-load", type=float, default=0.0, metavar="S",
                   help=f"first wait up to S seconds for a 1-minute load average < {LOAD_QUIET}")
    p.add_argument("--seed", type=int, default=20240601, help="seed of every generated stream")
    p.add_argument("--pg-url", default=DEFAULT_PG_URL,
                   help="PostgreSQL for risk-features (a fresh schema is made and dropped)")
    p.add_argument("--no-postgres", action="store_true", help="risk-features on SQLite only")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary data directory")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/cache-<timestamp>.json)")
    args = p.parse_args(argv)

    needs_wrk = args.only != "hit-ratio"
    if needs_wrk and shutil.which("wrk") is None:
        print("wrk is not installed (make bench-deps installs it)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, sv._on_signal)
    started = time.monotonic()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    log_dir = RESULTS / f"logs-cache-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="steadyserve-cache-bench-"))
    quick = args.quick
    b = Bench(quick=quick, duration_s=args.duration_s or (3 if quick else 10),
              warm_s=1 if quick else 3, c1_s=2 if quick else 5, raw_s=0.5 if quick else 1.5,
              seed=args.seed, log_dir=log_dir, tmp=tmp,
              pg_url=None if args.no_postgres else args.pg_url,
              keys=4_000 if quick else 20_000, requests=20_000 if quick else 100_000)
    res: dict[str, Any] = {
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": sv.machine_info(),
        "settings": {"quick": quick, "only": args.only, "duration_s": b.duration_s,
                     "warm_s": b.warm_s, "c1_s": b.c1_s, "raw_s": b.raw_s, "seed": b.seed,
                     "hit_ratio_keys": b.keys, "hit_ratio_requests": b.requests,
                     "postgres": b.pg_url is not None},
        "targets": TARGETS,
        "uptime_before": uptime_line(),
    }
    res["load_wait"] = wait_for_load(args.wait_load) if args.wait_load > 0 else None
    res["load1_at_start"] = load1()
    log(f"start: {res['uptime_before']}")
    rows: list[Row] = []
    plan: list[tuple[str, Callable[[Bench, dict[str, Any], list[Row]], None]]] = [
        ("hit-ratio", phase_hit_ratio), ("gateway-hits", phase_gateway_hits),
        ("risk-features", phase_risk_features), ("affinity", phase_affinity)]
    plan = [(n, f) for n, f in plan if args.only in (None, n)]
    try:
        for name, fn in plan:
            pg = postgres_pids() if name == "risk-features" and b.pg_url else None
            with phase_watch(b, name, pg):
                try:
                    fn(b, res, rows)
                except (sv.StartFailed, subprocess.TimeoutExpired) as exc:
                    msg = f"{name}: {exc}"
                    log(f"FAILED {msg}")
                    b.failures.append(msg)
                    rows.append((name, "FAILED", str(exc).splitlines()[0][:80], "", "FAIL"))
    finally:
        sv._stop_all()
        drop_pg_schema(b)
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        res["phase_load"] = b.phase_load
        res["other_load"] = b.noise
        for name, r in b.phase_load.items():
            runs = [v for k, v in b.noise.items()
                    if not k.endswith("warmup") and _phase_of(k) == name]
            worst = max((v["foreign_pct"] for v in runs), default=0.0)
            noisy = r["foreign_pct"] > sv.NOISY_PCT or worst > sv.NOISY_PCT
            rows.append(("load", f"{name} ({r['wall_s']:.0f} s)",
                         f"1-min load avg {r['load1_start']:.2f} → {r['load1_end']:.2f}; "
                         f"other processes {r['foreign_pct']:.0f}% of CPU (worst run {worst:.0f}%), "
                         f"steal {r['steal_pct']:.0f}%", f"≤ {sv.NOISY_PCT:.0f}%",
                         "noisy" if noisy else "ok"))
        res["failures"] = b.failures
        res["elapsed_s"] = round(time.monotonic() - started, 1)
        res["uptime_after"] = uptime_line()
        res["git_at_end"] = end_state = sv.git_state()
        if end_state.get("src_digest") != res["machine"].get("src_digest"):
            log("WARNING: src/ changed while the benchmark ran: parts measured different code")
            rows.append(("run", "src/ changed during the run", "", "", "MISS"))
        out_path = args.out or RESULTS / f"cache-{stamp}.json"
        m = res["machine"]
        print()
        print(f"steadyserve cache benchmark, {res['started']}, git {m.get('git')}"
              f"{' + uncommitted src/' if m.get('src_dirty') else ''}, {m.get('cores')} cores "
              f"({m.get('cpu', '?')}), {'--quick' if quick else 'full'} run, wrk {b.duration_s} s per "
              f"measurement, {res['elapsed_s']:.0f} s in all")
        print(f"load: before {res['uptime_before'].split('load average:')[-1].strip()}, "
              f"after {res['uptime_after'].split('load average:')[-1].strip()} (1, 5, 15 min)")
        res["table"] = sv.print_table(rows)
        res["rows"] = rows
        out_path.write_text(json.dumps(res, indent=2, default=str) + "\n")
        print(f"\nJSON: {out_path}\nlogs: {log_dir}")
    return 1 if b.failures else 0


def _phase_of(label: str) -> str:
    """The phase a measurement label belongs to (for the load rows)."""
    if label.startswith(("hit-ratio",)):
        return "hit-ratio"
    if label.startswith(("hit-", "nostore-", "peer-")):
        return "gateway-hits"
    if label.startswith(("risk-", "raw-")):
        return "risk-features"
    if label.startswith("affinity"):
        return "affinity"
    return ""


if __name__ == "__main__":
    sys.exit(main())
