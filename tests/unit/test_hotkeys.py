"""policies/hotkeys.py: HotKeys (Space-Saving heavy hitters)."""

from __future__ import annotations

import bisect
import itertools
import random
from collections import Counter

import pytest

from steadyserve.policies.hotkeys import HotKeys


def zipf_trace(n_keys: int, n_requests: int, s: float, seed: int) -> list[str]:
    rng = random.Random(seed)
    cumulative = list(itertools.accumulate(1.0 / (rank + 1) ** s for rank in range(n_keys)))
    by_rank = [f"k{i}" for i in range(n_keys)]
    rng.shuffle(by_rank)
    total = cumulative[-1]
    return [by_rank[bisect.bisect_left(cumulative, rng.random() * total)] for _ in range(n_requests)]


def check_bounds(hot: HotKeys, truth: Counter[str]) -> None:
    for key, count, error in hot.top(hot.k):
        assert count - error <= truth[key] <= count, (key, count, error, truth[key])


# --- exact while there is room ----------------------------------------------------------------------

def test_counts_are_exact_while_keys_fit():
    hot = HotKeys(k=4)
    for key in "abacabad":
        hot.offer(key)
    assert hot.top(4) == [("a", 4, 0), ("b", 2, 0), ("c", 1, 0), ("d", 1, 0)] or hot.top(4) == [
        ("a", 4, 0), ("b", 2, 0), ("d", 1, 0), ("c", 1, 0)
    ]
    assert len(hot) == 4 and hot.total == 8


def test_weights_add():
    hot = HotKeys(k=3)
    hot.offer("a", 5)
    hot.offer("b", 2)
    hot.offer("a", 3)
    hot.offer("c", 0)
    assert hot.top(3)[:2] == [("a", 8, 0), ("b", 2, 0)]
    assert hot.estimate("a") == (8, 0)
    assert hot.estimate("zzz") == (0, 0)
    assert hot.total == 10


@pytest.mark.parametrize(("n", "length"), [(0, 0), (-3, 0), (1, 1), (2, 2), (10, 2)])
def test_top_n_is_clipped(n, length):
    hot = HotKeys(k=5)
    hot.offer("x", 3)
    hot.offer("y", 1)
    assert len(hot.top(n)) == length


# --- replacement ------------------------------------------------------------------------------------

def test_new_key_replaces_the_minimum_and_inherits_its_count_as_error():
    hot = HotKeys(k=2)
    hot.offer("a", 5)
    hot.offer("b", 2)
    hot.offer("c", 1)  # evicts b (2): c starts at 2 + 1, overcounted by at most 2
    assert "b" not in hot
    assert hot.top(2) == [("a", 5, 0), ("c", 3, 2)]


def test_minimum_is_found_after_counts_grew():
    hot = HotKeys(k=3)
    for key in "abc":
        hot.offer(key)  # all at 1 in the heap
    hot.offer("a", 10)
    hot.offer("b", 10)  # the heap still says a=1, b=1; c is the real minimum
    hot.offer("d")
    assert "c" not in hot and "a" in hot and "b" in hot
    assert hot.estimate("d") == (2, 1)


def test_counts_sum_to_the_total_weight_and_bound_the_truth():
    rng = random.Random(9)
    hot = HotKeys(k=16)
    truth: Counter[str] = Counter()
    for _ in range(5000):
        key = f"k{int(rng.paretovariate(1.0)) % 200}"
        weight = rng.choice((1, 1, 1, 2, 5))
        hot.offer(key, weight)
        truth[key] += weight
    assert sum(count for _, count, _ in hot.top(16)) == hot.total == sum(truth.values())
    check_bounds(hot, truth)
    assert len(hot) == 16


@pytest.mark.parametrize(
    ("s", "k"),
    [
        pytest.param(1.1, 64, id="zipf-1.1-k64"),
        # at s = 1.0, 55% of the weight is in the tail beyond the top 64: the table's floor sits
        # near 1300 while the 10th key has about 950, so k = 64 cannot hold it; 128 can
        pytest.param(1.0, 128, id="zipf-1.0-k128"),
    ],
)
def test_zipf_true_top_10_found(s, k):
    trace = zipf_trace(20_000, 100_000, s, seed=4)
    truth = Counter(trace)
    hot = HotKeys(k=k)
    for key in trace:
        hot.offer(key)
    true_top = {key for key, _ in truth.most_common(10)}
    reported = hot.top(10)
    assert true_top <= {key for key, _, _ in reported}
    assert [count for _, count, _ in reported] == sorted((c for _, c, _ in reported), reverse=True)
    check_bounds(hot, truth)
    # Space-Saving's guarantee: every key heavier than total / k is tracked
    assert all(key in hot for key, count in truth.items() if count > len(trace) / k)


# --- halving ------------------------------------------------------------------------------------------

def test_halve_halves_counts_and_errors_and_drops_zeros():
    hot = HotKeys(k=3)
    hot.offer("a", 9)
    hot.offer("b", 1)
    hot.offer("c", 4)
    hot.offer("d", 3)  # replaces b (1): d = 4, error 1
    hot.halve()
    assert hot.top(3) == [("a", 4, 0), ("c", 2, 0), ("d", 2, 0)] or hot.top(3) == [
        ("a", 4, 0), ("d", 2, 0), ("c", 2, 0)
    ]
    assert hot.total == 8
    hot.halve()
    hot.halve()
    assert hot.top(3) == [("a", 1, 0)]
    assert len(hot) == 1


def test_halve_lets_a_new_hot_set_take_over():
    hot = HotKeys(k=8)
    for _ in range(50):
        for key in "abcdefgh":
            hot.offer(key)
    for _ in range(6):
        hot.halve()
        for _ in range(10):
            for key in "stuvwxyz":
                hot.offer(key)
    assert {key for key, _, _ in hot.top(8)} == set("stuvwxyz")


def test_heap_stays_consistent_after_halving():
    rng = random.Random(2)
    hot = HotKeys(k=8)
    for round_ in range(20):
        for _ in range(300):
            hot.offer(rng.randrange(40 + round_), rng.randint(1, 3))
        hot.halve()
        assert len(hot) <= 8
    hot.offer("fresh", 1)
    assert "fresh" in hot  # replaced the true minimum, whatever the heap held before


def test_bad_arguments():
    with pytest.raises(ValueError):
        HotKeys(k=0)
    with pytest.raises(ValueError):
        HotKeys().offer("a", -1)
