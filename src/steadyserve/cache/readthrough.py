"""A read-through cache for service code: intermediate results (feature rows) in front of a
database, with singleflight, tags, bounded retries and byte capacity.

    features = ReadThrough(name="risk_features", capacity_bytes=32 << 20, ttl_s=60,
                           retry_on=(DatabaseUnavailable,))
    rows = features.get_many(ids, load=store.get_many, tags=lambda i: [f"account:{i}"])

Synchronous and thread-safe: model code runs on a worker thread. Concurrent loads of one key
are coalesced: the first caller loads, the others wait for its result (and load themselves
only if it failed). A failing loader is retried `attempts` times with exponential pauses; then
the caller gets `DependencyUnavailable` (503 with Retry-After), never a hang: the loader's own
timeouts bound each attempt, and a caller waiting on another's load waits at most
`wait_timeout_s` (a loader that hangs despite its timeouts must not take every thread that
asks for the same row with it). `invalidate(tags)` drops entries and makes any load already in
flight unstorable, so no stale row outlives an update; at most `max_tracked_invalidations`
tags are remembered one by one (older ones fold into a floor, see `cache.memory`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .. import codec
from ..errors import DependencyUnavailable
from .memory import MAX_TRACKED_INVALIDATIONS, MemoryCache

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

WAIT_TIMEOUT_S = 10.0  # a waiter's default bound: a loader's retries at a few seconds each; a
# load still running then means a dependency in trouble, and 503 + Retry-After says so


def encoded_size(value: Any) -> int:
    """Bytes a value takes, estimated by its msgpack encoding (fallback: a flat 256)."""
    try:
        return len(codec.encode(value))
    except (TypeError, ValueError):
        return 256


class _Load:
    """One loader call in flight (for a group of keys); waiters read its outcome here, since
    the cache may not keep a value. One Event per group, not per key: they cost ~2 µs each."""

    __slots__ = ("done", "error", "since", "values")

    def __init__(self, since: int) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.values: Mapping[Any, Any] = {}
        self.since = since  # the cache's invalidation epoch when the load began


class ReadThrough(Generic[K, V]):
    def __init__(
        self, *, name: str, capacity_bytes: int, ttl_s: float, policy: str = "tinylfu",
        retry_on: tuple[type[BaseException], ...] = (), attempts: int = 3, backoff_s: float = 0.05,
        size_of: Callable[[Any], int] = encoded_size, avg_entry_bytes: int = 512,
        wait_timeout_s: float = WAIT_TIMEOUT_S,
        max_tracked_invalidations: int = MAX_TRACKED_INVALIDATIONS,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if attempts < 1 or ttl_s <= 0 or backoff_s < 0:
            raise ValueError("need attempts >= 1, ttl_s > 0, backoff_s >= 0")
        if not wait_timeout_s > 0 or max_tracked_invalidations < 1:
            raise ValueError("need wait_timeout_s > 0 and max_tracked_invalidations >= 1")
        self.name = name
        self.ttl_s = ttl_s
        self.retry_on = retry_on
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.size_of = size_of
        self.clock = clock
        self.sleep = sleep
        self.wait_timeout_s = wait_timeout_s
        self.enabled = capacity_bytes > 0
        self._cache = MemoryCache(capacity_bytes, policy, avg_entry_bytes,
                                  max_tracked_invalidations=max_tracked_invalidations)
        self._lock = threading.Lock()
        self._loading: dict[K, _Load] = {}
        self.loads = 0  # loader calls
        self.load_failures = 0
        self.coalesced = 0  # keys another thread was already loading
        self.wait_timeouts = 0  # callers that gave up waiting on another's load

    # reads ------------------------------------------------------------------------------------
    def get_many(
        self, keys: Iterable[K], load: Callable[[list[K]], Mapping[K, V]],
        tags: Callable[[K], Iterable[str]] = lambda _k: (),
    ) -> dict[K, V]:
        """Values of the keys that exist: from the cache, else from one `load(missing)` call.
        Keys the loader does not return are absent from the result and not cached."""
        wanted = list(dict.fromkeys(keys))
        found: dict[K, V] = {}
        if not self.enabled:
            return dict(self._load_retrying(load, wanted))
        mine, group, theirs = self._claim(wanted, found)
        if mine:
            self._load_and_store(mine, group, load, tags, found)
        # real time, not `clock`: Event.wait counts real seconds (and `clock` may be a fake);
        # the deadline is taken after our own load, which the loader's timeouts bound already
        deadline = time.monotonic() + self.wait_timeout_s
        for key, pending in theirs.items():
            if not pending.done.wait(max(0.0, deadline - time.monotonic())):
                with self._lock:
                    self.wait_timeouts += 1
                raise DependencyUnavailable(
                    f"{self.name}: another caller's load of this key took longer than "
                    f"{self.wait_timeout_s:g}s", retry_after_s=1.0)
            if key in pending.values:
                if self._invalidated_since(tags(key), pending.since):
                    # that load began before an update of the row; this caller may have come
                    # after it, so it must not take the old row: load afresh
                    self._load_and_store([key], self._claim_again([key]), load, tags, found)
                else:
                    found[key] = pending.values[key]
            elif isinstance(pending.error, DependencyUnavailable):
                # its loader already retried `attempts` times: more tries from every waiter
                # would only pile onto a database that is down
                raise DependencyUnavailable(pending.error.message,
                                            retry_after_s=pending.error.retry_after_s) from pending.error
            elif pending.error is not None:  # its loader failed: try ourselves
                self._load_and_store([key], self._claim_again([key]), load, tags, found)
            # else: the loader found nothing for it (an unknown key)
        return found

    def invalidate(self, tags: Iterable[str]) -> int:
        with self._lock:
            return self._cache.invalidate(list(tags), self.clock())

    def clear(self) -> int:
        with self._lock:
            return self._cache.clear()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "name": self.name, "enabled": self.enabled, **self._cache.stats.as_dict(),
                "entries": len(self._cache), "bytes": self._cache.used_bytes,
                "capacity_bytes": self._cache.capacity_bytes, "evictions": self._cache.evictions,
                "admission_rejections": self._cache.rejections, "loads": self.loads,
                "load_failures": self.load_failures, "coalesced": self.coalesced,
                "wait_timeouts": self.wait_timeouts,
                "tracked_invalidations": self._cache.tracked_invalidations,
                "folded_invalidations": self._cache.folded_invalidations,
            }

    # internals --------------------------------------------------------------------------------
    def _claim(self, wanted: Sequence[K], found: dict[K, V]) -> tuple[list[K], _Load, dict[K, _Load]]:
        """Under the lock: take cached values, join loads in flight, claim the rest."""
        mine: list[K] = []
        theirs: dict[K, _Load] = {}
        now = self.clock()
        with self._lock:
            group = _Load(self._cache.epoch())
            for key in wanted:
                entry = self._cache.get(key, now)
                if entry is not None and entry.fresh(now):
                    found[key] = entry.value
                    continue
                pending = self._loading.get(key)
                if pending is not None:
                    theirs[key] = pending
                    self.coalesced += 1
                else:
                    self._loading[key] = group
                    mine.append(key)
        return mine, group, theirs

    def _claim_again(self, keys: list[K]) -> _Load:
        """A new load of keys whose first load failed or went stale (waiters may join it)."""
        with self._lock:
            group = _Load(self._cache.epoch())
            for key in keys:
                self._loading.setdefault(key, group)
            return group

    def _load_and_store(
        self, keys: list[K], group: _Load, load: Callable[[list[K]], Mapping[K, V]],
        tags: Callable[[K], Iterable[str]], found: dict[K, V],
    ) -> None:
        since = group.since
        error: BaseException | None = None
        values: Mapping[K, V] = {}
        try:
            values = self._load_retrying(load, keys)
        except BaseException as exc:
            error = exc
            raise
        else:
            now = self.clock()
            with self._lock:
                for key in keys:
                    if key in values:
                        value = values[key]
                        self._cache.store(key, value, self.size_of(value), now=now, ttl_s=self.ttl_s,
                                          tags=tuple(tags(key)), since=since)
                        found[key] = value
        finally:
            with self._lock:
                group.error = error
                group.values = values
                for key in keys:
                    if self._loading.get(key) is group:
                        del self._loading[key]
                group.done.set()

    def _invalidated_since(self, tags: Iterable[str], since: int) -> bool:
        with self._lock:
            return self._cache.stale_since(tags, since)

    def _load_retrying(self, load: Callable[[list[K]], Mapping[K, V]], keys: list[K]) -> Mapping[K, V]:
        last: BaseException | None = None
        for attempt in range(self.attempts):
            if attempt:
                self.sleep(self.backoff_s * 2 ** (attempt - 1))
            self.loads += 1
            try:
                return load(keys)
            except self.retry_on as exc:
                self.load_failures += 1
                last = exc
        assert last is not None
        raise DependencyUnavailable(
            f"{self.name}: loading {len(keys)} key(s) failed {self.attempts} times: {last}",
            retry_after_s=1.0) from last


def find_caches(service: object) -> list[ReadThrough[Any, Any]]:
    """The ReadThrough caches a service holds as attributes (exported in the replica's /metrics)."""
    return [v for v in vars(service).values() if isinstance(v, ReadThrough)]


class ReadThroughCollector(Collector):
    """`steadyserve_replica_cache_*{cache=<name>}` from each cache's stats, at scrape time."""

    COUNTERS = (
        ("hits", "Fresh hits"), ("misses", "Lookups not answered from the cache"),
        ("loads", "Loader calls (retries included)"), ("load_failures", "Loader calls that failed"),
        ("coalesced", "Keys another thread was already loading (singleflight)"),
        ("wait_timeouts", "Callers that gave up waiting on another caller's load (503)"),
        ("invalidated", "Entries dropped by tag invalidation"), ("evictions", "Entries evicted for room"),
        ("admission_rejections", "New entries the admission policy kept out"),
        ("refused_stale_loads", "Loads not stored: their tags were invalidated meanwhile"),
    )

    def __init__(self, service: object) -> None:
        self.service = service

    def collect(self) -> Iterable[Any]:
        caches = find_caches(self.service)
        if not caches:
            return
        stats = [c.stats() for c in caches]
        for key, doc in self.COUNTERS:
            family = CounterMetricFamily(f"steadyserve_replica_cache_{key}", doc, labels=["cache"])
            for s in stats:
                family.add_metric([s["name"]], s[key])
            yield family
        for key, doc in (("bytes", "Bytes held"), ("entries", "Entries held"),
                         ("capacity_bytes", "Capacity in bytes")):
            gauge = GaugeMetricFamily(f"steadyserve_replica_cache_{key}", doc, labels=["cache"])
            for s in stats:
                gauge.add_metric([s["name"]], s[key])
            yield gauge
