"""The in-process cache store (L1): values, expiry, tags, and a byte-capacity admission policy.

Not thread-safe and not async: the gateway uses it from its event loop, `ReadThrough` from
behind a lock. Time is passed in (`now`), so tests drive it with a fake clock.

An entry has two deadlines: `fresh_until` (a hit) and `keep_until` (after it, gone). Between
the two it is stale: the response cache may serve it while revalidating or when the replicas
fail. Tags link entries to the data they were computed from; `invalidate` drops every entry
with a tag and bumps the tag's epoch, so a load that started before the invalidation (and so
may have read the old data) is refused when it tries to store (`store(..., since=epoch)`).

Remembering invalidations is bounded (`max_tracked_invalidations` tags): beyond it the oldest
are folded into one floor epoch, and a tagged load that began before the floor is refused as
possibly stale, whatever its tags. A fold thus only ever refuses more, never lets an old row
in: memory is bounded, correctness kept. Tags are remembered by their `hash()`: a collision
(about 1 in 2^64 per pair; the hash is keyed per process) can only refuse a store too.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from ..policies.eviction import EvictionPolicy, make_policy
from .invalidation import ALL_TAGS

ENTRY_OVERHEAD_BYTES = 120  # dict slot, entry object, policy node: counted against capacity
MAX_TRACKED_INVALIDATIONS = 100_000  # [cache] max_tracked_invalidations' default (a test pins
# them equal); replicas, which do not read [cache], remember this many in each ReadThrough


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


@dataclass
class MemoryCache:
    capacity_bytes: int
    policy_name: str = "tinylfu"
    avg_entry_bytes: int = 1024  # sizes TinyLFU's frequency sketch (expected entries)
    stats: CacheStats = field(default_factory=CacheStats)
    max_tracked_invalidations: int = MAX_TRACKED_INVALIDATIONS

    def __post_init__(self) -> None:
        if self.max_tracked_invalidations < 1:
            raise ValueError("max_tracked_invalidations must be >= 1")
        self._policy: EvictionPolicy = make_policy(self.policy_name, max(0, self.capacity_bytes),
                                                   avg_entry_bytes=self.avg_entry_bytes)
        self._entries: dict[Hashable, Entry] = {}
        self._by_tag: dict[str, set[Hashable]] = {}
        self._epoch = 0
        # hash(tag) → epoch of its last invalidation, in epoch order (a re-invalidated tag moves
        # to the end), so the oldest are the first: folding takes a prefix
        self._invalidated: dict[int, int] = {}
        self._floor = 0  # every forgotten tag was invalidated at this epoch or before
        self._all_epoch = 0  # the last ALL_TAGS invalidation: never folded, one int
        self.folded_invalidations = 0  # tags forgotten into the floor

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
        """Was any of these tags invalidated after `since` (an epoch from `epoch()`)? Also true
        for any tagged load older than the fold floor: its tags may be among those forgotten.
        Untagged answers depend on no data and are never stale."""
        tags = tuple(tags)
        if not tags:
            return False
        if self._all_epoch > since or self._floor > since:
            return True
        invalidated = self._invalidated
        return any(invalidated.get(hash(tag), 0) > since for tag in tags)

    @property
    def tracked_invalidations(self) -> int:
        """Tags whose invalidation epoch is remembered one by one (at most the bound)."""
        return len(self._invalidated)

    @property
    def floor_epoch(self) -> int:
        """Tagged loads that began before this epoch are refused (see `_fold`)."""
        return self._floor

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
        """Drop every entry with any of these tags; loads begun before now will not store.
        (`now` is unused: how long an invalidation is remembered depends on how many others
        came after it, not on time; kept so every store method takes the time the same way.)"""
        self._epoch += 1
        epoch = self._epoch
        invalidated = self._invalidated
        by_tag = self._by_tag
        dropped = 0
        for tag in tags:
            if tag == ALL_TAGS:
                self._all_epoch = epoch
                for key in {k for keys in self._by_tag.values() for k in keys}:
                    dropped += self._drop(key)
                continue
            h = hash(tag)
            # pop first: re-inserting moves the tag to the end, keeping the dict in epoch order
            invalidated.pop(h, None)
            invalidated[h] = epoch
            keys = by_tag.get(tag)
            if keys:
                for key in list(keys):
                    dropped += self._drop(key)
        self.stats.invalidated += dropped
        if len(invalidated) > self.max_tracked_invalidations:
            self._fold()
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

    def _fold(self) -> None:
        """Forget the oldest tags down to 3/4 of the bound, raising the floor to the newest
        epoch forgotten. Why it stays correct: a forgotten tag's epoch is <= the floor, so a
        load with `since >= floor` would not have been refused for it anyway, and a tagged load
        with `since < floor` is refused outright. Why 3/4: one rebuild per bound/4 tags keeps
        the cost amortised O(1) per tag (popping a dict's first item one at a time is O(n)),
        and the rebuilt dict gives back the memory of the forgotten entries."""
        keep = self.max_tracked_invalidations - self.max_tracked_invalidations // 4
        cut = len(self._invalidated) - keep
        items = iter(self._invalidated.items())  # no list copy: the peak stays near one dict
        # the prefix is in epoch order, so this is its last epoch; max() keeps the floor
        # conservative even if that order were ever broken
        self._floor = max(self._floor, max(epoch for _, epoch in islice(items, cut)))
        self._invalidated = dict(items)  # what is left: the newest `keep`
        self.folded_invalidations += cut
