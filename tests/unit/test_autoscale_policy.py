"""policies/autoscale.py: the decision table, driven by a fake clock and demand series."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest

from steadyserve.config import AutoscaleConfig
from steadyserve.errors import ConfigError
from steadyserve.policies.autoscale import Autoscale

CFG = AutoscaleConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=2,
                      upscale_delay_s=3, downscale_delay_s=20, scale_to_zero_delay_s=40,
                      stable_window_s=10, panic_window_s=2, panic_threshold=2, tolerance=0.1,
                      interval_s=0.5)


def run(policy: Autoscale, demand, seconds: float, *, start: float = 0.0, current: int,
        ready: int | None = None, step: float = 0.5) -> tuple[int, list[tuple[float, int]], float]:
    """Feed `demand(t)` every step for `seconds`, applying each decision at once (replicas
    become ready at once unless `ready` is given). Returns the final count, the changes as
    (time, new count), and the time reached."""
    changes = []
    t = start
    while t < start + seconds - 1e-9:
        policy.observe(t, demand(t))
        decision = policy.decide(t, current, current if ready is None else ready)
        if decision is not None:
            assert decision.previous == current
            current = decision.desired
            changes.append((t, current))
        t += step
    return current, changes, t


def scaler(**overrides) -> Autoscale:
    cfg = dataclasses.replace(CFG, **overrides)
    return Autoscale(cfg, cfg.max_replicas or 8)


@pytest.mark.parametrize("demand,current,expected", [
    (4.0, 2, 2),     # exactly the target: nothing
    (4.3, 2, 2),     # within the 10 % tolerance
    (2.1, 1, 1),     # 5 % over on one replica: within the tolerance
    (2.3, 1, 2),     # 15 % over: two
    (7.9, 2, 4),
    (100.0, 2, 8),   # the ceiling
    (1.0, 4, 1),     # down, after the delay
    (0.4, 3, 1),     # never below min_replicas while there is demand
])
def test_steady_demand_settles_on_ceil_demand_over_target(demand, current, expected):
    final, changes, _ = run(scaler(), lambda t: demand, 60, current=current)
    assert final == expected
    assert len(changes) <= 1  # one move, never back and forth


def test_upscale_waits_for_its_delay_and_a_blip_resets_it():
    p = scaler(panic_threshold=100)  # no panic: only the stable rows
    _, changes, _ = run(p, lambda t: 6.0, 10.5, current=1, step=0.5)
    # the stable mean is 6 from the first sample: the change comes upscale_delay_s later
    assert changes and changes[0][1] == 3 and 3.0 <= changes[0][0] <= 3.5
    p = scaler(panic_threshold=100, stable_window_s=0.5, panic_window_s=0.5)
    # high for 2.5 s, calm for 1 s, high again: the delay starts over when it resumes
    demand = lambda t: 0.0 if 2.5 <= t < 3.5 else 6.0  # noqa: E731
    _, changes, _ = run(p, demand, 8, current=1)
    assert changes[0][0] >= 3.5 + 3.0


def test_downscale_waits_and_takes_the_highest_count_wanted_meanwhile():
    p = scaler()
    # 4 replicas; demand falls to 1 (wants 1), but at t = 15 s a 3 s bump lifts the 10 s mean
    # to 3.7 (wants 2), not a panic (10 < 2 × 4 ready × 2)
    demand = lambda t: 10.0 if 15 <= t < 18 else 1.0  # noqa: E731
    final, changes, _ = run(p, demand, 60, current=4)
    first_t, first_n = changes[0]
    assert first_t >= 20  # downscale_delay_s
    assert first_n == 2  # the highest wanted while it waited, not the latest
    assert final == 1


def test_panic_scales_up_at_once_and_never_down_while_panicking():
    p = scaler()
    # a burst: 20 ongoing against 2 ready (capacity 4) → panic, want(20) = 8 at once
    burst = lambda t: 20.0 if t < 4 else 0.5  # noqa: E731
    final, changes, t = run(p, burst, 4, current=2)
    assert changes[0] == (0.0, 8)
    # 8 ready (capacity 16) end the panic condition (20 < 32) at once, but no downscale until
    # a stable window (10 s) after the last panic row (t = 0), and then the downscale delay
    # (20 s), though the burst ended at 4 s
    final, changes, _ = run(p, burst, 60, start=t, current=final)
    assert changes[0][0] >= 0 + 10 + 20
    assert final == 1


def test_replicas_still_starting_are_not_capacity():
    # 2 desired, none ready yet: capacity is max(1, ready) × target = 2, and 5 ongoing is
    # ≥ 2 × that: panic, want(5) = 3 at once, not after the upscale delay
    p = scaler()
    p.observe(0.0, 5.0)
    decision = p.decide(0.0, 2, 0)
    assert decision is not None and decision.desired == 3 and "panic" in decision.reason
    # the same demand against 2 ready (capacity 4) is no panic: it waits for the delay
    p = scaler()
    p.observe(0.0, 5.0)
    assert p.decide(0.0, 2, 2) is None


def test_scale_to_zero_only_after_no_demand_for_window_plus_delay():
    p = scaler(min_replicas=0)
    final, changes, t = run(p, lambda t: 1.0 if t < 5 else 0.0, 5, current=1)
    assert final == 1
    final, changes, _ = run(p, lambda t: 0.0, 60, start=t, current=final)
    # the stable mean reaches 0 once the last sample leaves the 10 s window (t = 15), then
    # the 40 s scale_to_zero delay: at 55 s
    assert changes == [(pytest.approx(55.0, abs=0.6), 0)]
    assert final == 0


def test_min_replicas_one_never_goes_to_zero():
    final, _, _ = run(scaler(), lambda t: 0.0, 120, current=2)
    assert final == 1


def test_activation_from_zero_is_immediate_and_sized_by_the_waiting():
    p = scaler(min_replicas=0)
    p.observe(0.0, 0.0)
    assert p.decide(0.0, 0, 0) is None  # idle at zero stays at zero
    p.observe(0.1, 50.0)  # a burst of 50 held requests
    decision = p.decide(0.1, 0, 0)
    assert decision is not None and decision.desired == 8 and "zero" in decision.reason
    p2 = scaler(min_replicas=0)
    p2.observe(0.0, 1.0)
    assert p2.decide(0.0, 0, 0).desired == 1


def test_clamps_into_floor_and_ceiling():
    p = scaler(min_replicas=2)
    p.observe(0.0, 0.0)
    assert p.decide(0.0, 1, 1).desired == 2
    p.observe(0.5, 0.0)
    assert p.decide(0.5, 12, 12).desired == 8


def test_boost_raises_the_floor_for_its_hold_then_lets_go():
    p = scaler(scale_up_hold_s=100)
    assert p.boost(0.0, 2) == 3
    assert p.boost(1.0, 8) == 8  # already at the ceiling: the ceiling
    p = scaler(scale_up_hold_s=100)
    p.boost(0.0, 4)  # 4 → 5
    final, _, _ = run(p, lambda t: 0.0, 90, current=5)
    assert final == 5  # held while the floor holds
    final, _, _ = run(p, lambda t: 0.0, 40, start=100, current=final)
    assert final == 1


@pytest.mark.parametrize("seed", range(5))
def test_constant_noisy_load_settles_and_stays(seed):
    # ±30 % noise around 6 ongoing (3 replicas' worth) for 30 minutes, from 1 replica: the
    # panic row sizes the first step from one noisy sample; after that, at most one
    # correction, and never a change of direction within 10 minutes
    rng = random.Random(seed)
    p = scaler(stable_window_s=30, panic_window_s=3, downscale_delay_s=60)
    final, changes, _ = run(p, lambda t: 6.0 * (0.7 + 0.6 * rng.random()), 1800, current=1)
    assert len(changes) <= 2, changes
    directions = [(t, n > before) for (t, n), (_, before) in
                  zip(changes, [(0.0, 1), *changes], strict=False)]
    for (t1, up1), (t2, up2) in itertools.pairwise(directions):
        assert up1 == up2 or t2 - t1 >= 60, changes  # the delay, at least
    assert 3 <= final <= 4


@pytest.mark.parametrize("field,value", [
    ("min_replicas", -1), ("max_replicas", 0), ("target_ongoing_requests", 0),
    ("panic_window_s", 0), ("panic_threshold", 1), ("tolerance", 1), ("interval_s", 0),
    ("hold_max_requests", -1), ("activation_timeout_s", 0), ("upscale_delay_s", -1),
])
def test_config_refuses_nonsense(field, value):
    with pytest.raises(ConfigError):
        AutoscaleConfig(**{field: value})


def test_after_a_drop_the_count_reaches_the_bottom_a_window_and_a_delay_later():
    # 4 replicas busy (8 ongoing), then 1 ongoing from t = 30: the stable mean (10 s) is down
    # by t = 40, and the downscale window (20 s) has seen only "1 wanted" by t = 60; the count
    # steps down as the window slides instead of waiting a whole delay per step
    p = scaler()
    demand = lambda t: 8.0 if t < 30 else 1.0  # noqa: E731
    final, changes, _ = run(p, demand, 30, current=4)
    assert final == 4 and changes == []
    final, changes, _ = run(p, demand, 40, start=30, current=4)
    assert final == 1
    assert changes[0][0] >= 30 + 20  # nothing before the drop has lasted the delay
    assert changes[-1][0] <= 30 + 10 + 20 + 0.5, changes


def test_an_activation_decides_on_the_demand_now_and_adds_no_sample():
    p = scaler(min_replicas=0)
    p.observe(0.0, 0.0)
    decision = p.decide(0.1, 0, 0, demand_now=3.0)
    assert decision is not None and decision.desired == 2 and "zero" in decision.reason
    assert list(p.samples) == [(0.0, 0.0)]  # a burst of held requests is not 3 samples
    # before any sample, an activation still decides
    assert scaler(min_replicas=0).decide(0.0, 0, 0, demand_now=1.0).desired == 1
    assert scaler(min_replicas=0).decide(0.0, 0, 0) is None
