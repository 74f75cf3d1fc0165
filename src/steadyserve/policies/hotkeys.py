"""Heavy hitters in a stream with Space-Saving: which keys are hot, in O(k) memory. Pure.

Metwally, Agrawal and El Abbadi, "Efficient Computation of Frequent and Top-k Elements in Data
Streams" (ICDT 2005). Keep k counters. A key already counted adds its weight; a new key, when
all k are taken, replaces the key with the smallest count m and starts at m + weight, remembering
m as its possible overcount. So for every key reported:

    count - error  <=  true weight  <=  count

and any key whose true weight exceeds (total weight) / k is guaranteed to be present.

The minimum is kept by a heap with one entry per key whose priority may lag behind the key's
count (counts only grow between halvings): when the top entry is stale it is re-pushed with
the current count. The weighted case rules out the O(1) stream-summary lists, so `offer` is
O(1) for a key already counted and amortised O(log k) for a new one.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable


class HotKeys:
    """Space-Saving summary of the k heaviest keys; `halve` ages it so it follows a changing mix."""

    __slots__ = ("_counts", "_errors", "_heap", "_seq", "k", "total")

    def __init__(self, k: int = 64) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.total = 0  # weight offered since the start (halved with the counts)
        self._counts: dict[Hashable, int] = {}
        self._errors: dict[Hashable, int] = {}
        # (count when pushed, tie-break, key): keys need not be comparable
        self._heap: list[tuple[int, int, Hashable]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._counts)

    def __contains__(self, key: object) -> bool:
        return key in self._counts

    def offer(self, key: Hashable, weight: int = 1) -> None:
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        self.total += weight
        counts = self._counts
        count = counts.get(key)
        if count is not None:
            counts[key] = count + weight  # its heap entry now lags; fixed when it reaches the top
            return
        if len(counts) < self.k:
            counts[key] = weight
            self._errors[key] = 0
            heapq.heappush(self._heap, (weight, next(self._seq), key))
            return
        heap = self._heap
        while True:  # the true minimum: re-push stale tops until the top is current
            pushed, _, victim = heap[0]
            current = counts[victim]
            if pushed == current:
                break
            heapq.heapreplace(heap, (current, next(self._seq), victim))
        del counts[victim]
        del self._errors[victim]
        counts[key] = current + weight
        self._errors[key] = current
        heapq.heapreplace(heap, (current + weight, next(self._seq), key))

    def top(self, n: int) -> list[tuple[Hashable, int, int]]:
        """Up to n (key, count, max overcount) by count, highest first; true weight is in
        [count - overcount, count]."""
        if n <= 0:
            return []
        errors = self._errors
        best = heapq.nlargest(n, self._counts.items(), key=lambda item: item[1])
        return [(key, count, errors[key]) for key, count in best]

    def estimate(self, key: Hashable) -> tuple[int, int]:
        """(count, max overcount) of `key`; (0, 0) when not tracked (its weight is then at most
        the smallest count)."""
        count = self._counts.get(key)
        if count is None:
            return 0, 0
        return count, self._errors[key]

    def halve(self) -> None:
        """Halve every count and overcount (rounding down), so old weight fades; keys that fall
        to zero are dropped. The bounds then hold for the halved history."""
        self.total //= 2
        counts = {key: count // 2 for key, count in self._counts.items() if count // 2 > 0}
        self._errors = {key: min(self._errors[key] // 2, count) for key, count in counts.items()}
        self._counts = counts
        self._heap = [(count, next(self._seq), key) for key, count in counts.items()]
        heapq.heapify(self._heap)
