"""Byte-capacity eviction and admission for a cache: which keys stay. Pure; no clock, no rng.

A policy tracks keys and their sizes only; the caller keeps the values, and deletes exactly the
keys a call returns. Every lookup, hit or miss, goes through `record_access` (that is what the
frequency sketch learns from); a miss whose value the caller then computes goes through `admit`.

* `LruPolicy`: least recently used, by bytes. The baseline: good for recency-skewed traffic,
  poor when a scan or a long tail of one-off keys pushes out the popular ones.
* `TinyLfuPolicy`: W-TinyLFU (Einziger, Friedman and Manes, "TinyLFU: A Highly Efficient Cache
  Admission Policy", ACM TOS 2017), laid out as Caffeine lays it out: a small LRU window in front
  of a segmented LRU main space, and a count-min sketch of recent frequencies that decides
  whether a key leaving the window may displace main's eviction victim. One-off keys die in the
  window; popular keys are not pushed out by them. On Zipf-like traffic (what a model gateway
  sees) it beats LRU by several points of hit ratio at the same bytes (tests/unit/test_eviction.py).

Every operation is O(1) amortised: OrderedDicts for the LRU lists, a bytearray for the sketch.
Admission with variable sizes may examine several victims; see `TinyLfuPolicy`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Protocol

from ..errors import ConfigError
from .affinity import stable_hash

_MASK64 = (1 << 64) - 1
_MASK32 = (1 << 32) - 1
COUNTER_MAX = 15  # 4-bit counters, as in the paper and Caffeine: frequency saturates at 15
_HALVE = bytes(v >> 1 for v in range(256))
_ODD = bytes(v & 1 for v in range(256))


def mix64(x: int) -> int:
    """splitmix64's finaliser: spreads an int's bits over 64 (consecutive ints land far apart)."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def key_hash(key: Hashable) -> int:
    """A 64-bit hash of `key` that is the same in every process (`hash()` of str is salted).

    int → `mix64`; str and bytes → blake2b (`affinity.stable_hash`); anything else → blake2b of
    its `repr`, so tuples of str/int/bytes are stable, and objects whose repr shows their id are
    not (they still work within one process, which is all a sketch needs).
    """
    if isinstance(key, int):
        return mix64(key)
    if isinstance(key, str | bytes):
        return stable_hash(key)
    return stable_hash(repr(key))


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class CountMinSketch:
    """Count-min sketch (Cormode and Muthukrishnan 2005) of 4-bit counters that forgets by halving.

    Four rows of `width` counters; a key's four counters come from one 64-bit hash by double
    hashing (Kirsch and Mitzenmacher 2006), and its estimate is the least of them, which is never
    below the key's true count since the last halving (capped at 15). After `sample_size`
    increments every counter is halved (TinyLFU's "reset"), so the sketch reflects recent
    popularity and a once-hot key fades. Width is 4 × next_pow2(expected entries) and the sample
    10 × expected entries, as in Caffeine: about 2.5 increments per counter between resets.

    Methods ending in `_hash` take a precomputed 64-bit hash (see `key_hash`); the others hash.
    """

    __slots__ = ("_additions", "_mask", "_table", "_width", "resets", "sample_size")

    def __init__(self, expected_entries: int, *, sample_factor: int = 10) -> None:
        if expected_entries < 1:
            raise ValueError(f"expected_entries must be >= 1, got {expected_entries}")
        self._width = 4 * _pow2_at_least(expected_entries)
        self._mask = self._width - 1
        self._table = bytearray(4 * self._width)
        self.sample_size = max(1, sample_factor * expected_entries)
        self._additions = 0
        self.resets = 0

    @property
    def width(self) -> int:
        return self._width

    @property
    def additions(self) -> int:
        """Increments since the last reset (halving), as the reset rule counts them."""
        return self._additions

    def increment_hash(self, h: int) -> None:
        table, mask, w = self._table, self._mask, self._width
        a = h & _MASK32
        b = (h >> 32) | 1
        i0 = a & mask
        i1 = ((a + b) & mask) + w
        i2 = ((a + 2 * b) & mask) + 2 * w
        i3 = ((a + 3 * b) & mask) + 3 * w
        added = False
        if table[i0] < COUNTER_MAX:
            table[i0] += 1
            added = True
        if table[i1] < COUNTER_MAX:
            table[i1] += 1
            added = True
        if table[i2] < COUNTER_MAX:
            table[i2] += 1
            added = True
        if table[i3] < COUNTER_MAX:
            table[i3] += 1
            added = True
        if added:  # Caffeine counts only increments that changed a counter
            self._additions += 1
            if self._additions >= self.sample_size:
                self.reset()

    def estimate_hash(self, h: int) -> int:
        table, mask, w = self._table, self._mask, self._width
        a = h & _MASK32
        b = (h >> 32) | 1
        return min(
            table[a & mask],
            table[((a + b) & mask) + w],
            table[((a + 2 * b) & mask) + 2 * w],
            table[((a + 3 * b) & mask) + 3 * w],
        )

    def increment(self, key: Hashable) -> None:
        self.increment_hash(key_hash(key))

    def estimate(self, key: Hashable) -> int:
        return self.estimate_hash(key_hash(key))

    def reset(self) -> None:
        """Halve every counter. The addition count drops by half and by the odd counters'
        truncated halves (each of a key's 4 rows), as Caffeine's `reset` does."""
        odd = self._table.translate(_ODD).count(1)
        self._table = bytearray(self._table.translate(_HALVE))
        self._additions = max(0, (self._additions - odd // 4) // 2)
        self.resets += 1


class EvictionPolicy(Protocol):
    """What a cache needs from its policy. Sizes are bytes; `admit` and `resize` return the keys
    the cache must drop (for `admit`, possibly the admitted key itself: then it was refused).

    `capacity` changes only through `resize`. `evictions` counts stored keys pushed out to make
    room; `rejections` counts keys refused: larger than the capacity, or (TinyLFU) window
    candidates that lost the admission contest.
    """

    evictions: int
    rejections: int

    @property
    def capacity(self) -> int: ...
    @property
    def used(self) -> int: ...
    def __len__(self) -> int: ...
    def __contains__(self, key: object) -> bool: ...
    def record_access(self, key: Hashable) -> None: ...
    def admit(self, key: Hashable, size: int) -> list[Hashable]: ...
    def remove(self, key: Hashable) -> bool: ...
    def resize(self, capacity: int) -> list[Hashable]: ...


def _check_capacity(capacity: int) -> int:
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0 bytes, got {capacity}")
    return capacity


def _check_size(size: int) -> None:
    if size < 0:
        raise ValueError(f"size must be >= 0 bytes, got {size}")


class LruPolicy:
    """Least recently used, bounded by bytes: evict from the cold end until the new key fits.

    `admit` of a key already present re-sizes it and counts as a use. A key larger than the
    whole capacity is refused (`[key]` returned) and, if present at its old size, dropped.
    """

    __slots__ = ("_capacity", "_entries", "_used", "evictions", "rejections")

    def __init__(self, capacity: int) -> None:
        self._capacity = _check_capacity(capacity)
        self._entries: OrderedDict[Hashable, int] = OrderedDict()
        self._used = 0
        self.evictions = 0
        self.rejections = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def used(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def keys(self) -> list[Hashable]:
        """Keys from least to most recently used (for tests and introspection)."""
        return list(self._entries)

    def record_access(self, key: Hashable) -> None:
        if key in self._entries:
            self._entries.move_to_end(key)

    def admit(self, key: Hashable, size: int) -> list[Hashable]:
        _check_size(size)
        entries = self._entries
        old = entries.get(key)
        if size > self._capacity:
            self.rejections += 1
            if old is not None:
                del entries[key]
                self._used -= old
            return [key]
        if old is not None:
            self._used += size - old
            entries[key] = size
            entries.move_to_end(key)
        else:
            entries[key] = size
            self._used += size
        return self._shrink()

    def remove(self, key: Hashable) -> bool:
        size = self._entries.pop(key, None)
        if size is None:
            return False
        self._used -= size
        return True

    def resize(self, capacity: int) -> list[Hashable]:
        self._capacity = _check_capacity(capacity)
        return self._shrink()

    def _shrink(self) -> list[Hashable]:
        evicted: list[Hashable] = []
        entries = self._entries
        while self._used > self._capacity:
            k, s = entries.popitem(last=False)
            self._used -= s
            evicted.append(k)
        self.evictions += len(evicted)
        return evicted


class TinyLfuPolicy:
    """W-TinyLFU by bytes: window LRU → (admission filter) → segmented LRU main.

    A new key enters the window (``window_share`` of capacity, 1% as in Caffeine's starting
    point). A key pushed out of the window is a *candidate* for main. If main and the window
    together still fit it, it joins main's probation segment. Otherwise main's victims are taken
    from the cold end of probation, then of protected, until they free enough bytes; the
    candidate goes in only if its sketch frequency is strictly higher than every one of those
    victims' — a tie or any warmer victim refuses it, and then no victim is touched. ("Each
    victim in turn" rather than "more than their sum": TinyLFU's question is whether the
    candidate is more popular than what it replaces, per key; the sum rule would refuse a large
    popular value for many small lukewarm ones forever. Caffeine compares victims one at a time
    too, but evicts the ones it beat before losing to a later one; collecting the victims first
    loses nothing on a refusal.)

    A hit in probation promotes the key to protected (``protected_share`` of main, 80%); protected
    overflow is demoted to probation's hot end, so a key must prove itself twice to be sheltered.

    The sketch is sized for ``expected_entries`` (default: capacity / ``avg_entry_bytes``); it is
    not rebuilt by `resize`. Caffeine's hill-climbing of the window size, its doorkeeper and its
    random admission against hash flooding are left out (keys here are server-side cache keys).
    The hard invariant is ``used <= capacity``; the window share is a target: while the window is
    under its target (warm-up, after removals) main may use the slack, and when the window grows
    back main gives the bytes up without an admission contest, as Caffeine does.
    """

    __slots__ = (
        "_capacity",
        "_probation",
        "_probation_used",
        "_protected",
        "_protected_cap",
        "_protected_used",
        "_sketch",
        "_window",
        "_window_cap",
        "_window_used",
        "evictions",
        "protected_share",
        "rejections",
        "window_share",
    )

    def __init__(
        self,
        capacity: int,
        *,
        expected_entries: int | None = None,
        avg_entry_bytes: int = 4096,
        window_share: float = 0.01,
        protected_share: float = 0.8,
    ) -> None:
        if not 0.0 <= window_share <= 1.0:
            raise ValueError(f"window_share must be in [0, 1], got {window_share}")
        if not 0.0 <= protected_share <= 1.0:
            raise ValueError(f"protected_share must be in [0, 1], got {protected_share}")
        if avg_entry_bytes < 1:
            raise ValueError(f"avg_entry_bytes must be >= 1, got {avg_entry_bytes}")
        self.window_share = window_share
        self.protected_share = protected_share
        self._capacity = _check_capacity(capacity)
        self._window_cap = 0
        self._protected_cap = 0
        self._set_targets()
        entries = expected_entries if expected_entries is not None else capacity // avg_entry_bytes
        self._sketch = CountMinSketch(max(16, entries))
        self._window: OrderedDict[Hashable, int] = OrderedDict()
        self._probation: OrderedDict[Hashable, int] = OrderedDict()
        self._protected: OrderedDict[Hashable, int] = OrderedDict()
        self._window_used = 0
        self._probation_used = 0
        self._protected_used = 0
        self.evictions = 0
        self.rejections = 0

    def _set_targets(self) -> None:
        self._window_cap = int(self._capacity * self.window_share)
        self._protected_cap = int((self._capacity - self._window_cap) * self.protected_share)

    # --- reading -------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def used(self) -> int:
        return self._window_used + self._probation_used + self._protected_used

    @property
    def sketch(self) -> CountMinSketch:
        return self._sketch

    def __len__(self) -> int:
        return len(self._window) + len(self._probation) + len(self._protected)

    def __contains__(self, key: object) -> bool:
        return key in self._protected or key in self._probation or key in self._window

    def frequency(self, key: Hashable) -> int:
        """The sketch's estimate of `key`'s recent accesses (0..15)."""
        return self._sketch.estimate_hash(key_hash(key))

    def segments(self) -> dict[str, list[Hashable]]:
        """Keys per segment, coldest first (for tests and introspection)."""
        return {
            "window": list(self._window),
            "probation": list(self._probation),
            "protected": list(self._protected),
        }

    # --- the per-request path --------------------------------------------------------------------

    def record_access(self, key: Hashable) -> None:
        self._sketch.increment_hash(key_hash(key))
        protected = self._protected
        if key in protected:
            protected.move_to_end(key)
            return
        size = self._probation.pop(key, None)
        if size is not None:
            self._probation_used -= size
            protected[key] = size
            self._protected_used += size
            if self._protected_used > self._protected_cap:
                self._demote()
            return
        if key in self._window:
            self._window.move_to_end(key)

    def admit(self, key: Hashable, size: int) -> list[Hashable]:
        _check_size(size)
        if size > self._capacity:
            self.rejections += 1
            self.remove(key)
            return [key]
        window = self._window
        old = window.get(key)
        if old is not None:
            window[key] = size
            window.move_to_end(key)
            self._window_used += size - old
        elif (old := self._probation.get(key)) is not None:
            self._probation[key] = size
            self._probation.move_to_end(key)
            self._probation_used += size - old
        elif (old := self._protected.get(key)) is not None:
            self._protected[key] = size
            self._protected.move_to_end(key)
            self._protected_used += size - old
            if self._protected_used > self._protected_cap:
                self._demote()
        else:
            window[key] = size
            self._window_used += size
        evicted: list[Hashable] = []
        if self._window_used > self._window_cap:
            self._evict_window(evicted)
        if self._window_used + self._probation_used + self._protected_used > self._capacity:
            self._evict_main(evicted)
        return evicted

    def remove(self, key: Hashable) -> bool:
        size = self._window.pop(key, None)
        if size is not None:
            self._window_used -= size
            return True
        size = self._probation.pop(key, None)
        if size is not None:
            self._probation_used -= size
            return True
        size = self._protected.pop(key, None)
        if size is not None:
            self._protected_used -= size
            return True
        return False

    def resize(self, capacity: int) -> list[Hashable]:
        self._capacity = _check_capacity(capacity)
        self._set_targets()
        if self._protected_used > self._protected_cap:
            self._demote()
        evicted: list[Hashable] = []
        if self._window_used > self._window_cap:
            self._evict_window(evicted)
        if self.used > self._capacity:
            self._evict_main(evicted)
        return evicted

    # --- internals -------------------------------------------------------------------------------

    def _demote(self) -> None:
        protected, probation = self._protected, self._probation
        while self._protected_used > self._protected_cap and protected:
            k, s = protected.popitem(last=False)
            self._protected_used -= s
            probation[k] = s
            self._probation_used += s

    def _evict_window(self, evicted: list[Hashable]) -> None:
        window = self._window
        k, s = window.popitem(last=False)
        self._window_used -= s
        if self._window_used <= self._window_cap or not window:
            self._offer(k, s, evicted)
            return
        candidates = [(k, s)]  # several leave at once (a large key arrived): take them all out first
        while self._window_used > self._window_cap and window:
            k, s = window.popitem(last=False)
            self._window_used -= s
            candidates.append((k, s))
        for k, s in candidates:
            self._offer(k, s, evicted)

    def _offer(self, key: Hashable, size: int, evicted: list[Hashable]) -> None:
        """Candidate `key` leaves the window: into probation if it fits or beats every victim."""
        probation, protected = self._probation, self._protected
        excess = self._window_used + self._probation_used + self._protected_used + size - self._capacity
        if excess <= 0:
            probation[key] = size
            self._probation_used += size
            return
        if excess > self._probation_used + self._protected_used:
            self.rejections += 1  # cannot fit even with main emptied (the window holds the rest)
            evicted.append(key)
            return
        sketch = self._sketch
        frequency = sketch.estimate_hash(key_hash(key))
        freed = 0
        from_probation = 0
        from_protected = 0
        for victim, victim_size in probation.items():
            if sketch.estimate_hash(key_hash(victim)) >= frequency:
                self.rejections += 1
                evicted.append(key)
                return
            freed += victim_size
            from_probation += 1
            if freed >= excess:
                break
        else:
            for victim, victim_size in protected.items():
                if sketch.estimate_hash(key_hash(victim)) >= frequency:
                    self.rejections += 1
                    evicted.append(key)
                    return
                freed += victim_size
                from_protected += 1
                if freed >= excess:
                    break
        for _ in range(from_probation):
            victim, victim_size = probation.popitem(last=False)
            self._probation_used -= victim_size
            evicted.append(victim)
        for _ in range(from_protected):
            victim, victim_size = protected.popitem(last=False)
            self._protected_used -= victim_size
            evicted.append(victim)
        self.evictions += from_probation + from_protected
        probation[key] = size
        self._probation_used += size

    def _evict_main(self, evicted: list[Hashable]) -> None:
        """Over capacity with no candidate to weigh (the window regrew, or capacity shrank)."""
        while self._window_used + self._probation_used + self._protected_used > self._capacity:
            if self._probation:
                k, s = self._probation.popitem(last=False)
                self._probation_used -= s
            elif self._protected:
                k, s = self._protected.popitem(last=False)
                self._protected_used -= s
            else:
                k, s = self._window.popitem(last=False)
                self._window_used -= s
            evicted.append(k)
            self.evictions += 1


POLICIES: dict[str, Callable[[int], EvictionPolicy]] = {"tinylfu": TinyLfuPolicy, "lru": LruPolicy}


def make_policy(name: str, capacity_bytes: int, *, avg_entry_bytes: int = 4096) -> EvictionPolicy:
    """A policy by name. `avg_entry_bytes` sizes TinyLFU's sketch (capacity / it = expected
    entries): too large a guess leaves the sketch too small for many small entries, and the
    admission filter then loses part of its edge over LRU (measured: +4.5 instead of +7.3
    points on Zipf(1.0) with 320 B entries)."""
    if name not in POLICIES:
        known = ", ".join(sorted(POLICIES))
        raise ConfigError(f"unknown eviction policy {name!r}; choose one of: {known}")
    if name == "tinylfu":
        return TinyLfuPolicy(capacity_bytes, avg_entry_bytes=max(1, avg_entry_bytes))
    return POLICIES[name](capacity_bytes)
