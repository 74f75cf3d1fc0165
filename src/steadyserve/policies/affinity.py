"""Cache-affinity routing: consistent hashing with bounded loads. Pure; loads are arguments.

Sending the same key to the same replica keeps that replica's cache warm for it; sending every
request for a hot key there overloads it. Mirrokni, Thorup and Zadimoghaddam, "Consistent
Hashing with Bounded Loads" (SODA 2018) keep both: walk the ring from the key's position and take
the first replica whose load, counting this request, stays within ``ceil(c · average)``, c > 1.
Each key then has a stable home, a hot key spills to the next replicas on the ring (the same ones
every time, so their caches warm for it too), and no replica carries more than c × its share.

`stable_hash` is blake2b, not `hash()`: Python salts str and bytes hashes per process, and every
gateway process must place a key at the same point on the ring.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterator, Sequence

_MASK64 = (1 << 64) - 1


def stable_hash(data: bytes | str) -> int:
    """64-bit blake2b of `data` (str as UTF-8): the same in every process, on every machine."""
    raw = data.encode() if isinstance(data, str) else data
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big")


class HashRing:
    """Each id placed at `vnodes` pseudo-random points on a 64-bit ring (Karger et al. 1997).

    More points per id even out the arcs each id owns: with v points the share of an id varies by
    about 1/sqrt(v) of the mean (64 points: ±12%). Removing an id moves only the keys it owned;
    adding one takes keys only from the ids it lands next to.
    """

    def __init__(self, ids: Sequence[str], vnodes: int = 64) -> None:
        if vnodes < 1:
            raise ValueError(f"vnodes must be >= 1, got {vnodes}")
        if len(set(ids)) != len(ids):
            raise ValueError("ids must be distinct")
        self.ids: tuple[str, ...] = tuple(ids)
        self.vnodes = vnodes
        points = sorted(
            (stable_hash(f"{id_}#{v}"), index) for index, id_ in enumerate(self.ids) for v in range(vnodes)
        )
        self._points = [p for p, _ in points]
        self._owners = [i for _, i in points]

    def __len__(self) -> int:
        return len(self.ids)

    def walk(self, key_hash: int) -> Iterator[int]:
        """Indices into `ids` clockwise from `key_hash`'s position, each id once: home first."""
        n = len(self.ids)
        if n == 0:
            return
        owners = self._owners
        total = len(owners)
        start = bisect.bisect_left(self._points, key_hash & _MASK64)
        seen: set[int] = set()
        for step in range(total):
            owner = owners[(start + step) % total]
            if owner not in seen:
                yield owner
                seen.add(owner)
                if len(seen) == n:
                    return

    def home(self, key_hash: int) -> int:
        """The first id clockwise from `key_hash`: where the key goes when nobody is overloaded."""
        if not self.ids:
            raise ValueError("empty ring")
        return self._owners[bisect.bisect_left(self._points, key_hash & _MASK64) % len(self._owners)]


def load_bound(outstanding: Sequence[int], balance: float) -> int:
    """Most requests one replica may hold once this one is placed: ceil(c · (total + 1) / n)."""
    return math.ceil(balance * (sum(outstanding) + 1) / len(outstanding))


def pick_bounded(ring: HashRing, outstanding: Sequence[int], key_hash: int, *, balance: float = 1.25) -> int:
    """First replica in `ring.walk(key_hash)` whose outstanding + 1 fits `load_bound`.

    `outstanding[i]` is the in-flight count of `ring.ids[i]`. With balance >= 1 some replica
    always fits (the least loaded holds at most floor(total / n) < the bound), so this always
    returns an index; balance = 1 is perfectly even and forgets affinity under load, larger
    values keep more keys home. 1.25 is the paper's suggestion for caches.
    """
    n = len(ring)
    if n == 0:
        raise ValueError("no replicas to pick from")
    if len(outstanding) != n:
        raise ValueError(f"{len(outstanding)} loads for {n} replicas")
    if balance < 1.0:
        raise ValueError(f"balance must be >= 1, got {balance}")
    bound = load_bound(outstanding, balance)
    best = -1
    for index in ring.walk(key_hash):
        if outstanding[index] + 1 <= bound:
            return index
        if best < 0 or outstanding[index] < outstanding[best]:
            best = index
    return best  # unreachable for balance >= 1; kept so a float rounding never raises
