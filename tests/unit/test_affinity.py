"""policies/affinity.py: stable_hash, HashRing, load_bound, pick_bounded."""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections import Counter

import pytest

from steadyserve.policies.affinity import HashRing, load_bound, pick_bounded, stable_hash

KEYS = [stable_hash(f"request-key-{i}") for i in range(10_000)]


def ids(n: int) -> list[str]:
    return [f"replica-{i}" for i in range(n)]


def homes(ring: HashRing, keys: list[int]) -> list[str]:
    return [ring.ids[ring.home(key)] for key in keys]


# --- stable_hash ----------------------------------------------------------------------------------

def test_stable_hash_known_value():
    # blake2b-64 of b"hello": the same in every process, unlike hash("hello")
    assert stable_hash("hello") == 0xA7B6EDA801E5347D


def test_stable_hash_of_str_is_that_of_its_utf8():
    assert stable_hash("héllo") == stable_hash("héllo".encode())
    assert stable_hash("") == stable_hash(b"")


def test_stable_hash_is_64_bit_and_spread():
    assert all(0 <= h < 1 << 64 for h in KEYS)
    assert len(set(KEYS)) == len(KEYS)
    top_bits = Counter(h >> 60 for h in KEYS)
    assert len(top_bits) == 16 and max(top_bits.values()) < 2 * len(KEYS) / 16


# --- HashRing -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_walk_yields_each_replica_once_home_first(n):
    ring = HashRing(ids(n))
    for key in KEYS[:200]:
        order = list(ring.walk(key))
        assert sorted(order) == list(range(n))
        assert order[0] == ring.home(key)


def test_walk_is_deterministic_across_instances():
    a, b = HashRing(ids(7)), HashRing(ids(7))
    assert all(list(a.walk(k)) == list(b.walk(k)) for k in KEYS[:500])


def test_walk_wraps_past_the_top_of_the_ring():
    ring = HashRing(ids(3))
    assert sorted(ring.walk((1 << 64) - 1)) == [0, 1, 2]
    assert list(ring.walk((1 << 64) - 1)) == list(ring.walk(0))  # the ring is a circle


def test_empty_ring():
    ring = HashRing([])
    assert list(ring.walk(123)) == []
    with pytest.raises(ValueError):
        ring.home(123)
    with pytest.raises(ValueError):
        pick_bounded(ring, [], 123)


@pytest.mark.parametrize(("names", "vnodes"), [(["a", "a"], 64), (["a"], 0)])
def test_bad_rings(names, vnodes):
    with pytest.raises(ValueError):
        HashRing(names, vnodes=vnodes)


def test_keys_spread_evenly_enough():
    ring = HashRing(ids(10))
    share = Counter(homes(ring, KEYS))
    assert len(share) == 10
    assert all(0.6 * 1000 < count < 1.4 * 1000 for count in share.values()), share  # ±12% expected


def test_more_vnodes_spread_more_evenly():
    def spread(vnodes: int) -> int:
        counts = Counter(homes(HashRing(ids(10), vnodes=vnodes), KEYS))
        return max(counts.values()) - min(counts.values())

    assert spread(256) < spread(4)


@pytest.mark.parametrize("n", [4, 10])
def test_removing_one_replica_moves_only_its_keys(n):
    before = homes(HashRing(ids(n)), KEYS)
    gone = f"replica-{n // 2}"
    after = homes(HashRing([i for i in ids(n) if i != gone]), KEYS)
    moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert all(b == gone for b, _ in moved)  # no key moves between surviving replicas
    assert len(moved) == before.count(gone)
    assert len(moved) / len(KEYS) < 2 / n


@pytest.mark.parametrize("n", [4, 10])
def test_adding_one_replica_moves_keys_only_to_it(n):
    before = homes(HashRing(ids(n)), KEYS)
    after = homes(HashRing([*ids(n), "newcomer"]), KEYS)
    moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert all(a == "newcomer" for _, a in moved)
    assert 0 < len(moved) / len(KEYS) < 2 / (n + 1)


def test_ring_order_does_not_depend_on_the_order_ids_are_given():
    forward, backward = HashRing(ids(6)), HashRing(ids(6)[::-1])
    assert homes(forward, KEYS[:1000]) == homes(backward, KEYS[:1000])


# --- load_bound and pick_bounded --------------------------------------------------------------------

@pytest.mark.parametrize(
    ("outstanding", "balance", "bound"),
    [
        pytest.param([0, 0, 0, 0], 1.25, 1, id="idle"),  # ceil(1.25 · 1 / 4)
        pytest.param([3, 3, 3, 3], 1.25, 5, id="even"),  # ceil(1.25 · 13 / 4) = ceil(4.06)
        pytest.param([3, 3, 3, 3], 1.0, 4, id="balance-one"),  # ceil(13 / 4)
        pytest.param([10, 0], 2.0, 11, id="two-times"),
        pytest.param([7], 1.25, 10, id="single"),
    ],
)
def test_load_bound(outstanding, balance, bound):
    assert load_bound(outstanding, balance) == bound


def test_same_key_same_replica_when_loads_are_equal():
    ring = HashRing(ids(5))
    for key in KEYS[:300]:
        first = pick_bounded(ring, [2, 2, 2, 2, 2], key)
        assert first == ring.home(key)
        assert all(pick_bounded(ring, [2, 2, 2, 2, 2], key) == first for _ in range(3))


def test_hot_key_spills_to_the_next_replica_on_the_ring():
    ring = HashRing(ids(4))
    key = KEYS[0]
    home, second, third, _ = ring.walk(key)
    loads = [1, 1, 1, 1]
    loads[home] = 6  # bound = ceil(1.25 · 10 / 4) = 4: home is over it
    assert pick_bounded(ring, loads, key) == second
    loads[second] = 4  # bound ceil(1.25 · 13 / 4) = 5: one more still fits
    assert pick_bounded(ring, loads, key) == second
    loads[second] = 5  # bound ceil(1.25 · 14 / 4) = 5: full, go on round the ring
    assert pick_bounded(ring, loads, key) == third


def test_spill_order_is_stable_so_overflow_caches_warm_too():
    ring = HashRing(ids(6))
    key = KEYS[1]
    home, second, *_ = ring.walk(key)
    loads = [0] * 6
    loads[home] = 50
    assert {pick_bounded(ring, loads, key) for _ in range(10)} == {second}


def test_balance_one_fills_the_least_loaded_when_all_else_is_full():
    ring = HashRing(ids(3))
    key = KEYS[2]
    for idle in range(3):
        loads = [5, 5, 5]
        loads[idle] = 4  # bound = ceil(15 / 3) = 5: only the idle one has room
        assert pick_bounded(ring, loads, key, balance=1.0) == idle


@pytest.mark.parametrize(
    ("loads", "balance", "message"),
    [([0, 0], 1.25, "loads"), ([0, 0, 0], 0.9, "balance")],
)
def test_pick_bounded_bad_arguments(loads, balance, message):
    with pytest.raises(ValueError, match=message):
        pick_bounded(HashRing(ids(3)), loads, KEYS[0], balance=balance)


def zipf_keys(n_keys: int, n: int, s: float, rng: random.Random) -> list[int]:
    cumulative = list(itertools.accumulate(1.0 / (rank + 1) ** s for rank in range(n_keys)))
    return [KEYS[bisect.bisect_left(cumulative, rng.random() * cumulative[-1])] for _ in range(n)]


def simulate(balance: float, seed: int = 17) -> tuple[int, float, int]:
    """10k Zipf(1.1) requests onto 8 replicas, each in flight until a random one completes.

    Returns (peak load, share served at the key's home, bound violations at assignment)."""
    rng = random.Random(seed)
    n = 8
    ring = HashRing(ids(n))
    loads = [0] * n
    in_flight: list[int] = []
    at_home = peak = violations = 0
    for key in zipf_keys(2000, 10_000, 1.1, rng):
        # completions: a geometric number per arrival, mean len(in_flight) / 64: about 64 in flight
        while in_flight and rng.random() < len(in_flight) / (len(in_flight) + 64):
            done = in_flight.pop(rng.randrange(len(in_flight)))
            loads[done] -= 1
        bound = load_bound(loads, balance)
        chosen = pick_bounded(ring, loads, key, balance=balance)
        at_home += chosen == ring.home(key)
        loads[chosen] += 1
        in_flight.append(chosen)
        violations += loads[chosen] > bound
        assert loads[chosen] <= math.ceil(balance * sum(loads) / n)
        peak = max(peak, loads[chosen])
    assert sum(loads) == len(in_flight)
    return peak, at_home / 10_000, violations


@pytest.mark.parametrize("balance", [1.0, 1.25, 2.0])
def test_loads_never_exceed_the_bound_under_skewed_traffic(balance):
    peak, home_share, violations = simulate(balance)
    assert violations == 0
    unbounded_peak, _, _ = simulate(1e9)  # plain consistent hashing: every request to its home
    assert peak < unbounded_peak
    if balance >= 1.25:
        assert home_share > 0.5  # most requests still reach their key's home


def test_bounded_loads_trade_affinity_for_balance():
    shares = [simulate(balance)[1] for balance in (1.0, 1.25, 2.0, 1e9)]
    assert shares == sorted(shares)
    assert shares[-1] == 1.0
