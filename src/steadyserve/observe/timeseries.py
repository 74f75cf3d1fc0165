"""In-memory history of numeric series, in two resolution tiers, for alert rules and the dashboard.

A series is keyed by (name, labels as a sorted tuple of (key, value)). `record` stores one
sample; counters as their cumulative value, gauges as they are (the store does not need to
know which is which). Each series keeps two fixed-capacity rings:

    raw     at most one point per `raw_step_s` (later samples in the same step overwrite),
            enough points for `raw_retention_s` at that step (default 600 s of 1 s points)
    coarse  one point per `coarse_step_s`, the last value of the step (the point of the step
            in progress moves with every sample), for `retention_s` (default 3 d + 1 h)

A query over a window of at most `raw_retention_s` reads the raw tier, a longer one the
coarse tier (`tier_for`). Each point carries, beside its value, the series' reset-adjusted
cumulative total (every drop of the value counts as a counter reset that adds the
post-reset value, as Prometheus' `increase` does). `increase` is then one subtraction and
exact across resets even where the coarse tier skipped the samples around a reset.

A counter that first appears a `raw_step_s` or more after the store's first sample is taken
to have started from 0 (a labelled Prometheus counter appears only once incremented, so its
first value is itself an increase); a series seen in the first recording, restored with
`load`, or coming back after it was evicted or dropped starts from its first value.

Memory is bounded by construction: a point is three C doubles (24 bytes) in a ring of fixed
capacity, so a series is at most `(raw_capacity + coarse_capacity) * 24` bytes (≈ 120 KiB
with the defaults); the number of series is capped by `max_series` (the least recently
updated one goes first), and a series with no sample for `retention_s` is dropped.

Pure: time is the `now` argument; no clock, no I/O, no threads.
"""

from __future__ import annotations

import math
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

Labels = tuple[tuple[str, str], ...]
SeriesKey = tuple[str, Labels]
LabelsLike = Mapping[str, str] | Iterable[tuple[str, str]] | None
Tier = Literal["raw", "coarse"]
PersistedPoint = tuple[str, Labels, float, float]  # (name, labels, t, value)

DEFAULT_RETENTION_S = 3 * 86_400.0 + 3_600.0


def labels_of(labels: LabelsLike) -> Labels:
    """Labels in their canonical form: a tuple of (key, value) sorted by key."""
    if labels is None:
        return ()
    items = labels.items() if isinstance(labels, Mapping) else labels
    return tuple(sorted((str(k), str(v)) for k, v in items))


def series_key(name: str, labels: LabelsLike = None) -> SeriesKey:
    return (name, labels_of(labels))


class _Ring:
    """Fixed-capacity ring of points (t, value, adjusted total) in three arrays of doubles.

    `origin` is the adjusted total just before the oldest point kept: the baseline of an
    `increase` whose window starts before the ring's first point.
    """

    __slots__ = ("_a", "_head", "_t", "_v", "capacity", "dropped", "origin")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._t = array("d")
        self._v = array("d")
        self._a = array("d")
        self._head = 0  # physical index of the oldest point once the ring is full
        self.dropped = 0
        self.origin = 0.0

    def __len__(self) -> int:
        return len(self._t)

    def _phys(self, i: int) -> int:
        n = len(self._t)
        if i < 0:
            i += n
        return (self._head + i) % n

    def t(self, i: int) -> float:
        return self._t[self._phys(i)]

    def v(self, i: int) -> float:
        return self._v[self._phys(i)]

    def a(self, i: int) -> float:
        return self._a[self._phys(i)]

    def put(self, t: float, v: float, a: float, prev_a: float, step_s: float) -> None:
        """Add a point, or overwrite the last one when it lies in the same step."""
        n = len(self._t)
        if n and math.floor(self.t(-1) / step_s) == math.floor(t / step_s):
            p = self._phys(-1)
        elif n < self.capacity:
            if n == 0:
                self.origin = prev_a
            self._t.append(t)
            self._v.append(v)
            self._a.append(a)
            return
        else:  # full: the oldest point goes
            p = self._head
            self.origin = self._a[p]
            self._head = (p + 1) % n
            self.dropped += 1
        self._t[p] = t
        self._v[p] = v
        self._a[p] = a

    def count_at_or_before(self, t: float) -> int:
        """How many points have a time <= t (the insertion point of a bisect-right)."""
        lo, hi = 0, len(self._t)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.t(mid) <= t:
                lo = mid + 1
            else:
                hi = mid
        return lo


@dataclass(slots=True, eq=False)
class _Series:
    raw: _Ring
    coarse: _Ring
    last_t: float
    last_v: float
    adjusted: float  # reset-adjusted cumulative total after the last sample
    persisted_t: float = -math.inf  # time of the newest coarse point handed to the writer


class SeriesStore:
    """Bounded two-tier history of many series; see the module docstring."""

    def __init__(
        self,
        *,
        raw_step_s: float = 1.0,
        raw_retention_s: float = 600.0,
        coarse_step_s: float = 60.0,
        retention_s: float = DEFAULT_RETENTION_S,
        max_series: int = 10_000,
    ) -> None:
        if not (0 < raw_step_s <= raw_retention_s and 0 < coarse_step_s <= retention_s):
            raise ValueError("need 0 < raw_step_s <= raw_retention_s and 0 < coarse_step_s <= retention_s")
        if max_series < 1:
            raise ValueError("max_series must be at least 1")
        self.raw_step_s = raw_step_s
        self.raw_retention_s = raw_retention_s
        self.coarse_step_s = coarse_step_s
        self.retention_s = retention_s
        self.max_series = max_series
        # one spare point so a window of the whole retention still finds its baseline, one
        # for the step in progress
        self.raw_capacity = math.ceil(raw_retention_s / raw_step_s) + 2
        self.coarse_capacity = math.ceil(retention_s / coarse_step_s) + 2
        self._series: OrderedDict[SeriesKey, _Series] = OrderedDict()  # least recently updated first
        self._by_name: dict[str, dict[Labels, None]] = {}
        self._first_record_at: float | None = None
        self._gone: OrderedDict[SeriesKey, None] = OrderedDict()  # recently evicted or dropped keys
        self.evicted_series = 0
        self.rejected_samples = 0  # out of order (older than the series' last) or NaN

    # writing ---------------------------------------------------------------------------------

    def record(self, name: str, labels: LabelsLike, value: float, now: float) -> None:
        """Store one sample of a series at `now`."""
        value = float(value)
        if math.isnan(value):
            self.rejected_samples += 1
            return
        key = (name, labels_of(labels))
        if self._first_record_at is None:
            self._first_record_at = now
        s = self._series.get(key)
        if s is None:
            # appeared after the first recording: it started from 0 (unless it was here before
            # and got evicted: then its value is history, not news)
            fresh = now >= self._first_record_at + self.raw_step_s and key not in self._gone
            s = self._add_series(key, now, value)
            prev_a, adjusted = 0.0, (value if fresh else 0.0)
        else:
            if now < s.last_t:
                self.rejected_samples += 1
                return
            self._series.move_to_end(key)
            prev_a = s.adjusted
            adjusted = prev_a + (value - s.last_v if value >= s.last_v else value)
        s.last_t, s.last_v, s.adjusted = now, value, adjusted
        s.raw.put(now, value, adjusted, prev_a, self.raw_step_s)
        s.coarse.put(now, value, adjusted, prev_a, self.coarse_step_s)
        self._drop_stale(now)

    def load(self, points: Iterable[PersistedPoint]) -> int:
        """Restore coarse points (from `snapshot_for_persistence`, via the database) after a
        restart. Points not newer than a series' last are skipped; returns how many were
        loaded. Restored points count as persisted."""
        loaded = 0
        for name, labels, t, value in sorted(points, key=lambda p: p[2]):
            key = (name, labels_of(labels))
            s = self._series.get(key)
            if s is None:
                s = self._add_series(key, t, value)
                prev_a = adjusted = 0.0
            elif t <= s.last_t:
                continue
            else:
                prev_a = s.adjusted
                adjusted = prev_a + (value - s.last_v if value >= s.last_v else value)
            s.last_t, s.last_v, s.adjusted = t, value, adjusted
            s.coarse.put(t, value, adjusted, prev_a, self.coarse_step_s)
            s.persisted_t = t
            loaded += 1
        return loaded

    def _add_series(self, key: SeriesKey, now: float, value: float) -> _Series:
        while len(self._series) >= self.max_series:
            self._forget(next(iter(self._series)))
            self.evicted_series += 1
        s = _Series(_Ring(self.raw_capacity), _Ring(self.coarse_capacity), now, value, 0.0)
        self._series[key] = s
        self._by_name.setdefault(key[0], {})[key[1]] = None
        return s

    def _forget(self, key: SeriesKey) -> None:
        del self._series[key]
        self._gone[key] = None
        if len(self._gone) > self.max_series:
            self._gone.popitem(last=False)
        names = self._by_name[key[0]]
        del names[key[1]]
        if not names:
            del self._by_name[key[0]]

    def _drop_stale(self, now: float) -> None:
        while self._series:
            key, oldest = next(iter(self._series.items()))
            if oldest.last_t >= now - self.retention_s:
                return
            self._forget(key)

    def snapshot_for_persistence(self, now: float, *, final: bool = False) -> list[PersistedPoint]:
        """Coarse points of finished steps added since the last call, oldest first per series:
        what a database writer appends. The step in progress is left for a later call, unless
        this is the `final` call (the process stops: its last point is all there will be)."""
        out: list[PersistedPoint] = []
        step = self.coarse_step_s
        current = math.inf if final else math.floor(now / step)
        for (name, labels), s in self._series.items():
            ring = s.coarse
            newer: list[PersistedPoint] = []
            for i in range(len(ring) - 1, -1, -1):
                t = ring.t(i)
                if t <= s.persisted_t:
                    break
                if math.floor(t / step) < current:
                    newer.append((name, labels, t, ring.v(i)))
            if newer:
                s.persisted_t = newer[0][2]
                out.extend(reversed(newer))
        return out

    # reading ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._series)

    def __contains__(self, key: object) -> bool:
        return key in self._series

    def keys(self, name: str) -> list[Labels]:
        """The label sets recorded under `name`."""
        return list(self._by_name.get(name, ()))

    def names(self) -> list[str]:
        return list(self._by_name)

    def tier_for(self, window_s: float) -> Tier:
        return "raw" if window_s <= self.raw_retention_s else "coarse"

    def tier_lengths(self, key: SeriesKey) -> tuple[int, int]:
        """Points held now in the (raw, coarse) tiers of a series; (0, 0) if unknown."""
        s = self._series.get(key)
        return (len(s.raw), len(s.coarse)) if s else (0, 0)

    def _ring(self, key: SeriesKey, window_s: float) -> _Ring | None:
        s = self._series.get(key)
        if s is None:
            return None
        ring = s.raw if self.tier_for(window_s) == "raw" else s.coarse
        return ring if len(ring) else None

    def latest_sample(self, key: SeriesKey) -> tuple[float, float] | None:
        """(t, value) of the newest sample, or None."""
        s = self._series.get(key)
        return None if s is None else (s.last_t, s.last_v)

    def latest(self, key: SeriesKey) -> float | None:
        s = self._series.get(key)
        return None if s is None else s.last_v

    def increase(self, key: SeriesKey, window_s: float, now: float) -> float | None:
        """How much a counter grew over (now - window_s, now], counting resets: the newest
        point at or before `now` minus the point at or just before the window's start."""
        ring = self._ring(key, window_s)
        if ring is None:
            return None
        end = ring.count_at_or_before(now) - 1
        if end < 0:
            return None
        base = ring.count_at_or_before(now - window_s) - 1
        baseline = ring.a(base) if base >= 0 else ring.origin
        return ring.a(end) - baseline

    def rate(self, key: SeriesKey, window_s: float, now: float) -> float | None:
        """Per-second increase over the window."""
        inc = self.increase(key, window_s, now)
        return None if inc is None else inc / window_s

    def step_increases(self, key: SeriesKey, end: float, step_s: float, steps: int,
                       tier: Tier = "coarse") -> list[float | None]:
        """A counter's increase in each of `steps` consecutive steps of `step_s` ending at
        `end` — step k covers (end - (steps - k) * step_s, end - (steps - k - 1) * step_s] —
        counting resets; None for a step with no point. A series' very first point counts
        only when the store took it as news (a counter that appeared from 0 and had grown);
        one restored or seen in the first recording is a baseline: its step's increase is
        unknown, not 0.
        One walk over the tier's points."""
        out: list[float | None] = [None] * steps
        s = self._series.get(key)
        if s is None or steps <= 0:
            return out
        ring = s.raw if tier == "raw" else s.coarse
        start = end - steps * step_s
        i = ring.count_at_or_before(start)
        before = ring.a(i - 1) if i > 0 else ring.origin
        for j in range(i, len(ring)):
            t = ring.t(j)
            if t > end:
                break
            k = min(steps - 1, max(0, math.ceil((t - start) / step_s) - 1))
            adjusted = ring.a(j)
            if not (j == 0 and ring.dropped == 0 and adjusted == before):
                out[k] = (out[k] or 0.0) + adjusted - before
            before = adjusted
        return out

    def values(self, key: SeriesKey, window_s: float, now: float) -> list[tuple[float, float]]:
        """(t, value) of the points in (now - window_s, now], oldest first."""
        ring = self._ring(key, window_s)
        if ring is None:
            return []
        first = ring.count_at_or_before(now - window_s)
        last = ring.count_at_or_before(now)
        return [(ring.t(i), ring.v(i)) for i in range(first, last)]

    def avg_over(self, key: SeriesKey, window_s: float, now: float) -> float | None:
        """Mean of a gauge's points in the window (each point weighs the same)."""
        points = self.values(key, window_s, now)
        return sum(v for _, v in points) / len(points) if points else None
