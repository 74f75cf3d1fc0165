"""policies/hitcurve.py: HitCurve (fixed-size SHARDS with SHARDS_adj) and choose_capacity."""

from __future__ import annotations

import bisect
import itertools
import math
import random

import pytest

from steadyserve.policies.affinity import stable_hash
from steadyserve.policies.eviction import LruPolicy
from steadyserve.policies.hitcurve import HitCurve, choose_capacity

CAPACITY_SHARES = (0.05, 0.1, 0.2, 0.3, 0.4)  # of the bytes of all keys


class Trace:
    """Zipf(s) references over n_keys keys of 500..1500 bytes each, ranks shuffled."""

    def __init__(self, n_keys: int, n_refs: int, s: float, seed: int) -> None:
        rng = random.Random(seed)
        cumulative = list(itertools.accumulate(1.0 / (rank + 1) ** s for rank in range(n_keys)))
        by_rank = list(range(n_keys))
        rng.shuffle(by_rank)
        total = cumulative[-1]
        self.sizes = [rng.randint(500, 1500) for _ in range(n_keys)]
        self.keys = [by_rank[bisect.bisect_left(cumulative, rng.random() * total)] for _ in range(n_refs)]
        self.hashes = [stable_hash(f"key-{k}") for k in range(n_keys)]
        self.capacities = [int(share * sum(self.sizes)) for share in CAPACITY_SHARES]
        self.exact = [self.lru_hit_ratio(c) for c in self.capacities]

    def lru_hit_ratio(self, capacity: int) -> float:
        policy = LruPolicy(capacity)
        hits = 0
        sizes = self.sizes
        for key in self.keys:
            policy.record_access(key)
            if key in policy:
                hits += 1
            else:
                policy.admit(key, sizes[key])
        return hits / len(self.keys)

    def estimate(self, curve: HitCurve) -> list[float]:
        hashes, sizes = self.hashes, self.sizes
        for key in self.keys:
            curve.record(hashes[key], sizes[key])
        return curve.curve(self.capacities)


@pytest.fixture(scope="module")
def trace_50k() -> Trace:
    return Trace(50_000, 200_000, 1.0, seed=11)


@pytest.fixture(scope="module")
def trace_200k() -> Trace:
    return Trace(200_000, 500_000, 1.0, seed=12)


def errors(estimate: list[float], exact: list[float]) -> list[float]:
    return [round(e - x, 4) for e, x in zip(estimate, exact, strict=True)]


def feed(curve: HitCurve, refs: list[tuple[int, int]]) -> HitCurve:
    for key_hash, size in refs:
        curve.record(key_hash, size)
    return curve


def every_key(**kwargs: int) -> HitCurve:
    """No sampling: every key's distance is exact."""
    return HitCurve(sample_rate=1.0, max_samples=kwargs.pop("max_samples", 1 << 20), **kwargs)


# --- exact distances (rate 1) -------------------------------------------------------------------------

def test_no_references_no_curve():
    curve = HitCurve()
    assert curve.references == 0
    assert curve.curve([0, 1 << 20]) == [0.0, 0.0]


def test_distance_counts_bytes_referenced_since_plus_own_size():
    curve = feed(every_key(), [(1, 100), (2, 100), (1, 100)])  # A B A: A needs 200 bytes to hit
    assert curve.references == 3
    third = pytest.approx(1 / 3)
    assert curve.curve([0, 150, 195, 230, 1000]) == [0.0, 0.0, 0.0, third, third]


def test_repeated_keys_are_counted_once():
    # A B B B A: the B's in between count once, so A hits at 2 × 100 bytes
    curve = feed(every_key(), [(1, 100), (2, 100), (2, 100), (2, 100), (1, 100)])
    assert curve.curve([150, 250]) == [pytest.approx(2 / 5), pytest.approx(3 / 5)]


def test_own_size_is_its_size_now():
    curve = feed(every_key(), [(1, 100), (2, 100), (1, 5000)])
    assert curve.curve([1000, 6000]) == [0.0, pytest.approx(1 / 3)]


@pytest.mark.parametrize("max_samples", [4, 1000])  # timestamp space of 16 and of 4000 slots
def test_cyclic_trace_through_many_compactions(max_samples):
    refs = [(k, 100) for k in itertools.islice(itertools.cycle((7, 8, 9)), 1000)]
    curve = feed(every_key(max_samples=max_samples), refs)
    assert curve.tracked_keys == 3
    assert curve.curve([250, 320, 10_000]) == [0.0, pytest.approx(997 / 1000), pytest.approx(997 / 1000)]


def test_timestamp_space_grows_when_over_half_live():
    curve = every_key()  # starts with 65536 slots
    for k in range(40_000):
        curve.record(k, 1)
    curve.record(0, 1)  # 39,999 other bytes since, plus its own
    assert curve.curve([35_000, 45_000]) == [0.0, pytest.approx(1 / 40_001)]
    assert curve.tracked_keys == 40_000


def test_rate_one_matches_exact_lru_on_a_random_trace():
    rng = random.Random(5)
    sizes = {k: rng.randint(1, 3000) for k in range(300)}
    keys = [int(rng.paretovariate(0.8)) % 300 for _ in range(20_000)]
    curve = feed(every_key(max_samples=500), [(k, sizes[k]) for k in keys])  # compacts several times
    for capacity in (10_000, 40_000, 100_000, 250_000):
        policy, hits = LruPolicy(capacity), 0
        for key in keys:
            policy.record_access(key)
            if key in policy:
                hits += 1
            else:
                policy.admit(key, sizes[key])
        assert curve.curve([capacity])[0] == pytest.approx(hits / len(keys), abs=0.01), capacity


# --- sampling ------------------------------------------------------------------------------------------

def test_only_hashes_below_the_threshold_are_sampled():
    curve = HitCurve(sample_rate=0.5, modulus=100)
    assert curve.threshold == 50 and curve.rate == 0.5
    feed(curve, [(70, 10), (170, 10), (49, 10), (149, 10), (49, 10)])
    assert curve.references == 3
    assert curve.tracked_keys == 2


def test_sampled_distance_is_scaled_by_one_over_rate():
    # at rate 1/2, one sampled 100-byte key in between stands for 200 bytes
    curve = feed(HitCurve(sample_rate=0.5, modulus=100, adjust=False), [(1, 100), (2, 100), (1, 100)])
    assert curve.curve([250, 320]) == [0.0, pytest.approx(1 / 3)]


def test_adjustment_adds_the_missing_sampled_references_as_hits():
    # 10 references to one sampled key among 100 unsampled ones: 55 expected at rate 1/2, 10 seen
    refs = [(1, 10)] * 10 + [(100 * k + 75, 10) for k in range(100)]
    adjusted = feed(HitCurve(sample_rate=0.5, modulus=100), refs)
    raw = feed(HitCurve(sample_rate=0.5, modulus=100, adjust=False), refs)
    assert raw.curve([100]) == [pytest.approx(9 / 10)]
    assert adjusted.curve([100]) == [pytest.approx((9 + 45) / 55)]


def test_adjustment_never_leaves_zero_to_one():
    refs = [(1, 10)] * 1000 + [(60, 10)] * 10  # 1000 sampled where 505 were expected
    curve = feed(HitCurve(sample_rate=0.5, modulus=100), refs)
    assert curve.curve([5, 100]) == [0.0, pytest.approx((999 - 495) / 505)]  # -495 clipped at 0


def test_fixed_size_lowers_threshold_and_drops_the_largest_hash():
    curve = HitCurve(sample_rate=1.0, max_samples=3, modulus=100)
    feed(curve, [(10, 1), (20, 1), (30, 1)])
    assert (curve.tracked_keys, curve.threshold, curve.references) == (3, 100, 3)
    curve.record(40, 1)  # the newcomer has the largest value: it is the one left out
    assert (curve.tracked_keys, curve.threshold) == (3, 40)
    assert curve.references == round(3 * 40 / 100)
    curve.record(5, 1)  # 30 is now the largest: dropped; 5 is sampled
    assert (curve.tracked_keys, curve.threshold) == (3, 30)
    curve.record(30, 1)  # no longer sampled
    curve.record(130, 1)
    assert curve.tracked_keys == 3


def test_fixed_size_keeps_every_key_with_the_dropped_value_out():
    curve = HitCurve(sample_rate=1.0, max_samples=3, modulus=100)
    feed(curve, [(10, 1), (90, 1), (190, 1)])  # 90 and 190 share value 90
    curve.record(15, 1)
    assert (curve.tracked_keys, curve.threshold) == (2, 90)


def test_decay_halves_references_and_keeps_the_curve():
    refs = [(k % 7, 100) for k in range(1000)]
    curve = feed(every_key(), refs)
    before = curve.curve([500, 800])
    curve.decay()
    assert curve.references == 500
    assert curve.curve([500, 800]) == pytest.approx(before)


def test_decay_lets_the_curve_follow_a_new_workload():
    small_loop = [(k % 10, 100) for k in range(5000)]  # hits at 1 kB
    big_loop = [(k % 1000, 100) for k in range(5000)]  # needs 100 kB
    curve = feed(every_key(), small_loop)
    assert curve.curve([2000])[0] > 0.95
    for start in range(0, len(big_loop), 1000):
        curve.decay()
        feed(curve, big_loop[start : start + 1000])
    assert curve.curve([2000])[0] < 0.1
    assert curve.curve([200_000])[0] > 0.6


@pytest.mark.parametrize(
    "kwargs",
    [{"sample_rate": 0.0}, {"sample_rate": 1.5}, {"max_samples": 0}, {"modulus": 0}],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        HitCurve(**kwargs)


# --- accuracy against an exact LRU simulation -----------------------------------------------------------

def test_rate_10_percent_within_3_points_on_50k_keys(trace_50k):
    estimate = trace_50k.estimate(HitCurve(sample_rate=0.1))
    errs = errors(estimate, trace_50k.exact)
    print(f"\n50k keys, 200k refs, rate 0.1: exact {trace_50k.exact}\n  errors {errs}")
    assert max(map(abs, errs)) <= 0.03


def test_rate_10_percent_within_3_points_on_200k_keys_with_the_sample_full(trace_200k):
    curve = HitCurve(sample_rate=0.1)
    estimate = trace_200k.estimate(curve)
    errs = errors(estimate, trace_200k.exact)
    print(f"\n200k keys, 500k refs, rate 0.1 → {curve.rate:.4f}: exact {trace_200k.exact}\n  errors {errs}")
    assert curve.tracked_keys <= 8192 and curve.rate < 0.1  # fixed size took over
    assert max(map(abs, errs)) <= 0.03


def test_rate_1_percent_within_5_points_on_200k_keys(trace_200k):
    curve = HitCurve(sample_rate=0.01)
    estimate = trace_200k.estimate(curve)
    errs = errors(estimate, trace_200k.exact)
    print(f"\n200k keys, 500k refs, rate 0.01: {curve.tracked_keys} keys sampled\n  errors {errs}")
    assert max(map(abs, errs)) <= 0.05


# --- choose_capacity ------------------------------------------------------------------------------------

CAPS = [1 << 20, 2 << 20, 4 << 20, 8 << 20, 16 << 20]


@pytest.mark.parametrize(
    ("ratios", "min_bytes", "max_bytes", "tolerance", "expected"),
    [
        pytest.param([0.2, 0.5, 0.7, 0.705, 0.71], 0, 1 << 30, 0.01, 4 << 20, id="knee-within-tolerance"),
        pytest.param([0.2, 0.5, 0.7, 0.705, 0.71], 0, 1 << 30, 0.0, 16 << 20, id="zero-tolerance-best"),
        pytest.param([0.2, 0.5, 0.7, 0.705, 0.71], 0, 1 << 30, 1.0, 1 << 20, id="any-is-good-enough"),
        pytest.param([0.2, 0.5, 0.7, 0.705, 0.71], 3 << 20, 1 << 30, 0.01, 4 << 20, id="min-skips-small"),
        pytest.param([0.2, 0.5, 0.7, 0.705, 0.71], 0, 2 << 20, 0.01, 2 << 20, id="max-caps-the-best"),
        pytest.param([0.2, 0.5, 0.7, 0.705, 0.71], 8 << 20, 8 << 20, 0.01, 8 << 20, id="single-point-range"),
        pytest.param([0.3, 0.3, 0.3, 0.3, 0.3], 0, 1 << 30, 0.0, 1 << 20, id="flat-takes-smallest"),
        pytest.param([0.9, 0.5, 0.5, 0.5, 0.5], 0, 1 << 30, 0.01, 1 << 20, id="non-monotone-best-first"),
        pytest.param([0.1, 0.5, math.nan, 0.6, 0.6], 0, 1 << 30, 0.01, 8 << 20, id="nan-ignored"),
        pytest.param([0.2, 0.5, 0.7, 0.705, 0.71], 100 << 20, 200 << 20, 0.01, 100 << 20,
                     id="nothing-in-range-gives-min"),
    ],
)
def test_choose_capacity(ratios, min_bytes, max_bytes, tolerance, expected):
    got = choose_capacity(CAPS, ratios, min_bytes=min_bytes, max_bytes=max_bytes, tolerance=tolerance)
    assert got == expected


def test_choose_capacity_unsorted_input():
    assert choose_capacity([8, 1, 4, 2], [0.8, 0.1, 0.79, 0.5], min_bytes=0, max_bytes=10) == 4


def test_choose_capacity_default_tolerance_is_one_point():
    assert choose_capacity([1, 2], [0.50, 0.509], min_bytes=0, max_bytes=2) == 1
    assert choose_capacity([1, 2], [0.50, 0.511], min_bytes=0, max_bytes=2) == 2


@pytest.mark.parametrize(
    ("caps", "ratios", "lo", "hi"),
    [([1, 2], [0.5], 0, 10), ([1], [0.5], 10, 0)],
)
def test_choose_capacity_bad_arguments(caps, ratios, lo, hi):
    with pytest.raises(ValueError):
        choose_capacity(caps, ratios, min_bytes=lo, max_bytes=hi)


def test_choose_capacity_on_an_estimated_curve(trace_50k):
    curve = HitCurve(sample_rate=0.1)
    trace_50k.estimate(curve)
    capacities = [int(trace_50k.capacities[-1] * share / 0.4) for share in (0.05, 0.1, 0.2, 0.4, 0.8)]
    ratios = curve.curve(capacities)
    assert ratios == sorted(ratios)  # an LRU curve never falls
    chosen = choose_capacity(capacities, ratios, min_bytes=0, max_bytes=capacities[-1], tolerance=0.05)
    assert chosen in capacities[1:]
