"""policies/balancing.py: RoundRobin, PowerOfTwo, PeakEwma, LeastSquares, update_peak_ewma,
make_balancer."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import pytest

from steadyserve.errors import ConfigError
from steadyserve.policies.balancing import (
    BALANCERS,
    LS_MIN_SAMPLES,
    Candidate,
    LeastSquares,
    PeakEwma,
    PowerOfTwo,
    RoundRobin,
    make_balancer,
    peak_ewma_cost,
    update_peak_ewma,
)

ALMOST_ONE = 0.9999999999999999


def seq(*values: float):
    """A `rand` that returns `values` in order and fails loudly if asked for more."""
    it = iter(values)

    def rand() -> float:
        try:
            return next(it)
        except StopIteration:
            raise AssertionError("balancer drew more random numbers than expected") from None

    return rand


def no_rand() -> float:
    raise AssertionError("this balancer must not draw random numbers")


class Probe:
    """A Load that records which indices the balancer looked at."""

    def __init__(self, index: int, seen: list[int], outstanding: int = 0, ewma: float = 0.0):
        self.index, self.seen, self._outstanding, self._ewma = index, seen, outstanding, ewma

    @property
    def outstanding(self) -> int:
        self.seen.append(self.index)
        return self._outstanding

    @property
    def ewma_latency_s(self) -> float:
        self.seen.append(self.index)
        return self._ewma


def probes(n: int) -> tuple[list[Probe], list[int]]:
    seen: list[int] = []
    return [Probe(i, seen) for i in range(n)], seen


def cands(*outstanding: int) -> list[Candidate]:
    return [Candidate(o) for o in outstanding]


# --- RoundRobin -------------------------------------------------------------------------------

def test_round_robin_rotates_and_wraps():
    rr = RoundRobin()
    c = cands(0, 0, 0)
    assert [rr.pick(c, no_rand) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_round_robin_ignores_load():
    rr = RoundRobin()
    c = cands(100, 0)
    assert [rr.pick(c, no_rand) for _ in range(4)] == [0, 1, 0, 1]


def test_round_robin_survives_a_shrinking_list():
    rr = RoundRobin()
    assert [rr.pick(cands(0, 0, 0), no_rand) for _ in range(3)] == [0, 1, 2]
    picks = [rr.pick(cands(0, 0), no_rand) for _ in range(3)]
    assert all(0 <= p < 2 for p in picks)
    assert picks == [1, 0, 1]


def test_round_robin_instances_are_independent():
    a, b = RoundRobin(), RoundRobin()
    c = cands(0, 0, 0)
    a.pick(c, no_rand)
    a.pick(c, no_rand)
    assert b.pick(c, no_rand) == 0


# --- PowerOfTwo -------------------------------------------------------------------------------

@pytest.mark.parametrize("balancer", [PowerOfTwo(), PeakEwma()], ids=["power_of_two", "peak_ewma"])
def test_single_candidate_is_index_zero_without_randomness(balancer):
    assert balancer.pick(cands(7), no_rand) == 0


@pytest.mark.parametrize(
    ("outstanding", "rands", "expected"),
    [
        # n=3: a = int(r1*3); b = int(r2*2), shifted up by one when b >= a
        pytest.param((0, 5, 10), (0.0, 0.0), 0, id="pair-0-1-picks-0"),
        pytest.param((0, 5, 10), (0.5, 0.0), 0, id="pair-1-0-picks-0"),
        pytest.param((0, 5, 10), (0.9, 0.0), 0, id="pair-2-0-picks-0"),
        pytest.param((0, 5, 10), (0.9, 0.9), 1, id="pair-2-1-picks-1"),
        pytest.param((0, 5, 10), (0.5, 0.9), 1, id="pair-1-2-picks-1"),
        pytest.param((10, 5, 0), (0.0, 0.0), 1, id="reversed-pair-0-1-picks-1"),
        pytest.param((10, 5, 0), (0.0, 0.9), 2, id="reversed-pair-0-2-picks-2"),
        pytest.param((3, 3), (0.9, 0.0), 1, id="tie-keeps-first-sampled-1"),
        pytest.param((3, 3), (0.0, 0.0), 0, id="tie-keeps-first-sampled-0"),
        pytest.param((4, 1), (0.0, 0.0), 1, id="n2-second-less-busy"),
        pytest.param((1, 4), (ALMOST_ONE, ALMOST_ONE), 0, id="n2-rand-near-one"),
    ],
)
def test_power_of_two_picks_less_outstanding_of_sampled_pair(outstanding, rands, expected):
    assert PowerOfTwo().pick(cands(*outstanding), seq(*rands)) == expected


def test_power_of_two_never_picks_the_unsampled_idle_replica():
    # the idle replica 2 is not sampled by (0.0, 0.0) on n=3 -> pair (0, 1)
    assert PowerOfTwo().pick(cands(9, 8, 0), seq(0.0, 0.0)) == 1


GRID = [0.0, 0.1, 0.2, 1 / 3, 0.34, 0.49, 0.5, 0.51, 2 / 3, 0.67, 0.9, 0.99, ALMOST_ONE, 1.0]


@pytest.mark.parametrize("n", [2, 3, 4, 7])
@pytest.mark.parametrize("balancer_cls", [PowerOfTwo, PeakEwma])
def test_sampled_indices_are_distinct_and_in_range(n, balancer_cls):
    for r1, r2 in itertools.product(GRID, GRID):
        cs, seen = probes(n)
        picked = balancer_cls().pick(cs, seq(r1, r2))
        looked_at = set(seen)
        assert len(looked_at) == 2, (n, r1, r2, seen)
        assert looked_at <= set(range(n)), (n, r1, r2, seen)
        assert picked in looked_at


@pytest.mark.parametrize("n", [2, 3, 4])
def test_every_ordered_pair_is_sampled_exactly_once_over_a_uniform_grid(n):
    # midpoints of n × (n-1) equal cells: each ordered pair (a, b), a != b, exactly once
    r1s = [(i + 0.5) / n for i in range(n)]
    r2s = [(j + 0.5) / (n - 1) for j in range(n - 1)]
    pairs = []
    for r1, r2 in itertools.product(r1s, r2s):
        cs, seen = probes(n)
        PowerOfTwo().pick(cs, seq(r1, r2))
        pairs.append(tuple(dict.fromkeys(seen)))  # first-seen order: (b, a) as compared
    assert len(pairs) == n * (n - 1)
    assert {frozenset(p) for p in pairs} == {frozenset(p) for p in itertools.combinations(range(n), 2)}
    assert len(set(pairs)) == n * (n - 1)


def test_power_of_two_seeded_distribution_over_0_5_10():
    # pairs: {0,1} -> 0, {0,2} -> 0, {1,2} -> 1; index 2 loses every pair it is in
    rand = random.Random(0).random
    c = cands(0, 5, 10)
    counts = Counter(PowerOfTwo().pick(c, rand) for _ in range(3000))
    assert counts[2] == 0
    assert counts[0] > counts[1] > 0
    assert 0.6 < counts[0] / 3000 < 0.74  # expected 2/3


# --- PeakEwma ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("candidate", "default", "cost"),
    [
        pytest.param(Candidate(0, 0.1), 0.01, 0.1, id="idle-measured"),
        pytest.param(Candidate(3, 0.02), 0.01, 0.08, id="busy-measured"),
        pytest.param(Candidate(0, 0.0), 0.01, 0.01, id="unmeasured-uses-default"),
        pytest.param(Candidate(4, 0.0), 0.5, 2.5, id="unmeasured-busy-uses-default"),
        pytest.param(Candidate(1, -1.0), 0.2, 0.4, id="negative-latency-uses-default"),
    ],
)
def test_peak_ewma_cost(candidate, default, cost):
    assert peak_ewma_cost(candidate, default) == pytest.approx(cost)


@pytest.mark.parametrize(
    ("pair", "default", "expected"),
    [
        # rands (0.0, 0.0) on n=2 sample a=0, b=1
        pytest.param((Candidate(0, 0.1), Candidate(3, 0.02)), 0.01, 1,
                     id="busier-but-faster-wins"),
        pytest.param((Candidate(0, 0.1), Candidate(0, 0.2)), 0.01, 0, id="idle-faster-wins"),
        pytest.param((Candidate(0, 0.0), Candidate(0, 0.05)), 0.01, 0, id="unmeasured-cheap-default"),
        pytest.param((Candidate(0, 0.0), Candidate(0, 0.05)), 1.0, 1, id="unmeasured-dear-default"),
        pytest.param((Candidate(1, 0.1), Candidate(1, 0.1)), 0.01, 0, id="tie-keeps-first-sampled"),
    ],
)
def test_peak_ewma_picks_lower_cost(pair, default, expected):
    assert PeakEwma(default_latency_s=default).pick(list(pair), seq(0.0, 0.0)) == expected


def test_peak_ewma_default_latency_default_value():
    assert PeakEwma().default_latency_s == 0.01


# --- update_peak_ewma ------------------------------------------------------------------------

E = math.exp(-1)


@pytest.mark.parametrize(
    ("current", "last", "sample", "now", "expected"),
    [
        pytest.param(0.0, 0.0, 0.05, 100.0, 0.05, id="first-sample-taken-as-is"),
        pytest.param(0.01, 99.9, 0.5, 100.0, 0.5, id="slower-sample-jumps-up-at-once"),
        pytest.param(0.01, 0.0, 0.5, 1000.0, 0.5, id="slower-sample-jumps-regardless-of-age"),
        pytest.param(0.1, 100.0, 0.01, 100.0, 0.1, id="faster-sample-no-elapsed-no-change"),
        pytest.param(0.1, 100.0, 0.0, 110.0, 0.1 * E, id="one-decay-period"),
        pytest.param(0.1, 100.0, 0.02, 110.0, 0.1 * E + 0.02 * (1 - E), id="one-period-weighted"),
        pytest.param(0.1, 100.0, 0.02, 1e6, 0.02, id="long-idle-converges-to-sample"),
        pytest.param(0.1, 100.0, 0.02, 90.0, 0.1, id="clock-going-back-counts-as-no-elapsed"),
        pytest.param(0.1, 100.0, 0.1, 150.0, 0.1, id="equal-sample-no-change"),
    ],
)
def test_update_peak_ewma(current, last, sample, now, expected):
    assert update_peak_ewma(current, last, sample, now) == pytest.approx(expected)


def test_update_peak_ewma_decay_constant_is_a_parameter():
    slow = update_peak_ewma(0.1, 0.0, 0.0, 1.0, decay_s=10.0)
    fast = update_peak_ewma(0.1, 0.0, 0.0, 1.0, decay_s=0.5)
    assert slow == pytest.approx(0.1 * math.exp(-0.1))
    assert fast == pytest.approx(0.1 * math.exp(-2.0))


def test_update_peak_ewma_decays_monotonically_towards_faster_sample():
    values = [update_peak_ewma(0.2, 0.0, 0.01, t) for t in (0.0, 1.0, 5.0, 20.0, 100.0)]
    assert values[0] == pytest.approx(0.2)
    assert all(x > y for x, y in itertools.pairwise(values))
    assert all(v >= 0.01 for v in values)


# --- make_balancer ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("name", "cls"),
    [("power_of_two", PowerOfTwo), ("round_robin", RoundRobin), ("peak_ewma", PeakEwma),
     ("least_squares", LeastSquares)],
)
def test_make_balancer_known_names(name, cls):
    assert type(make_balancer(name)) is cls


def test_make_balancer_returns_fresh_instances():
    a, b = make_balancer("round_robin"), make_balancer("round_robin")
    assert a is not b
    a.pick(cands(0, 0), no_rand)
    assert b.pick(cands(0, 0), no_rand) == 0


@pytest.mark.parametrize("name", ["random", "", "Power_Of_Two", "least_conn"])
def test_make_balancer_unknown_name_lists_known_ones(name):
    with pytest.raises(ConfigError) as info:
        make_balancer(name)
    msg = str(info.value)
    assert repr(name) in msg
    for known in ("peak_ewma", "power_of_two", "round_robin"):
        assert known in msg


def test_balancer_registry_names():
    assert sorted(BALANCERS) == ["least_squares", "peak_ewma", "power_of_two", "round_robin"]


# --- small deployments: the gateway's power_of_two scans them ------------------------------

@pytest.mark.parametrize(
    ("outstanding", "rand_value", "expected"),
    [
        ((1, 1, 0), 0.0, 2),  # the only idle replica is always found (P2C misses it 1/3)
        ((0, 1, 1), 0.99, 0),
        ((2, 0, 0), 0.0, 1),  # ties broken by rand…
        ((2, 0, 0), 0.99, 2),  # …not always the first
        ((3, 1), 0.5, 1),
    ],
)
def test_gateway_power_of_two_scans_three_or_fewer(outstanding, rand_value, expected):
    balancer = make_balancer("power_of_two")
    assert balancer.pick(cands(*outstanding), lambda: rand_value) == expected


def test_gateway_power_of_two_samples_two_of_four_or_more():
    balancer = make_balancer("power_of_two")
    c = cands(1, 1, 1, 0)
    rand = random.Random(1).random
    picks = Counter(balancer.pick(c, rand) for _ in range(2000))
    assert 0 < picks[0] < picks[3] < 2000, picks  # the idle one wins often, not always


# --- LeastSquares ------------------------------------------------------------------------------

class Rep:
    """A replica as the dispatcher's Endpoint shows it to a balancer."""

    def __init__(self, replica_id: str, outstanding: int = 0, ewma: float = 0.0) -> None:
        self.replica_id, self.outstanding, self.ewma_latency_s = replica_id, outstanding, ewma


def trained(**speeds: tuple[float, float, float]) -> LeastSquares:
    """A balancer that has seen 200 answers per replica of latency = base + per_kib × KiB +
    per_outstanding × outstanding (sizes 0-16 KiB, 0-5 outstanding)."""
    ls = LeastSquares()
    rng = random.Random(3)
    for rid, (base, per_kib, per_out) in speeds.items():
        for _ in range(200):
            size, out = rng.uniform(0, 16), rng.randint(0, 5)
            ls.observe(rid, size, out, base + per_kib * size + per_out * out)
    return ls


@pytest.mark.parametrize(
    ("outstanding", "size", "expected"),
    [
        ((0, 0), 1.0, 0),  # both idle: the fast one
        ((2, 0), 1.0, 0),  # fast with 2 queued (0.0301 s) beats slow idle (0.033 s)
        ((3, 0), 1.0, 1),  # fast with 3 queued (0.0401 s) loses to slow idle (0.033 s)
        ((3, 0), 0.0, 1),
        ((3, 0), 15.0, 0),  # a 15 KiB request: slow idle 0.075 s, fast with 3 queued 0.0415 s
    ],
)
def test_least_squares_picks_the_least_predicted_completion(outstanding, size, expected):
    # fast: 10 ms + 0.1 ms/KiB + 10 ms per queued; slow (3x): 30 ms + 3 ms/KiB + 30 ms per queued
    ls = trained(fast=(0.010, 0.0001, 0.010), slow=(0.030, 0.003, 0.030))
    pool = [Rep("fast", outstanding[0]), Rep("slow", outstanding[1])]
    assert ls.pick(pool, lambda: 0.0, size) == expected


def test_least_squares_learns_the_coefficients_and_reports_them():
    ls = trained(fast=(0.010, 0.0001, 0.010), slow=(0.030, 0.003, 0.030))
    fit = ls.coefficients()
    assert fit["slow"]["base_s"] == pytest.approx(0.030, abs=1e-3)
    assert fit["slow"]["per_kib_s"] == pytest.approx(0.003, abs=1e-4)
    assert fit["slow"]["per_outstanding_s"] == pytest.approx(0.030, abs=1e-3)
    assert fit["fast"]["samples"] == 200


def test_least_squares_costs_an_unlearnt_replica_by_peak_ewma():
    ls = trained(fast=(0.010, 0.0, 0.010))
    for _ in range(LS_MIN_SAMPLES - 1):
        ls.observe("new", 1.0, 0, 0.001)
    # the new replica's 19 fast answers are not enough for a fit; its EWMA says 5 ms × 1
    assert ls.cost(Rep("new", 0, ewma=0.005), 1.0) == pytest.approx(0.005)
    assert ls.pick([Rep("fast", 0), Rep("new", 0, ewma=0.005)], lambda: 0.0, 1.0) == 1
    assert ls.pick([Rep("fast", 0), Rep("new", 0, ewma=0.050)], lambda: 0.0, 1.0) == 0


def test_least_squares_clamps_a_negative_slope():
    # a fit that says more queued work is faster must not attract traffic to a busy replica
    ls = LeastSquares()
    rng = random.Random(4)
    for _ in range(200):
        out = rng.randint(0, 5)
        ls.observe("odd", 1.0, out, 0.05 - 0.005 * out)
    assert ls.coefficients()["odd"]["per_outstanding_s"] < 0
    assert ls.cost(Rep("odd", 5), 1.0) >= ls.cost(Rep("odd", 0), 1.0)


def test_least_squares_ties_are_broken_at_random_and_many_replicas_use_two_choices():
    ls = LeastSquares()  # nothing learnt: equal peak-EWMA costs, a tie every time
    rng = random.Random(6)
    assert Counter(ls.pick([Rep(f"r{i}") for i in range(3)], rng.random) for _ in range(300)) \
        .keys() == {0, 1, 2}
    pool, seen = probes(20)
    ls.pick(pool, seq(0.1, 0.5))
    assert set(seen) <= {2, 10}  # only the two sampled ones were looked at


def test_least_squares_forgets_replicas_that_left():
    ls = trained(a=(0.01, 0.0, 0.01), b=(0.01, 0.0, 0.01))
    ls.retain({"a"})
    assert set(ls.coefficients()) == {"a"}


def test_least_squares_probes_a_passed_over_replica_every_50_picks():
    # slow once: without a probe it would never be chosen again, nor seen to recover
    ls = trained(fast=(0.010, 0.0, 0.010), slow=(0.030, 0.0, 0.030))
    pool = [Rep("fast"), Rep("slow")]
    picks = [ls.pick(pool, lambda: 0.0, 1.0) for _ in range(500)]
    assert [i for i, p in enumerate(picks) if p == 1] == list(range(50, 500, 50))  # 2 %
