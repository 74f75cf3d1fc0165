"""The in-process cache store (L1): values, expiry, tags, and a byte-capacity admission policy.

Not thread-safe and not async: the gateway uses it from its event loop, `ReadThrough` from
behind a lock. Time is passed in (`now`), so tests drive it with a fake clock.

An entry has two deadlines: `fresh_until` (a hit) and `keep_until` (after it, gone). Between
the two it is stale: the response cache may serve it while revalidating or when the replicas
fail. Tags link entries to the data they were computed from; `invalidate` drops every entry
with a tag and bumps the tag's epoch, so a load that started before the invalidation (and so
may have read the old data) is refused when it tries to store (`store(..., since=epoch)`).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..policies.eviction import EvictionPolicy, make_policy

ALL_TAGS = "*"  # invalidating this tag drops every tagged entry (after a missed invalidation)
ENTRY_OVERHEAD_BYTES = 120  # dict slot, entry object, policy node: counted against capacity
EPOCH_MEMORY_S = 180.0  # invalidations remembered this long: no load outlives it (3 × the
# longest request timeout); pruned every PRUNE_EVERY invalidations, so memory stays bounded
PRUNE_EVERY = 1024


@dataclass(slots=True)
class Entry:
    value: Any
    size: int
    fresh_until: float
    keep_until: float
    tags: tuple[str, ...] = ()

    def fresh(self, now: float) -> bool:
        return now < self.fresh_until


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    stale_hits: int = 0
    misses: int = 0
    stores: int = 0
    refused_stale_loads: int = 0  # loads that raced an invalidation and were not stored
    expired: int = 0
    invalidated: int = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(slots=True)
class _Invalidation:
    epoch: int
    at: float


@dataclass
class MemoryCache:
    capacity_bytes: int
    policy_name: str = "tinylfu"
    avg_entry_bytes: int = 1024  # sizes TinyLFU's frequency sketch (expected entries)
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self) -> None:
        self._policy: EvictionPolicy = make_policy(self.policy_name, max(0, self.capacity_bytes),
                                                   avg_entry_bytes=self.avg_entry_bytes)
        self._entries: dict[Hashable, Entry] = {}
        self._by_tag: dict[str, set[Hashable]] = {}
        self._epoch = 0
        self._invalidated: dict[str, _Invalidation] = {}

    # reads ------------------------------------------------------------------------------------
    def get(self, key: Hashable, now: float) -> Entry | None:
        """The entry (fresh or stale) or None; counts a hit, stale hit or miss."""
        self._policy.record_access(key)
        entry = self._entries.get(key)
        if entry is not None and now >= entry.keep_until:
            self._drop(key)
            self.stats.expired += 1
            entry = None
        if entry is None:
            self.stats.misses += 1
        elif entry.fresh(now):
            self.stats.hits += 1
        else:
            self.stats.stale_hits += 1
        return entry

    def peek(self, key: Hashable) -> Entry | None:
        """The entry without counting or promoting it (status pages, tests)."""
        return self._entries.get(key)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    @property
    def used_bytes(self) -> int:
        return self._policy.used

    @property
    def evictions(self) -> int:
        return self._policy.evictions

    @property
    def rejections(self) -> int:
        return self._policy.rejections

    # writes -----------------------------------------------------------------------------------
    def epoch(self) -> int:
        """Take before loading; pass to `store` as `since`."""
        return self._epoch

    def stale_since(self, tags: Iterable[str], since: int) -> bool:
        """Was any of these tags invalidated after `since` (an epoch from `epoch()`)?"""
        tags = tuple(tags)
        everything = self._invalidated.get(ALL_TAGS)
        if tags and everything is not None and everything.epoch > since:
            return True
        for tag in tags:
            inv = self._invalidated.get(tag)
            if inv is not None and inv.epoch > since:
                return True
        return False

    def store(
        self, key: Hashable, value: Any, size: int, *, now: float, ttl_s: float, keep_s: float = 0.0,
        tags: tuple[str, ...] = (), since: int | None = None,
    ) -> bool:
        """Store unless the policy rejects it or a tag was invalidated since the load began."""
        if since is not None and self.stale_since(tags, since):
            self.stats.refused_stale_loads += 1
            return False
        if self.capacity_bytes <= 0:
            return False
        if key in self._entries:
            self._untag(key, self._entries[key].tags)
        entry = Entry(value, size + ENTRY_OVERHEAD_BYTES, now + ttl_s, now + ttl_s + keep_s, tags)
        evicted = self._policy.admit(key, entry.size)
        rejected = False
        for victim in evicted:
            if victim == key:
                rejected = True
                continue
            self._drop(victim, from_policy=False)
        if rejected:
            self._entries.pop(key, None)
            return False
        self._entries[key] = entry
        for tag in tags:
            self._by_tag.setdefault(tag, set()).add(key)
        self.stats.stores += 1
        return True

    def delete(self, key: Hashable) -> bool:
        return self._drop(key)

    def invalidate(self, tags: Iterable[str], now: float) -> int:
        """Drop every entry with any of these tags; loads begun before now will not store."""
        self._epoch += 1
        dropped = 0
        for tag in tags:
            self._invalidated[tag] = _Invalidation(self._epoch, now)
            if tag == ALL_TAGS:
                for key in {k for keys in self._by_tag.values() for k in keys}:
                    dropped += self._drop(key)
            for key in list(self._by_tag.get(tag, ())):
                dropped += self._drop(key)
        self.stats.invalidated += dropped
        self._forget_old_invalidations(now)
        return dropped

    def clear(self) -> int:
        keys = list(self._entries)
        for key in keys:
            self._drop(key)
        return len(keys)

    def resize(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        for victim in self._policy.resize(max(0, capacity_bytes)):
            self._drop(victim, from_policy=False)

    def tag_count(self) -> int:
        return len(self._by_tag)

    # internals --------------------------------------------------------------------------------
    def _drop(self, key: Hashable, *, from_policy: bool = True) -> bool:
        entry = self._entries.pop(key, None)
        if from_policy:
            self._policy.remove(key)
        if entry is None:
            return False
        self._untag(key, entry.tags)
        return True

    def _untag(self, key: Hashable, tags: tuple[str, ...]) -> None:
        for tag in tags:
            keys = self._by_tag.get(tag)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_tag[tag]

    def _forget_old_invalidations(self, now: float) -> None:
        if self._epoch % PRUNE_EVERY:
            return
        cutoff = now - EPOCH_MEMORY_S
        for tag in [t for t, inv in self._invalidated.items() if inv.at < cutoff and t != ALL_TAGS]:
            del self._invalidated[tag]
