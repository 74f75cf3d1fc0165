"""An OPEN-LOOP load generator (like wrk2 / vegeta): request i is sent at t0 + i/rate whatever
the latency of the others, so a slow or stalled server cannot slow the offered load down
(no coordinated omission). One aiohttp ClientSession, keep-alive, connection pool as large as
`max_in_flight`. It is a coroutine, so fault injectors run beside it in the same loop:

    t0 = time.monotonic() + 0.2
    result, _ = await asyncio.gather(
        run_load(url, 40, 10, body_fn=lambda i: {"x": f"req-{i}"}, t0=t0),
        injector(t0),                      # await sleep_until(t0, 3); chaos.kill(...)
    )
    print(result.report())

All times in a `LoadResult` are seconds relative to t0 (the schedule's origin).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

RECORDED_HEADERS = ("retry-after",)
Filter = Callable[["RequestRecord"], bool]


@dataclass(slots=True)
class RequestRecord:
    index: int
    scheduled_s: float  # when it was due (relative to t0)
    sent_s: float | None = None  # when it was actually sent; None: never sent (in-flight cap)
    done_s: float | None = None  # when the reply (or the error) arrived
    status: int | None = None  # HTTP status; None when `error` is set
    error: str | None = None  # exception class name (TimeoutError, ClientConnectorError…)
    replica: str | None = None  # the "replica" field of a JSON object answer
    error_code: str | None = None  # the gateway's {"error": {"code"}} when present
    headers: dict[str, str] = field(default_factory=dict)  # RECORDED_HEADERS of the reply
    request_headers: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def kind(self) -> str:
        """`ok`, `http_<status>` or the exception class name."""
        if self.ok:
            return "ok"
        if self.status is not None:
            return f"http_{self.status}"
        return self.error or "unknown"

    @property
    def latency_s(self) -> float | None:
        """From the actual send to the answer: what the client saw."""
        if self.sent_s is None or self.done_s is None:
            return None
        return self.done_s - self.sent_s

    @property
    def latency_from_schedule_s(self) -> float | None:
        """From when it was due to the answer: includes the generator's own lag."""
        return None if self.done_s is None else self.done_s - self.scheduled_s

    @property
    def send_lag_s(self) -> float | None:
        return None if self.sent_s is None else self.sent_s - self.scheduled_s

    @property
    def retry_after(self) -> str | None:
        return self.headers.get("retry-after")

    @property
    def priority(self) -> str | None:
        for k, v in self.request_headers.items():
            if k.lower() == "x-priority":
                return v
        return None


def is_ok(r: RequestRecord) -> bool:
    return r.ok


def is_rejection(r: RequestRecord) -> bool:
    """Load shedding: 429 or 503 (fast, explicit refusals)."""
    return r.status in (429, 503)


def is_error(r: RequestRecord) -> bool:
    return not r.ok


def priority_is(value: str) -> Filter:
    return lambda r: r.priority == value


def in_window(start_s: float, end_s: float | None = None) -> Filter:
    """Requests SCHEDULED in [start_s, end_s)."""
    return lambda r: r.scheduled_s >= start_s and (end_s is None or r.scheduled_s < end_s)


def all_of(*filters: Filter) -> Filter:
    """Combine filters: `result.p99(all_of(priority_is("batch"), is_ok))`."""
    return lambda r: all(f(r) for f in filters)


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class LoadResult:
    url: str
    rate_per_s: float
    duration_s: float
    t0: float  # time.monotonic() of the schedule's origin
    records: list[RequestRecord]
    wall_s: float = 0.0  # from t0 until the last answer

    # selection ---------------------------------------------------------------------------
    def select(self, *filters: Filter | None) -> list[RequestRecord]:
        fs = [f for f in filters if f is not None]
        return [r for r in self.records if all(f(r) for f in fs)]

    @property
    def total(self) -> int:
        return len(self.records)

    @property
    def sent(self) -> int:
        return sum(1 for r in self.records if r.sent_s is not None)

    def success_rate(self, where: Filter | None = None) -> float:
        rs = self.select(where)
        return sum(r.ok for r in rs) / len(rs) if rs else 0.0

    def errors(self, where: Filter | None = None) -> Counter[str]:
        """Non-2xx answers and exceptions, counted by kind (`http_503`, `TimeoutError`, …)."""
        return Counter(r.kind for r in self.select(where) if not r.ok)

    def error_count(self, where: Filter | None = None) -> int:
        return sum(self.errors(where).values())

    def error_codes(self, where: Filter | None = None) -> Counter[str]:
        """The gateway's error codes (`overloaded`, `no_ready_replica`, …) of non-2xx answers."""
        return Counter(r.error_code for r in self.select(where) if not r.ok and r.error_code)

    # latency -----------------------------------------------------------------------------
    def latencies(self, where: Filter | None = None, *, from_schedule: bool = False) -> list[float]:
        out = []
        for r in self.select(where):
            v = r.latency_from_schedule_s if from_schedule else r.latency_s
            if v is not None:
                out.append(v)
        return out

    def latency(self, q: float, where: Filter | None = None, *, from_schedule: bool = False) -> float | None:
        return percentile(self.latencies(where, from_schedule=from_schedule), q)

    def p50(self, where: Filter | None = None, *, from_schedule: bool = False) -> float | None:
        return self.latency(50, where, from_schedule=from_schedule)

    def p99(self, where: Filter | None = None, *, from_schedule: bool = False) -> float | None:
        return self.latency(99, where, from_schedule=from_schedule)

    def max_send_lag_s(self) -> float:
        lags = [r.send_lag_s for r in self.records if r.send_lag_s is not None]
        return max(lags) if lags else 0.0

    # throughput --------------------------------------------------------------------------
    def goodput_per_s(self, start_s: float = 0.0, end_s: float | None = None,
                      where: Filter | None = None) -> float:
        """Successful answers per second that ARRIVED in [start_s, end_s)."""
        end = self.duration_s if end_s is None else end_s
        if end <= start_s:
            return 0.0
        n = sum(1 for r in self.select(is_ok, where)
                if r.done_s is not None and start_s <= r.done_s < end)
        return n / (end - start_s)

    def goodput_series(self, bucket_s: float = 1.0, where: Filter | None = None) -> list[float]:
        """Successes per second in consecutive buckets of answer time, from 0 to the last answer."""
        span = max(self.duration_s, self.wall_s)
        n = max(1, math.ceil(span / bucket_s))
        counts = [0] * n
        for r in self.select(is_ok, where):
            if r.done_s is not None and r.done_s >= 0:
                counts[min(n - 1, int(r.done_s / bucket_s))] += 1
        return [c / bucket_s for c in counts]

    def replica_share(self, start_s: float = 0.0, end_s: float | None = None) -> dict[str, float]:
        """Share of successful answers per replica, among requests scheduled in the window."""
        counts = Counter(r.replica for r in self.select(is_ok, in_window(start_s, end_s)) if r.replica)
        total = sum(counts.values())
        return {k: counts[k] / total for k in sorted(counts)} if total else {}

    # report ------------------------------------------------------------------------------
    def report(self) -> str:
        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v * 1000:.1f}ms"

        oks = self.select(is_ok)
        lines = [
            f"load {self.url}: {self.rate_per_s:g} req/s for {self.duration_s:g}s "
            f"(open loop): {self.total} scheduled, {self.sent} sent, wall {self.wall_s:.2f}s, "
            f"max send lag {ms(self.max_send_lag_s())}",
            f"  success {len(oks)}/{self.total} = {self.success_rate():.2%}",
            f"  latency all p50 {ms(self.p50())} p99 {ms(self.p99())} max {ms(self.latency(100))}; "
            f"ok p50 {ms(self.p50(is_ok))} p99 {ms(self.p99(is_ok))}; "
            f"errors p50 {ms(self.p50(is_error))} p99 {ms(self.p99(is_error))}; "
            f"from schedule p99 {ms(self.p99(from_schedule=True))}",
        ]
        errs = self.errors()
        if errs:
            lines.append("  errors " + ", ".join(f"{k}={v}" for k, v in errs.most_common()))
            codes = self.error_codes()
            if codes:
                lines.append("  error codes " + ", ".join(f"{k}={v}" for k, v in codes.most_common()))
            rej = self.select(is_rejection)
            if rej:
                with_ra = sum(1 for r in rej if r.retry_after is not None)
                lines.append(f"  rejections {len(rej)} (p50 {ms(self.p50(is_rejection))}, "
                             f"p99 {ms(self.p99(is_rejection))}, {with_ra} with Retry-After)")
        priorities = sorted({r.priority for r in self.records if r.priority})
        for p in priorities:
            f = priority_is(p)
            lines.append(f"  priority {p}: success {self.success_rate(f):.2%} of {len(self.select(f))}, "
                         f"ok p99 {ms(self.p99(all_of(f, is_ok)))}, errors {dict(self.errors(f))}")
        series = self.goodput_series()
        lines.append("  goodput/s " + " ".join(f"{v:g}" for v in series))
        share = self.replica_share()
        if share:
            lines.append("  replicas " + ", ".join(f"{k}={v:.1%}" for k, v in share.items()))
        return "\n".join(lines)


async def sleep_until(t0: float, offset_s: float) -> None:
    """Sleep until time.monotonic() == t0 + offset_s (a fault injector's timeline)."""
    delay = t0 + offset_s - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def _one(session: aiohttp.ClientSession, url: str, rec: RequestRecord, body: Any,
               headers: Mapping[str, str] | None, client_timeout: aiohttp.ClientTimeout,
               t0: float) -> None:
    rec.sent_s = time.monotonic() - t0
    try:
        async with session.post(url, json=body, headers=headers, timeout=client_timeout) as resp:
            raw = await resp.read()
            rec.status = resp.status
            for h in RECORDED_HEADERS:
                if h in resp.headers:
                    rec.headers[h] = resp.headers[h]
            if raw[:1] == b"{":
                try:
                    data = await resp.json(content_type=None)
                except ValueError:
                    data = None
                if isinstance(data, dict):
                    replica = data.get("replica")
                    rec.replica = replica if isinstance(replica, str) else None
                    err = data.get("error")
                    if isinstance(err, dict) and isinstance(err.get("code"), str):
                        rec.error_code = err["code"]
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        rec.status = None
        rec.error = type(exc).__name__
    except asyncio.CancelledError:
        rec.status = None
        rec.error = "Cancelled"
        raise
    finally:
        rec.done_s = time.monotonic() - t0


async def run_load(
    url: str, rate_per_s: float, duration_s: float, *,
    body_fn: Callable[[int], Any],
    headers_fn: Callable[[int], Mapping[str, str] | None] | None = None,
    timeout_s: float = 5.0,
    max_in_flight: int = 2000,
    t0: float | None = None,
) -> LoadResult:
    """Send round(rate × duration) POSTs of JSON `body_fn(i)` to `url`, request i at
    t0 + i/rate. A request due while `max_in_flight` are outstanding is not sent and counts as
    error `InFlightLimit`. Returns once every request has an answer or timed out."""
    if rate_per_s <= 0 or duration_s <= 0:
        raise ValueError("rate_per_s and duration_s must be > 0")
    n = round(rate_per_s * duration_s)
    origin = time.monotonic() if t0 is None else t0
    records = [RequestRecord(i, i / rate_per_s) for i in range(n)]
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(limit=max_in_flight, limit_per_host=0, keepalive_timeout=30,
                                     force_close=False)
    tasks: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            for rec in records:
                await sleep_until(origin, rec.scheduled_s)
                headers = dict(headers_fn(rec.index) or {}) if headers_fn else {}
                rec.request_headers = headers
                if len(tasks) >= max_in_flight:
                    rec.error = "InFlightLimit"
                    rec.done_s = time.monotonic() - origin
                    continue
                task = asyncio.create_task(
                    _one(session, url, rec, body_fn(rec.index), headers or None, timeout, origin)
                )
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:  # every one is bounded by its own timeout; this is the backstop
                await asyncio.wait(set(tasks), timeout=timeout_s + 5)
        finally:
            for task in list(tasks):
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
    for rec in records:
        if rec.done_s is None:  # the run itself was cancelled before this one was due
            rec.error = rec.error or "NotSent"
            rec.done_s = rec.scheduled_s
    wall = max((r.done_s for r in records if r.done_s is not None), default=0.0)
    return LoadResult(url, rate_per_s, duration_s, origin, records, wall)
