"""policies/eviction.py: LruPolicy, TinyLfuPolicy (W-TinyLFU), CountMinSketch, make_policy."""

from __future__ import annotations

import bisect
import itertools
import random

import pytest

from steadyserve.errors import ConfigError
from steadyserve.policies.eviction import (
    COUNTER_MAX,
    POLICIES,
    CountMinSketch,
    EvictionPolicy,
    LruPolicy,
    TinyLfuPolicy,
    key_hash,
    make_policy,
    mix64,
)


def zipf_trace(n_keys: int, n_requests: int, s: float, seed: int) -> list[int]:
    """Keys 0..n_keys-1, popularity ∝ 1/rank^s, ranks shuffled so key order says nothing."""
    rng = random.Random(seed)
    cumulative = list(itertools.accumulate(1.0 / (rank + 1) ** s for rank in range(n_keys)))
    by_rank = list(range(n_keys))
    rng.shuffle(by_rank)
    total = cumulative[-1]
    return [by_rank[bisect.bisect_left(cumulative, rng.random() * total)] for _ in range(n_requests)]


def hit_ratio(policy: EvictionPolicy, trace: list[int], size: int) -> float:
    """Drive `policy` as a cache does: every lookup recorded, every miss admitted."""
    hits = 0
    for key in trace:
        policy.record_access(key)
        if key in policy:
            hits += 1
        else:
            policy.admit(key, size)
    return hits / len(trace)


def tiny(capacity: int = 100, **kwargs: float) -> TinyLfuPolicy:
    """Window 10% (one 10-byte entry of 100), main 90, protected 72; a sketch that never resets here."""
    return TinyLfuPolicy(capacity, expected_entries=1000, window_share=0.1, **kwargs)


def bump(policy: TinyLfuPolicy, key: str, times: int) -> None:
    """Raise `key`'s sketch frequency without touching the LRU lists."""
    for _ in range(times):
        policy.sketch.increment(key)


def filled(capacity: int = 100) -> TinyLfuPolicy:
    """m0..m8 (10 B each) in probation, oldest first; the window holds w; 100 of 100 bytes used."""
    policy = tiny(capacity)
    for i in range(9):
        assert policy.admit(f"m{i}", 10) == []
    assert policy.admit("w", 10) == []
    assert policy.segments() == {
        "window": ["w"],
        "probation": [f"m{i}" for i in range(9)],
        "protected": [],
    }
    assert policy.used == 100
    return policy


# --- make_policy ------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "cls"), [("tinylfu", TinyLfuPolicy), ("lru", LruPolicy)])
def test_make_policy_known_names(name, cls):
    policy = make_policy(name, 4096)
    assert type(policy) is cls
    assert policy.capacity == 4096
    assert policy.used == 0
    assert len(policy) == 0


@pytest.mark.parametrize("name", ["", "LRU", "lfu", "w-tinylfu"])
def test_make_policy_unknown_name_lists_known_ones(name):
    with pytest.raises(ConfigError) as info:
        make_policy(name, 1024)
    message = str(info.value)
    assert repr(name) in message
    assert "lru" in message and "tinylfu" in message


def test_policy_registry_names():
    assert sorted(POLICIES) == ["lru", "tinylfu"]


@pytest.mark.parametrize("cls", [LruPolicy, TinyLfuPolicy])
def test_negative_capacity_and_size_are_errors(cls):
    with pytest.raises(ValueError, match="capacity"):
        cls(-1)
    with pytest.raises(ValueError, match="size"):
        cls(10).admit("k", -1)


# --- both policies: the contract the cache relies on ----------------------------------------------

@pytest.mark.parametrize("cls", [LruPolicy, TinyLfuPolicy])
def test_oversize_item_is_rejected_and_not_stored(cls):
    policy = cls(100)
    assert policy.admit("small", 40) == []
    assert policy.admit("huge", 101) == ["huge"]
    assert "huge" not in policy
    assert policy.rejections == 1
    assert "small" in policy and policy.used == 40


@pytest.mark.parametrize("cls", [LruPolicy, TinyLfuPolicy])
def test_item_of_exactly_capacity_fits(cls):
    policy = cls(100)
    assert policy.admit("all", 100) == []
    assert "all" in policy and policy.used == 100


@pytest.mark.parametrize("cls", [LruPolicy, TinyLfuPolicy])
def test_growing_a_key_past_capacity_drops_it(cls):
    policy = cls(100)
    policy.admit("k", 30)
    assert policy.admit("k", 150) == ["k"]
    assert "k" not in policy
    assert policy.used == 0 and len(policy) == 0


@pytest.mark.parametrize("cls", [LruPolicy, TinyLfuPolicy])
def test_readmit_resizes_in_place(cls):
    policy = cls(1000)
    policy.admit("a", 100)
    policy.admit("b", 200)
    assert policy.admit("a", 350) == []
    assert policy.used == 550 and len(policy) == 2
    assert policy.admit("a", 50) == []
    assert policy.used == 250


@pytest.mark.parametrize("cls", [LruPolicy, TinyLfuPolicy])
def test_remove(cls):
    policy = cls(1000)
    policy.admit("a", 100)
    policy.admit("b", 200)
    assert policy.remove("a") is True
    assert policy.remove("a") is False
    assert policy.remove("never") is False
    assert "a" not in policy and "b" in policy
    assert policy.used == 200 and len(policy) == 1


@pytest.mark.parametrize("cls", [LruPolicy, TinyLfuPolicy])
def test_resize_shrinks_to_fit_and_reports_evictions(cls):
    policy = cls(1000)
    for i in range(10):
        policy.admit(i, 100)
    assert policy.used == 1000
    evicted = policy.resize(350)
    assert policy.capacity == 350
    assert policy.used <= 350
    assert len(evicted) == 7 and len(policy) == 3
    assert not any(key in policy for key in evicted)
    assert policy.resize(10_000) == []
    assert policy.used == 300


@pytest.mark.parametrize("cls", [LruPolicy, TinyLfuPolicy])
def test_zero_capacity_stores_nothing(cls):
    policy = cls(0)
    assert policy.admit("a", 1) == ["a"]
    assert policy.admit("empty", 0) == []  # a zero-byte value costs nothing
    assert policy.used == 0


@pytest.mark.parametrize("cls", [LruPolicy, TinyLfuPolicy])
def test_byte_accounting_with_variable_sizes_matches_a_shadow_cache(cls):
    """Apply what every call returns to a shadow dict: it must always agree with the policy."""
    rng = random.Random(7)
    capacity = 50_000
    policy = cls(capacity)
    shadow: dict[int, int] = {}
    for _ in range(20_000):
        key = int(rng.paretovariate(1.2)) % 500
        roll = rng.random()
        if roll < 0.75:
            policy.record_access(key)
            if key not in policy:
                size = rng.choice((0, 10, 100, 1000, 5000, 20_000, 60_000))
                evicted = policy.admit(key, size)
                shadow[key] = size
                for gone in evicted:
                    del shadow[gone]
        elif roll < 0.85:
            size = rng.randint(1, 8000)
            evicted = policy.admit(key, size)
            shadow[key] = size
            for gone in evicted:
                del shadow[gone]
        elif roll < 0.95:
            assert policy.remove(key) == (key in shadow)
            shadow.pop(key, None)
        else:
            capacity = rng.randint(20_000, 80_000)
            for gone in policy.resize(capacity):
                del shadow[gone]
        assert policy.used == sum(shadow.values()) <= capacity
        assert len(policy) == len(shadow)
    assert all(key in policy for key in shadow)
    assert policy.evictions > 0 and policy.rejections > 0


# --- LruPolicy ------------------------------------------------------------------------------------

def test_lru_evicts_least_recently_used_by_bytes():
    policy = LruPolicy(300)
    for key in "abc":
        policy.admit(key, 100)
    policy.record_access("a")  # order now b, c, a
    assert policy.admit("d", 150) == ["b", "c"]  # 150 bytes need two 100-byte victims
    assert policy.keys() == ["a", "d"]
    assert policy.used == 250
    assert policy.evictions == 2


def test_lru_record_access_of_absent_key_is_a_no_op():
    policy = LruPolicy(100)
    policy.admit("a", 10)
    policy.record_access("zzz")
    assert policy.keys() == ["a"] and policy.used == 10


# --- TinyLfuPolicy: the window and the admission contest -------------------------------------------

def test_new_keys_enter_the_window_and_move_to_probation_while_there_is_room():
    policy = tiny()
    policy.admit("a", 10)
    assert policy.segments()["window"] == ["a"]
    policy.admit("b", 10)
    assert policy.segments() == {"window": ["b"], "probation": ["a"], "protected": []}
    assert policy.used == 20


@pytest.mark.parametrize(
    ("candidate_freq", "victim_freq", "admitted"),
    [
        pytest.param(1, 0, True, id="warmer-admitted"),
        pytest.param(4, 3, True, id="warmer-by-one-admitted"),
        pytest.param(0, 0, False, id="tie-at-zero-rejected"),
        pytest.param(3, 3, False, id="tie-rejected"),
        pytest.param(2, 3, False, id="colder-rejected"),
        pytest.param(20, 20, False, id="both-saturated-tie-rejected"),
    ],
)
def test_window_candidate_must_beat_mains_victim(candidate_freq, victim_freq, admitted):
    policy = filled()
    bump(policy, "w", candidate_freq)
    bump(policy, "m0", victim_freq)
    assert policy.frequency("w") == min(candidate_freq, COUNTER_MAX)
    assert policy.frequency("m0") == min(victim_freq, COUNTER_MAX)
    evicted = policy.admit("new", 10)  # pushes w out of the window: w against m0
    if admitted:
        assert evicted == ["m0"]
        assert "w" in policy and "m0" not in policy
        assert policy.segments()["probation"][-1] == "w"
        assert (policy.evictions, policy.rejections) == (1, 0)
    else:
        assert evicted == ["w"]
        assert "w" not in policy and "m0" in policy
        assert (policy.evictions, policy.rejections) == (0, 1)
    assert "new" in policy
    assert policy.used == 100


def test_cold_candidate_rejected_when_main_is_warm():
    """Scan resistance in miniature: main's keys were used, the window's one-offs were not."""
    policy = filled()
    for i in range(9):
        bump(policy, f"m{i}", 3)
    for i in range(5):
        policy.record_access(f"scan{i}")
        policy.admit(f"scan{i}", 10)
    assert all(f"m{i}" in policy for i in range(9))
    assert policy.rejections == 5  # w, scan0..scan3 lost their contests; scan4 sits in the window
    assert policy.evictions == 0


@pytest.mark.parametrize(
    ("freqs", "big_freq", "evicted"),
    [
        pytest.param((1, 2), 3, ["m0", "m1"], id="beats-both-victims"),
        pytest.param((1, 5), 3, ["big"], id="loses-to-second-victim-nothing-evicted"),
        pytest.param((5, 1), 3, ["big"], id="loses-to-first-victim"),
        pytest.param((3, 0), 3, ["big"], id="tie-with-first-victim"),
        pytest.param((0, 0), 1, ["m0", "m1"], id="barely-warmer"),
    ],
)
def test_large_candidate_compared_with_each_victim_it_needs(freqs, big_freq, evicted):
    policy = tiny()
    for i in range(9):
        policy.admit(f"m{i}", 10)  # window [m8], probation m0..m7
    bump(policy, "m0", freqs[0])
    bump(policy, "m1", freqs[1])
    bump(policy, "big", big_freq)
    # big (30 B) overflows the window with m8: m8 fits in main as is, big needs 20 bytes freed
    assert policy.admit("big", 30) == evicted
    assert policy.used <= 100
    if evicted == ["big"]:
        assert "m0" in policy and "m1" in policy and policy.used == 90
    else:
        assert policy.segments()["probation"][-1] == "big" and policy.used == 100


def test_candidate_that_cannot_fit_beside_the_window_is_rejected():
    policy = TinyLfuPolicy(100, expected_entries=100, window_share=0.6)  # window target 60 bytes
    assert policy.admit("b", 55) == []
    bump(policy, "b", 10)
    # c pushes b out of the window; c's 50 bytes stay there, so b's 55 cannot fit even in an empty main
    assert policy.admit("c", 50) == ["b"]
    assert policy.rejections == 1
    assert policy.segments() == {"window": ["c"], "probation": [], "protected": []}


# --- TinyLfuPolicy: segmented main ------------------------------------------------------------------

def test_hit_in_probation_promotes_to_protected():
    policy = filled()
    policy.record_access("m3")
    segments = policy.segments()
    assert segments["protected"] == ["m3"]
    assert "m3" not in segments["probation"]
    policy.record_access("m5")
    policy.record_access("m3")
    assert policy.segments()["protected"] == ["m5", "m3"]


def test_protected_overflow_demotes_its_coldest_to_probation():
    policy = filled()  # protected holds int(90 * 0.8) = 72 bytes: seven 10-byte keys
    for i in range(8):
        policy.record_access(f"m{i}")
    segments = policy.segments()
    assert segments["protected"] == [f"m{i}" for i in range(1, 8)]
    assert segments["probation"] == ["m8", "m0"]  # m0 demoted to probation's warm end
    assert policy.used == 100


def test_resize_demotes_protected_then_evicts_coldest_first():
    policy = filled()
    for i in range(9):
        policy.record_access(f"m{i}")
    assert policy.segments()["protected"] == [f"m{i}" for i in range(2, 9)]
    assert policy.segments()["probation"] == ["m0", "m1"]
    # window target 5: w (never used) loses to m0; protected target int(45 × 0.8) = 36 pushes
    # m2..m5 to probation; then probation's coldest go until 50 bytes remain
    assert policy.resize(50) == ["w", "m0", "m1", "m2", "m3"]
    assert policy.segments() == {
        "window": [],
        "probation": ["m4", "m5"],
        "protected": ["m6", "m7", "m8"],
    }
    assert policy.used == 50


def test_window_hit_moves_within_the_window():
    policy = TinyLfuPolicy(1000, expected_entries=100, window_share=0.3)
    for key in "abc":
        policy.admit(key, 100)
    policy.record_access("a")
    assert policy.segments()["window"] == ["b", "c", "a"]


def test_readmit_of_protected_key_keeps_it_protected():
    policy = filled()
    policy.record_access("m2")
    assert policy.admit("m2", 20) == ["m0"]  # 10 more bytes: main's coldest gives way
    assert policy.segments()["protected"] == ["m2"]
    assert policy.used == 100


# --- TinyLfuPolicy vs LRU on a skewed trace --------------------------------------------------------

def test_tinylfu_beats_lru_on_zipf():
    """Zipf(1.0), 100k requests over 20k keys, room for 5% of them: frequency beats recency."""
    size = 1000
    capacity = 20_000 // 20 * size
    trace = zipf_trace(20_000, 100_000, 1.0, seed=42)
    lru = hit_ratio(LruPolicy(capacity), trace, size)
    tinylfu = hit_ratio(TinyLfuPolicy(capacity, avg_entry_bytes=size), trace, size)
    print(f"\nZipf(1.0) 100k requests, 20k keys, capacity 1000 entries: LRU {lru:.4f}, TinyLFU {tinylfu:.4f}")
    assert tinylfu >= lru + 0.05


def test_tinylfu_survives_a_scan():
    """A one-pass scan of new keys between hot-set rounds: LRU loses the hot set, TinyLFU not."""
    size, capacity = 100, 100 * 100
    hot = list(range(80))
    trace: list[int] = []
    scan_key = 1_000
    for _ in range(30):
        trace.extend(hot)
        trace.extend(range(scan_key, scan_key + 200))
        scan_key += 200
    lru = hit_ratio(LruPolicy(capacity), trace, size)
    tinylfu = hit_ratio(TinyLfuPolicy(capacity, avg_entry_bytes=size), trace, size)
    assert lru == 0.0  # every scan flushes the 80 hot keys out of 100 slots
    assert tinylfu > 0.25  # hot keys are 80 of every 280 requests: most of them hit


# --- CountMinSketch -----------------------------------------------------------------------------

def test_sketch_estimates_never_undercount():
    sketch = CountMinSketch(256)
    rng = random.Random(3)
    truth: dict[int, int] = {}
    for _ in range(1500):  # below the 2560-increment reset
        key = rng.randrange(400)
        sketch.increment(key)
        truth[key] = truth.get(key, 0) + 1
    assert sketch.resets == 0
    for key, count in truth.items():
        assert min(count, COUNTER_MAX) <= sketch.estimate(key) <= COUNTER_MAX
    exact = sum(sketch.estimate(key) == min(count, COUNTER_MAX) for key, count in truth.items())
    assert exact / len(truth) > 0.9  # 4 rows of 1024 counters: collisions are rare


def test_sketch_counters_saturate_at_15():
    sketch = CountMinSketch(64)
    for _ in range(40):
        sketch.increment("hot")
    assert sketch.estimate("hot") == COUNTER_MAX == 15
    assert sketch.additions == 15  # increments that changed nothing are not counted


def test_sketch_halves_on_reset():
    sketch = CountMinSketch(1024)
    for _ in range(10):
        sketch.increment("a")
    for _ in range(3):
        sketch.increment("b")
    assert (sketch.estimate("a"), sketch.estimate("b"), sketch.additions) == (10, 3, 13)
    sketch.reset()
    assert (sketch.estimate("a"), sketch.estimate("b")) == (5, 1)
    assert sketch.additions == (13 - 4 // 4) // 2  # b's four odd counters lost a half each
    assert sketch.resets == 1


def test_sketch_resets_itself_after_sample_size_additions():
    sketch = CountMinSketch(16)  # sample = 10 × 16
    assert sketch.sample_size == 160
    for _ in range(8):
        sketch.increment("old")
    for key in range(151):
        sketch.increment(key)
    assert sketch.resets == 0
    sketch.increment(10_000)
    assert sketch.resets == 1
    assert sketch.estimate("old") in (4, 5)  # 8 halved, plus at most one colliding increment
    assert sketch.additions < 80


def test_sketch_sizing():
    assert CountMinSketch(1000).width == 4 * 1024
    assert CountMinSketch(1024).width == 4 * 1024
    assert CountMinSketch(1).width == 4
    assert CountMinSketch(100, sample_factor=3).sample_size == 300
    with pytest.raises(ValueError):
        CountMinSketch(0)


def test_tinylfu_sketch_sized_from_capacity_or_told():
    assert TinyLfuPolicy(1 << 20, avg_entry_bytes=1024).sketch.sample_size == 10 * 1024
    assert TinyLfuPolicy(1 << 20, expected_entries=50).sketch.sample_size == 500
    assert TinyLfuPolicy(100).sketch.sample_size == 160  # never below 16 entries


# --- key_hash: stable across processes ----------------------------------------------------------------

@pytest.mark.parametrize(
    ("key", "expected"),
    [
        pytest.param("hello", 0xA7B6EDA801E5347D, id="str-is-blake2b-of-utf8"),
        pytest.param(b"hello", 0xA7B6EDA801E5347D, id="bytes-is-blake2b"),
        pytest.param(("a", 1), 0x9A7F386FD1AFB2AC, id="tuple-is-blake2b-of-repr"),
        pytest.param(0, 0xE220A8397B1DCDAF, id="int-is-splitmix64"),  # splitmix64's first output
    ],
)
def test_key_hash_known_values(key, expected):
    assert key_hash(key) == expected


def test_key_hash_spreads_consecutive_ints():
    hashes = [key_hash(i) for i in range(1000)]
    assert len(set(hashes)) == 1000
    assert len({h & 1023 for h in hashes}) > 550  # ~632 distinct buckets expected at random
    assert key_hash(True) == mix64(1)
    assert all(0 <= h < 1 << 64 for h in hashes)
    assert key_hash(-1) == mix64(-1) and 0 <= key_hash(-1) < 1 << 64
