"""Online hit-ratio curve of an LRU cache by bytes, from a spatially-hashed sample. Pure.

To size a cache one wants its hit ratio at every capacity, not just the current one. An LRU
cache of C bytes hits a reference exactly when the bytes of the distinct keys referenced since
that key's previous reference, plus the key's own size, are at most C (the key is still above the
cut in the LRU stack). So one histogram of these byte reuse distances gives the whole curve.

Computing every distance costs O(log n) per reference and memory per key; SHARDS (Waldspurger,
Park, Garthwaite and Ahmad, "Efficient MRC Construction with SHARDS", FAST 2015) computes them
only for keys whose hash falls below a threshold, a rate R spatial sample of the *keys*, and
scales the sampled distances by 1/R: the sampled keys see the same reuse pattern, thinned.

What this implements, in the paper's terms:

* sampling: a reference is sampled when ``key_hash mod modulus < threshold``; R =
  threshold / modulus. `key_hash` must already be a well-mixed 64-bit hash that is the same in
  every process (`affinity.stable_hash`, `eviction.key_hash`).
* distances: a Fenwick tree over logical timestamps holds each sampled key's size at the slot
  of its last reference; the bytes referenced since slot t are a suffix sum, O(log n). The
  timestamp space is renumbered (compacted) when it fills; it doubles when more than half live.
  distance = (sampled bytes since) / R + own size.
* fixed-size SHARDS: when more than `max_samples` keys are tracked, the threshold is lowered to
  the largest tracked hash value and the keys at it are dropped; histogram, cold-miss and
  reference counts are rescaled by T_new / T_old so that all counts are at the current rate.
* SHARDS_adj (on by default): the number of sampled references should be R × all references;
  a sample that happens to hold (or miss) a very hot key is off by that key's references, which
  are nearly all short-distance hits. The difference is added to (or taken from) the smallest
  distance bucket, as the paper does; this matters at rates near 1%.
* histogram: 8 buckets per octave of bytes from 64 B to 64 GiB (bucket 0: under 64 B, last:
  64 GiB and over), linearly interpolated inside a bucket; cold (first) references apart.
* `decay` halves every count, so the curve follows a workload that changes.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Sequence

MIN_BYTES = 64
BUCKETS_PER_OCTAVE = 8
OCTAVES = 30  # 64 B · 2^30 = 64 GiB
_NBUCKETS = OCTAVES * BUCKETS_PER_OCTAVE + 2
# _LOWER[i]: the smallest distance of bucket i; bucket i is [_LOWER[i], _LOWER[i + 1])
_LOWER: tuple[float, ...] = (
    0.0,
    *(MIN_BYTES * 2.0 ** (j / BUCKETS_PER_OCTAVE) for j in range(OCTAVES * BUCKETS_PER_OCTAVE + 1)),
)
_TOP = _NBUCKETS - 1  # 64 GiB and over


def _bucket(distance: float) -> int:
    if distance < MIN_BYTES:
        return 0
    j = int(BUCKETS_PER_OCTAVE * math.log2(distance / MIN_BYTES)) + 1
    return j if j < _TOP else _TOP


class HitCurve:
    """SHARDS estimate of the LRU hit ratio by byte capacity. Feed every reference to `record`."""

    def __init__(
        self,
        *,
        sample_rate: float = 0.01,
        max_samples: int = 8192,
        modulus: int = 1 << 24,
        adjust: bool = True,
    ) -> None:
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        if modulus < 1:
            raise ValueError(f"modulus must be >= 1, got {modulus}")
        self.modulus = modulus
        self.max_samples = max_samples
        self.adjust = adjust
        self._threshold = max(1, round(sample_rate * modulus))
        self._hist = [0.0] * _NBUCKETS
        self._cold = 0.0
        self._sampled = 0.0  # sampled references, rescaled to the current rate and decayed
        self._all = 0.0  # every reference recorded, decayed: R × this is what _sampled should be
        # tracked keys: key -> slot of its last reference; slot -> key, size; max-heap of hash values
        self._slot: dict[int, int] = {}
        self._cap = min(1 << 16, 4 * max_samples)
        self._keys: list[int | None] = [None] * self._cap
        self._sizes = [0] * self._cap
        self._tree = [0] * (self._cap + 1)
        self._now = 0
        self._live_bytes = 0
        self._by_value: list[tuple[int, int]] = []  # (-(key_hash mod modulus), key_hash)

    # --- reading -------------------------------------------------------------------------------

    @property
    def rate(self) -> float:
        """The sampling rate now (it only falls, when the fixed-size sample is full)."""
        return self._threshold / self.modulus

    @property
    def threshold(self) -> int:
        return self._threshold

    @property
    def references(self) -> int:
        """Sampled references behind the curve (rescaled to the current rate, after decays).

        A few hundred give a rough curve, a few thousand a good one."""
        return round(self._sampled)

    @property
    def tracked_keys(self) -> int:
        return len(self._slot)

    def curve(self, capacities: Sequence[int]) -> list[float]:
        """Estimated LRU hit ratio at each byte capacity (0.0 everywhere before any sample)."""
        total = self._sampled
        if total <= 0:
            return [0.0 for _ in capacities]
        bias = 0.0
        if self.adjust:
            bias = self._all * self.rate - self._sampled
            total += bias
        cumulative = [0.0]
        for count in self._hist:
            cumulative.append(cumulative[-1] + count)
        ratios: list[float] = []
        for capacity in capacities:
            hits = bias + self._hits_within(capacity, cumulative)
            ratios.append(min(1.0, max(0.0, hits / total)))
        return ratios

    def _hits_within(self, capacity: float, cumulative: list[float]) -> float:
        if capacity < 0:
            return 0.0
        index = bisect.bisect_right(_LOWER, capacity) - 1  # the bucket that holds `capacity`
        if index >= _TOP:
            return cumulative[_TOP]  # distances of 64 GiB and over: counted only as misses
        lo, hi = _LOWER[index], _LOWER[index + 1]
        return cumulative[index] + self._hist[index] * (capacity - lo) / (hi - lo)

    # --- writing -------------------------------------------------------------------------------

    def record(self, key_hash: int, size: int) -> None:
        """One reference to the key hashing to `key_hash`, whose value is `size` bytes now."""
        self._all += 1.0
        value = key_hash % self.modulus
        if value >= self._threshold:
            return
        slot = self._slot.get(key_hash)
        if slot is None:
            if len(self._slot) >= self.max_samples and not self._make_room(value):
                return  # this key is beyond the lowered threshold: no longer sampled
            heapq.heappush(self._by_value, (-value, key_hash))
            self._cold += 1.0
        else:
            since = self._live_bytes - self._prefix(slot + 1)
            self._hist[_bucket(since * self.modulus / self._threshold + size)] += 1.0
            self._vacate(slot)
        self._sampled += 1.0
        if self._now == self._cap:
            self._compact()
        slot = self._now
        self._now += 1
        self._slot[key_hash] = slot
        self._keys[slot] = key_hash
        self._sizes[slot] = size
        self._live_bytes += size
        self._add(slot, size)

    def decay(self) -> None:
        """Halve every count: older references weigh half as much as newer ones from now on."""
        self._hist = [count * 0.5 for count in self._hist]
        self._cold *= 0.5
        self._sampled *= 0.5
        self._all *= 0.5

    def _make_room(self, value: int) -> bool:
        """Lower the threshold so one tracked key fewer is sampled; False if `value` is out."""
        top = -self._by_value[0][0]
        new_threshold = max(top, value)  # the largest value goes: it, and all at it, leave the sample
        while self._by_value and -self._by_value[0][0] >= new_threshold:
            _, key = heapq.heappop(self._by_value)
            self._vacate(self._slot.pop(key))
        scale = new_threshold / self._threshold
        self._hist = [count * scale for count in self._hist]
        self._cold *= scale
        self._sampled *= scale
        self._threshold = new_threshold
        return value < new_threshold

    # --- the Fenwick tree over timestamps ---------------------------------------------------------

    def _add(self, slot: int, delta: int) -> None:
        tree, i, n = self._tree, slot + 1, self._cap
        while i <= n:
            tree[i] += delta
            i += i & -i

    def _prefix(self, end: int) -> int:
        """Bytes of live keys whose last reference is at a slot < end."""
        tree, i, total = self._tree, end, 0
        while i > 0:
            total += tree[i]
            i -= i & -i
        return total

    def _vacate(self, slot: int) -> None:
        size = self._sizes[slot]
        self._keys[slot] = None
        self._sizes[slot] = 0
        self._live_bytes -= size
        self._add(slot, -size)

    def _compact(self) -> None:
        """Renumber live slots 0..n-1 in order; double the space if over half of it is live."""
        live = [(k, s) for k, s in zip(self._keys, self._sizes, strict=True) if k is not None]
        if 2 * len(live) > self._cap:
            self._cap *= 2
        cap = self._cap
        self._keys = [None] * cap
        self._sizes = [0] * cap
        tree = [0] * (cap + 1)
        for slot, (key, size) in enumerate(live):
            self._keys[slot] = key
            self._sizes[slot] = size
            self._slot[key] = slot
            tree[slot + 1] += size
        for i in range(1, cap + 1):  # O(n) Fenwick build: push each node's sum to its parent
            parent = i + (i & -i)
            if parent <= cap:
                tree[parent] += tree[i]
        self._tree = tree
        self._now = len(live)


def choose_capacity(
    capacities: Sequence[int],
    ratios: Sequence[float],
    *,
    min_bytes: int,
    max_bytes: int,
    tolerance: float = 0.01,
) -> int:
    """The smallest capacity in [min_bytes, max_bytes] within `tolerance` of the best ratio there.

    Memory past the knee of the curve buys almost nothing; this picks the knee. Points outside
    the range, and NaN ratios, are ignored; with no point in range, `min_bytes` is returned (no
    evidence for spending more).
    """
    if len(capacities) != len(ratios):
        raise ValueError(f"{len(capacities)} capacities but {len(ratios)} ratios")
    if min_bytes > max_bytes:
        raise ValueError(f"min_bytes {min_bytes} > max_bytes {max_bytes}")
    pairs = zip(capacities, ratios, strict=True)
    points = sorted((c, r) for c, r in pairs if min_bytes <= c <= max_bytes and not math.isnan(r))
    if not points:
        return min_bytes
    best = max(r for _, r in points)
    return next(c for c, r in points if r >= best - tolerance)
