"""The gateway's response cache: L1 in process, L2 in Redis (optional), kept consistent by tags.

    lookup(keys) ─► L1 (fresh or stale) ─► for the rest, one L2 round trip (entries and the
    versions of their tags) ─► L2 hits are copied into L1
    store(key, …, since=tokens) ─► L1 (refused if a tag was invalidated since the lookup)
                                 ─► L2 in the background (refused by Redis likewise)
    invalidate(tags) ─► L1 ─► L2 (entries dropped, tag versions bumped) ─► other gateways
                        via pub/sub, which drop their L1 entries and tell their replicas
    invalidate([ALL_TAGS]) ─► every tagged entry, everywhere (L2: one generation bump)

Values are the msgpack bytes of one item's result: the same bytes in L1 and L2, and the
capacity counts them exactly. Time is wall-clock seconds (L2 entries are shared between
machines), passed in as `clock`.

Capacity: an online SHARDS estimate of the hit-ratio curve (`HitCurve`) says what hit ratio
each L1 size would give; with `autosize`, L1 resizes itself within bounds to the knee of it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..config import CacheConfig
from ..policies.affinity import stable_hash
from ..policies.hitcurve import HitCurve, choose_capacity
from ..policies.hotkeys import HotKeys
from .invalidation import ALL_TAGS
from .memory import MemoryCache
from .redis_store import RedisStore
from .singleflight import Singleflight

log = logging.getLogger("steadyserve.cache")

L2_WRITE_QUEUE = 10_000  # L2 writes waiting; beyond it they are dropped (and counted)
CURVE_POINTS = 16


@dataclass(slots=True)
class Cached:
    payload: bytes
    fresh_until: float
    keep_until: float
    level: str  # l1 | l2

    def fresh(self, now: float) -> bool:
        return now < self.fresh_until


@dataclass(slots=True)
class Tokens:
    """What `store` needs to refuse an answer computed from since-invalidated data."""

    l1: int
    l2: dict[str, str] | None = None  # tag → version read from Redis (ALL_TAGS → the generation
    # of tagged entries); None: L2 was not read


@dataclass
class _Counters:
    l2_writes: int = 0
    l2_refused: int = 0
    l2_dropped: int = 0  # writes not sent: queue full or L2 down
    invalidations: int = 0
    resizes: int = 0
    refreshes: int = 0


class ResponseCache:
    def __init__(
        self, cfg: CacheConfig, *, origin: str, clock: Callable[[], float] = time.time,
        on_remote_invalidate: Callable[[list[str]], Awaitable[object]] | None = None,
        lookup_counter: Callable[[str, str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.origin = origin
        self.l1 = MemoryCache(cfg.l1_bytes, cfg.policy, avg_entry_bytes=1024,
                              max_tracked_invalidations=cfg.max_tracked_invalidations)
        self.flights = Singleflight()
        self.curve = HitCurve(sample_rate=0.1, max_samples=8192)  # fixed size: the rate falls as keys grow
        self.hot = HotKeys(cfg.hot_keys)
        self.counters = _Counters()
        self.on_remote_invalidate = on_remote_invalidate
        self._count = lookup_counter or (lambda level, result: None)
        self.l2: RedisStore | None = None
        if cfg.redis_url:
            self.l2 = RedisStore(cfg.redis_url, origin=origin, prefix=cfg.redis_prefix,
                                 timeout_s=cfg.redis_timeout_s, retry_s=cfg.redis_retry_s,
                                 on_invalidate=self._remote_invalidate, on_state=self._l2_state,
                                 ack_timeout_s=cfg.invalidation_ack_timeout_s,
                                 max_pending_invalidations=cfg.max_tracked_invalidations)
        self._writes: asyncio.Queue[tuple[str, bytes, float, float, tuple[str, ...], list[str], str]] = \
            asyncio.Queue(L2_WRITE_QUEUE)
        self._tasks: list[asyncio.Task[None]] = []
        self._oneoff: set[asyncio.Future[object]] = set()
        self._mean_size = 1024.0  # running mean of stored payloads (the curve's size of a miss)
        self._stale_mode: dict[str, float] = {}  # deployment → serve stale without asking until

    @property
    def keep_s(self) -> float:
        return max(self.cfg.stale_while_revalidate_s, self.cfg.stale_if_error_s)

    # lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.l2 is not None:
            await self.l2.start()
            self._tasks.append(loop.create_task(self._write_l2(), name="cache-l2-writer"))
        if self.cfg.autosize:
            self._tasks.append(loop.create_task(self._autosize(), name="cache-autosize"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks.clear()
        if self.l2 is not None:
            await self.l2.stop()

    # the request path ---------------------------------------------------------------------------
    async def lookup(
        self, keys: Sequence[str], tags: Sequence[Sequence[str]],
    ) -> tuple[list[Cached | None], Tokens]:
        """One result per key (fresh or stale, or None) and the tokens to store answers with."""
        now = self.clock()
        tokens = Tokens(self.l1.epoch())
        found: list[Cached | None] = []
        need: list[int] = []
        for i, key in enumerate(keys):
            entry = self.l1.get(key, now)
            size = entry.size if entry is not None else self._mean_size
            self.curve.record(stable_hash(key), int(size))
            self.hot.offer(key)
            if entry is not None:
                found.append(Cached(entry.value, entry.fresh_until, entry.keep_until, "l1"))
                self._count("l1", "hit" if entry.fresh(now) else "stale")
                if entry.fresh(now):
                    continue
            else:
                found.append(None)
                self._count("l1", "miss")
            need.append(i)
        if self.l2 is None or not need or not self.l2.up:
            return found, tokens
        # ALL_TAGS last: its version is the generation that tagged writes must carry
        wanted_tags = [*sorted({t for i in need for t in tags[i]} - {ALL_TAGS}), ALL_TAGS]
        reply = await self.l2.lookup([keys[i] for i in need], wanted_tags)
        if reply is None:
            return found, tokens
        entries, versions = reply
        tokens.l2 = dict(zip(wanted_tags, versions, strict=True))
        now = self.clock()
        for i, raw in zip(need, entries, strict=True):
            hit = _from_l2(raw, now)
            if hit is None:
                self._count("l2", "miss")
                continue
            self._count("l2", "hit" if hit.fresh(now) else "stale")
            current = found[i]
            if current is None or hit.fresh_until > current.fresh_until:
                found[i] = hit
                self.l1.store(keys[i], hit.payload, len(hit.payload) + len(keys[i]), now=now,
                              ttl_s=max(0.0, hit.fresh_until - now),
                              keep_s=max(0.0, hit.keep_until - max(now, hit.fresh_until)),
                              tags=tuple(tags[i]), since=tokens.l1)
        return found, tokens

    def store(self, key: str, payload: bytes, *, ttl_s: float, tags: tuple[str, ...], tokens: Tokens) -> bool:
        """Keep one item's answer in L1 and (in the background) L2. False when refused because
        a tag was invalidated after `tokens` were taken (the answer may be from old data)."""
        now = self.clock()
        if self.l1.stale_since(tags, tokens.l1):
            self.l1.stats.refused_stale_loads += 1
            return False
        self._mean_size += (len(payload) + len(key) - self._mean_size) * 0.01
        self.l1.store(key, payload, len(payload) + len(key), now=now, ttl_s=ttl_s, keep_s=self.keep_s,
                      tags=tags)
        if self.l2 is not None:
            versions = self._versions(tags, tokens)
            if versions is None or not self.l2.up:
                self.counters.l2_dropped += 1
            else:
                generation = tokens.l2.get(ALL_TAGS, "0") if tokens.l2 is not None else "0"
                try:
                    self._writes.put_nowait((key, payload, now + ttl_s, now + ttl_s + self.keep_s,
                                             tags, versions, generation))
                except asyncio.QueueFull:
                    self.counters.l2_dropped += 1
        return True

    async def invalidate(self, tags: Iterable[str], *, publish: bool = True) -> dict[str, Any]:
        """Drop the entries with these tags here, in L2 and (via L2) on the other gateways.
        ALL_TAGS drops every tagged entry; in L2 the entries are then dropped lazily (a
        generation bump makes them read as absent), so `l2_dropped` counts none of them."""
        tags = sorted(set(tags))
        dropped = self.l1.invalidate(tags, self.clock())
        self.counters.invalidations += len(tags)
        l2: int | None = None
        body: dict[str, Any] = {"tags": tags, "l1_dropped": dropped}
        if publish and self.l2 is not None:
            l2 = await self.l2.invalidate(tags)
            if l2 is not None:
                acked, expected = self.l2.last_acks
                body["other_gateways"] = {"acknowledged": acked, "expected": expected}
        body["l2_dropped"] = l2
        body["l2"] = "off" if self.l2 is None else ("up" if self.l2.up else "down: replayed later")
        return body

    async def forget(self, keys: Sequence[str]) -> dict[str, int | None]:
        """Drop these answers (by key) here and in L2: feedback said they were wrong. Other
        gateways' L1 copies live out their TTL (keys are not broadcast; tags are)."""
        dropped = sum(1 for k in keys if self.l1.delete(k))
        l2 = await self.l2.forget(keys) if self.l2 is not None else None
        return {"l1_dropped": dropped, "l2_dropped": l2}

    def forget_local(self, keys: Sequence[str]) -> int:
        """Drop these keys from this process's L1 only (a data-plane worker's copy)."""
        return sum(1 for k in keys if self.l1.delete(k))

    def drop_local(self, tags: Iterable[str]) -> int:
        """Drop these tags from this process's L1 only: another process of this gateway
        already told the replicas and L2 (data-plane workers)."""
        return self.l1.invalidate(sorted(set(tags)), self.clock())

    def serve_stale(self, deployment: str, seconds: float) -> None:
        """Emergency response: answer this deployment's cacheable requests from any entry
        within the stale-if-error window, without calling (or revalidating) upstream."""
        self._stale_mode[deployment] = self.clock() + seconds

    def serving_stale(self, deployment: str, now: float) -> bool:
        until = self._stale_mode.get(deployment)
        if until is None:
            return False
        if now >= until:
            del self._stale_mode[deployment]
            return False
        return True

    # status -------------------------------------------------------------------------------------
    def curve_points(self) -> list[tuple[int, float]]:
        low = max(1024, self.cfg.l1_min_bytes // 4)
        high = max(low * 2, self.cfg.l1_max_bytes, self.l1.capacity_bytes * 4)
        step = (math.log(high) - math.log(low)) / (CURVE_POINTS - 1)
        caps = sorted({int(math.exp(math.log(low) + i * step)) for i in range(CURVE_POINTS)}
                      | {self.l1.capacity_bytes})
        return list(zip(caps, self.curve.curve(caps), strict=True))

    def status(self, top: int = 20) -> dict[str, Any]:
        s = self.l1.stats
        lookups = s.hits + s.stale_hits + s.misses
        return {
            "l1": {
                "policy": self.cfg.policy, "capacity_bytes": self.l1.capacity_bytes,
                "bytes": self.l1.used_bytes, "entries": len(self.l1), "tags": self.l1.tag_count(),
                "tracked_invalidations": self.l1.tracked_invalidations,
                "folded_invalidations": self.l1.folded_invalidations,
                "hit_ratio": round(s.hits / lookups, 4) if lookups else None,
                "evictions": self.l1.evictions, "admission_rejections": self.l1.rejections,
                **s.as_dict(), "autosize": self.cfg.autosize,
            },
            "l2": None if self.l2 is None else {
                "up": self.l2.up, "errors": self.l2.errors, "outages": self.l2.outages,
                "writes": self.counters.l2_writes, "refused_writes": self.counters.l2_refused,
                "unacknowledged_invalidations": self.l2.ack_timeouts,
                "dropped_writes": self.counters.l2_dropped,
            },
            "singleflight": {"in_flight": len(self.flights), "coalesced": self.flights.coalesced},
            "invalidated_tags": self.counters.invalidations,
            "background_refreshes": self.counters.refreshes,
            "serving_stale": {d: round(until - self.clock(), 1) for d, until in self._stale_mode.items()
                              if until > self.clock()},
            "hit_ratio_curve": {
                "method": "SHARDS sampled LRU reuse distances (a lower bound for TinyLFU)",
                "sampled_references": self.curve.references,
                "points": [{"capacity_bytes": c, "hit_ratio": round(r, 4)}
                           for c, r in self.curve_points()],
            },
            "hot_keys": [{"key": str(k), "count": c, "error": e} for k, c, e in self.hot.top(top)],
        }

    # internals ----------------------------------------------------------------------------------
    @staticmethod
    def _versions(tags: tuple[str, ...], tokens: Tokens) -> list[str] | None:
        if not tags:
            return []
        if tokens.l2 is None:
            return None
        try:
            return [tokens.l2[t] for t in tags]
        except KeyError:
            return None

    def _l2_state(self, up: bool) -> None:
        """Back after an outage: invalidations other gateways published meanwhile never reached
        this one (pub/sub does not replay), so drop every tagged answer here and tell the
        replicas to do the same; untagged answers depend on no data and stay."""
        if not up or self.l2 is None or self.l2.outages == 0:
            return
        dropped = self.l1.invalidate([ALL_TAGS], self.clock())
        log.warning("redis L2 back after an outage: dropped %d tagged L1 entries that may have "
                    "missed invalidations", dropped)
        if self.on_remote_invalidate is not None:
            task = asyncio.ensure_future(self.on_remote_invalidate([ALL_TAGS]))
            self._oneoff.add(task)
            task.add_done_callback(self._oneoff.discard)

    async def _remote_invalidate(self, tags: list[str]) -> None:
        """Another gateway changed this data: replicas first (so an answer computed after the L1
        drop cannot come from a replica's old copy), then L1."""
        if self.on_remote_invalidate is not None:
            await self.on_remote_invalidate(tags)
        self.l1.invalidate(tags, self.clock())

    async def _write_l2(self) -> None:
        assert self.l2 is not None
        while True:
            key, payload, fresh_until, keep_until, tags, versions, generation = await self._writes.get()
            try:
                if await self.l2.write(key, payload, fresh_until, keep_until, tags, versions,
                                       generation):
                    self.counters.l2_writes += 1
                elif self.l2.up:
                    self.counters.l2_refused += 1
                else:
                    self.counters.l2_dropped += 1
            except Exception:  # never die silently: log and keep writing
                log.exception("L2 write failed")

    async def _autosize(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.autosize_interval_s)
            try:
                self.autosize_once()
            except Exception:
                log.exception("cache autosize step failed")

    def autosize_once(self) -> int | None:
        """Resize L1 to the knee of the estimated curve; None when there is too little data."""
        if self.curve.references < 1000:
            return None
        points = [(c, r) for c, r in self.curve_points()
                  if self.cfg.l1_min_bytes <= c <= self.cfg.l1_max_bytes]
        if not points:
            return None
        chosen = choose_capacity([c for c, _ in points], [r for _, r in points],
                                 min_bytes=self.cfg.l1_min_bytes, max_bytes=self.cfg.l1_max_bytes)
        if chosen != self.l1.capacity_bytes:
            log.info("cache L1 resized from the hit-ratio curve",
                     extra={"from_bytes": self.l1.capacity_bytes, "to_bytes": chosen})
            self.l1.resize(chosen)
            self.counters.resizes += 1
        self.curve.decay()
        return chosen


def _from_l2(raw: Any, now: float) -> Cached | None:
    try:
        payload, fresh_until, keep_until, _tags = raw
        if now >= float(keep_until):
            return None
        return Cached(bytes(payload), float(fresh_until), float(keep_until), "l2")
    except (TypeError, ValueError):
        return None


class CacheCollector(Collector):
    """Exports the cache's own counters and the hit-ratio curve at scrape time."""

    def __init__(self, cache: ResponseCache) -> None:
        self.cache = cache

    def collect(self) -> Iterable[Any]:
        c = self.cache
        s = c.l1.stats
        g = GaugeMetricFamily("steadyserve_cache_bytes", "Bytes held by the L1 cache", labels=["level"])
        g.add_metric(["l1"], c.l1.used_bytes)
        yield g
        g = GaugeMetricFamily("steadyserve_cache_capacity_bytes", "L1 capacity (autosize moves it)",
                              labels=["level"])
        g.add_metric(["l1"], c.l1.capacity_bytes)
        yield g
        g = GaugeMetricFamily("steadyserve_cache_entries", "Entries in the L1 cache", labels=["level"])
        g.add_metric(["l1"], len(c.l1))
        yield g
        counters = {
            "steadyserve_cache_evictions": ("Entries evicted for room", c.l1.evictions),
            "steadyserve_cache_admission_rejections": (
                "Candidates the admission policy kept out (colder than the victim)", c.l1.rejections),
            "steadyserve_cache_stale_loads_refused": (
                "Answers not stored: their data was invalidated while they were computed",
                s.refused_stale_loads),
            "steadyserve_cache_invalidated_tags": ("Tags invalidated", c.counters.invalidations),
            "steadyserve_cache_coalesced": ("Callers that waited for an identical miss (singleflight)",
                                            c.flights.coalesced),
            "steadyserve_cache_background_refreshes": (
                "Stale entries refreshed in the background (stale-while-revalidate)",
                c.counters.refreshes),
        }
        for name, (doc, value) in counters.items():
            family = CounterMetricFamily(name, doc)
            family.add_metric([], value)
            yield family
        lookups = s.hits + s.stale_hits + s.misses
        g = GaugeMetricFamily("steadyserve_cache_hit_ratio", "L1 fresh hits / lookups since start",
                              labels=["level"])
        g.add_metric(["l1"], s.hits / lookups if lookups else 0.0)
        yield g
        g = GaugeMetricFamily("steadyserve_cache_hit_ratio_estimate",
                              "Estimated L1 hit ratio at each capacity (SHARDS, LRU)",
                              labels=["capacity_bytes"])
        for cap, ratio in c.curve_points():
            g.add_metric([str(cap)], ratio)
        yield g
        if c.l2 is not None:
            g = GaugeMetricFamily("steadyserve_cache_l2_up", "1 when the Redis L2 cache answers")
            g.add_metric([], 1.0 if c.l2.up else 0.0)
            yield g
            for name, doc, value in (
                ("steadyserve_cache_l2_errors", "Redis calls that failed or timed out", c.l2.errors),
                ("steadyserve_cache_l2_outages", "Times L2 went down", c.l2.outages),
                ("steadyserve_cache_invalidation_ack_timeouts",
                 "Invalidations some other gateway did not acknowledge in time", c.l2.ack_timeouts),
                ("steadyserve_cache_l2_writes", "Entries written to L2", c.counters.l2_writes),
                ("steadyserve_cache_l2_writes_dropped", "L2 writes not sent (L2 down or queue full)",
                 c.counters.l2_dropped),
            ):
                family = CounterMetricFamily(name, doc)
                family.add_metric([], value)
                yield family
