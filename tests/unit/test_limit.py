"""policies/limit.py: AimdLimit, AIMD on the replicas' queueing signal."""

from __future__ import annotations

import math

import pytest

from steadyserve.policies.limit import AimdLimit, DecayingRate, WindowedMin, unloaded_time

MS = 0.001
T0 = 1000.0
SERVICE = 20 * MS
RTT = 20 * MS


def sample(lim: AimdLimit, *, queue_s: float, inflight: int, now: float,
           batched: bool = False, rtt_s: float = RTT) -> float:
    return lim.on_sample(queue_s=queue_s, service_s=SERVICE, batched=batched,
                         inflight=inflight, rtt_s=rtt_s, now=now)


OVERLOADED = 100 * MS  # queue far over any tolerance
CALM = 0.0


# overloaded ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("queue_ms", "batched", "overloaded"),
    [
        pytest.param(0, False, False, id="no-queue"),
        pytest.param(10, False, False, id="plain-10ms-half-a-service"),
        pytest.param(20, False, False, id="plain-20ms-one-service"),
        pytest.param(21.9, False, False, id="plain-within-slack"),
        pytest.param(22.1, False, True, id="plain-just-over-slack"),
        pytest.param(25, False, True, id="plain-25ms"),
        pytest.param(25, True, False, id="batched-queue-time-alone-is-not-overload"),
        pytest.param(500, True, False, id="batched-even-a-long-wait-for-the-batch-computing"),
    ],
)
def test_overloaded_table(queue_ms, batched, overloaded):
    lim = AimdLimit(limit=10.0)  # tolerance 1, batch tolerance 2, slack 2 ms
    assert lim.overloaded(queue_ms * MS, SERVICE, batched) is overloaded


@pytest.mark.parametrize(("missed", "tolerance", "overloaded"),
                         [(0, 0, False), (1, 0, True), (3, 0, True), (1, 1, False), (2, 1, True)])
def test_batched_overload_is_sitting_out_whole_batches(missed, tolerance, overloaded):
    lim = AimdLimit(limit=10.0, batch_tolerance=tolerance)
    assert lim.overloaded(0.0, SERVICE, True, missed) is overloaded
    before = lim.limit
    lim.on_sample(queue_s=0.0, service_s=SERVICE, batched=True, inflight=10, rtt_s=RTT, now=T0,
                  missed_batches=missed)
    assert (lim.limit < before) is overloaded


def test_overloaded_uses_configured_tolerances():
    lim = AimdLimit(limit=10.0, tolerance=0.5, slack_s=0.0)
    assert lim.overloaded(11 * MS, SERVICE, False)
    assert not lim.overloaded(9 * MS, SERVICE, False)


# on_sample: decrease -------------------------------------------------------------------------


def test_overloaded_sample_decreases_by_backoff():
    lim = AimdLimit(limit=10.0, backoff=0.9)
    assert sample(lim, queue_s=OVERLOADED, inflight=10, now=T0) == pytest.approx(9.0)
    assert lim.last_decrease_at == T0


@pytest.mark.parametrize(
    ("gap_ms", "decreases"),
    [
        pytest.param(1, 1, id="1ms-apart-one-decrease"),
        pytest.param(19, 1, id="19ms-apart-one-decrease"),
        pytest.param(21, 2, id="over-one-rtt-apart-two-decreases"),
        pytest.param(50, 2, id="later-two-decreases"),
    ],
)
def test_at_most_one_decrease_per_rtt(gap_ms, decreases):
    lim = AimdLimit(limit=100.0, backoff=0.5)
    sample(lim, queue_s=OVERLOADED, inflight=100, now=T0)
    sample(lim, queue_s=OVERLOADED, inflight=100, now=T0 + gap_ms * MS)
    assert lim.limit == pytest.approx(100.0 * 0.5**decreases)


def test_overloaded_within_rtt_does_not_increase_either():
    lim = AimdLimit(limit=10.0, backoff=0.5)
    sample(lim, queue_s=OVERLOADED, inflight=10, now=T0)
    assert sample(lim, queue_s=OVERLOADED, inflight=10, now=T0 + MS) == pytest.approx(5.0)


@pytest.mark.parametrize("start", [3.0, 3.2, 4.0, 50.0])
def test_never_below_min_limit(start):
    lim = AimdLimit(limit=start, min_limit=3, backoff=0.5)
    for i in range(40):
        sample(lim, queue_s=OVERLOADED, inflight=0, now=T0 + i * RTT)
        assert lim.limit >= 3.0
    assert lim.limit == 3.0


# on_sample: increase -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "inflight", "after"),
    [
        pytest.param(10.0, 9, 10.1, id="at-limit-minus-one-binding"),
        pytest.param(10.0, 10, 10.1, id="at-limit-binding"),
        pytest.param(10.5, 10, 10.5 + 1 / 10.5, id="fractional-binding"),
        pytest.param(10.0, 8, 10.0, id="two-below-not-binding"),
        pytest.param(10.0, 1, 10.0, id="far-below-not-binding"),
        pytest.param(10.0, 0, 10.0, id="idle-not-binding"),
    ],
)
def test_increase_by_one_per_round_trip_only_when_binding(limit, inflight, after):
    lim = AimdLimit(limit=limit)
    assert sample(lim, queue_s=CALM, inflight=inflight, now=T0) == pytest.approx(after)


def test_a_limits_worth_of_calm_binding_samples_adds_about_one():
    lim = AimdLimit(limit=5.0)
    for i in range(5):
        sample(lim, queue_s=CALM, inflight=int(lim.limit), now=T0 + i * MS)
    assert 5.9 <= lim.limit <= 6.0


@pytest.mark.parametrize("start", [9.0, 9.5, 10.0])
def test_never_above_max_limit(start):
    lim = AimdLimit(limit=start, max_limit=10)
    for i in range(50):
        sample(lim, queue_s=CALM, inflight=100, now=T0 + i * MS)
        assert lim.limit <= 10.0
    assert lim.limit == 10.0


def test_tolerated_queue_counts_as_calm():
    lim = AimdLimit(limit=10.0)
    assert sample(lim, queue_s=35 * MS, inflight=10, now=T0, batched=True) == pytest.approx(10.1)
    assert sample(lim, queue_s=35 * MS, inflight=11, now=T0 + MS, batched=False) < 11.0


# on_failure ----------------------------------------------------------------------------------


def test_failure_decreases_like_congestion():
    lim = AimdLimit(limit=10.0, backoff=0.9)
    assert lim.on_failure(T0, RTT) == pytest.approx(9.0)
    assert lim.on_failure(T0 + MS, RTT) == pytest.approx(9.0)  # same round trip
    assert lim.on_failure(T0 + RTT + MS, RTT) == pytest.approx(8.1)  # the next one


def test_failure_and_overload_share_the_once_per_rtt_gate():
    lim = AimdLimit(limit=10.0, backoff=0.5)
    lim.on_failure(T0, RTT)
    assert sample(lim, queue_s=OVERLOADED, inflight=5, now=T0 + MS) == pytest.approx(5.0)
    lim = AimdLimit(limit=10.0, backoff=0.5)
    sample(lim, queue_s=OVERLOADED, inflight=10, now=T0)
    assert lim.on_failure(T0 + MS, RTT) == pytest.approx(5.0)


def test_failure_never_below_min_limit():
    lim = AimdLimit(limit=4.0, min_limit=3, backoff=0.5)
    for i in range(5):
        lim.on_failure(T0 + i * RTT, RTT)
    assert lim.limit == 3.0


# a tiny closed loop ----------------------------------------------------------------------------

REPLICAS = 3
DEMAND = 20


def closed_loop(initial: float, samples: int = 200) -> list[float]:
    """3 replicas, each computing one request at a time for 20 ms; 20 clients always waiting.

    The gateway admits while inflight < limit, spread evenly over the replicas. Responses
    arrive one every 20/3 ms, from the replicas in turn, and report how long a request waits
    on that replica: (its inflight - 1) service times. Returns the limit after each sample.
    """
    lim = AimdLimit(limit=initial, min_limit=REPLICAS)
    history = []
    for step in range(samples):
        inflight = min(DEMAND, math.ceil(lim.limit))
        per_replica = [inflight // REPLICAS + (1 if r < inflight % REPLICAS else 0)
                       for r in range(REPLICAS)]
        replica = step % REPLICAS
        queue_s = max(0, per_replica[replica] - 1) * SERVICE
        now = T0 + step * SERVICE / REPLICAS
        sample(lim, queue_s=queue_s, inflight=inflight, now=now)
        history.append(lim.limit)
    return history


@pytest.mark.parametrize("initial", [3.0, 12.0, 20.0, 40.0], ids=lambda v: f"start={v:g}")
def test_closed_loop_converges_near_the_knee(initial):
    history = closed_loop(initial)
    settled = history[100:]
    # The knee is 2 per replica (6): one waiting behind one computing is tolerated, two are
    # not. AIMD saws around it: it may admit a third request on a replica (limit < 9),
    # then backs off; it never falls to the floor or drifts back up towards the demand.
    assert all(3.0 <= v <= 9.0 for v in settled), (min(settled), max(settled))
    assert all(math.ceil(v) <= 3 * REPLICAS for v in settled)
    mean = sum(settled) / len(settled)
    assert 6.0 <= mean <= 9.0
    assert max(settled) - min(settled) < 3.0


def test_closed_loop_limit_stops_growing_once_demand_no_longer_binds():
    """No queueing at all: the limit grows until it exceeds the demand, then stays put."""
    lim = AimdLimit(limit=3.0, min_limit=REPLICAS)
    for step in range(200):
        lim.on_sample(queue_s=0.0, service_s=SERVICE, batched=False,
                      inflight=min(DEMAND, math.ceil(lim.limit)), rtt_s=RTT,
                      now=T0 + step * SERVICE / REPLICAS)
    assert DEMAND <= lim.limit <= DEMAND + 2


# latency-bounded batching (interactive samples of batched handlers) -------------------------

@pytest.mark.parametrize(("previous", "queue_ms", "service_ms", "items", "expected_ms"), [
    pytest.param(None, 0.0, 16.0, 1, 16.0, id="first-alone-sample"),
    pytest.param(None, 0.0, 40.0, 3, None, id="a-batch-of-three-says-nothing"),
    pytest.param(None, 5.0, 16.0, 1, None, id="queued-over-a-tenth-is-loaded"),
    pytest.param(16.0, 1.0, 16.0, 1, 16.05, id="barely-queued-counts-ewma"),
    pytest.param(16.0, 0.0, 36.0, 1, 17.0, id="a-long-input-moves-it-a-twentieth"),
    pytest.param(16.0, 0.0, 30.0, 2, 16.0, id="batched-sample-ignored"),
])
def test_unloaded_time_learns_only_from_samples_that_ran_alone(previous, queue_ms, service_ms,
                                                                items, expected_ms):
    got = unloaded_time(None if previous is None else previous * MS, queue_s=queue_ms * MS,
                        service_s=service_ms * MS, batch_items=items)
    assert (got is None and expected_ms is None) or got == pytest.approx(expected_ms * MS)


def batched_sample(lim: AimdLimit, *, queue_ms: float, service_ms: float, items: int,
                   interactive: bool, now: float, inflight: int = 0) -> float:
    return lim.on_sample(queue_s=queue_ms * MS, service_s=service_ms * MS, batched=True,
                         inflight=inflight, rtt_s=RTT, now=now, handler="embed",
                         interactive=interactive, batch_items=items)


def test_interactive_samples_over_the_tolerance_shrink_the_limit_batch_ones_do_not():
    lim = AimdLimit(limit=16.0, min_limit=2, latency_tolerance=1.5, backoff=0.5)
    batched_sample(lim, queue_ms=0, service_ms=16, items=1, interactive=True, now=T0)
    assert lim.unloaded["embed"] == pytest.approx(16 * MS)
    # a batch of 8 took 92 ms: for interactive traffic that is over 1.5 x 16 ms
    batched_sample(lim, queue_ms=10, service_ms=92, items=8, interactive=False, now=T0 + 1)
    assert lim.limit == 16.0  # batch-class traffic is held to throughput, not latency
    batched_sample(lim, queue_ms=10, service_ms=92, items=8, interactive=True, now=T0 + 2)
    assert lim.limit == 8.0
    # within the tolerance (waiting out a short batch): not overload
    batched_sample(lim, queue_ms=4, service_ms=18, items=1, interactive=True, now=T0 + 3)
    assert lim.limit == 8.0


def test_no_unloaded_sample_yet_means_no_latency_signal():
    lim = AimdLimit(limit=16.0, min_limit=2, latency_tolerance=1.5, backoff=0.5)
    batched_sample(lim, queue_ms=50, service_ms=300, items=32, interactive=True, now=T0)
    assert lim.limit == 16.0 and "embed" not in lim.unloaded


def test_latency_tolerance_zero_is_throughput_first():
    lim = AimdLimit(limit=16.0, min_limit=2, latency_tolerance=0.0, backoff=0.5)
    batched_sample(lim, queue_ms=0, service_ms=16, items=1, interactive=True, now=T0)
    batched_sample(lim, queue_ms=100, service_ms=300, items=32, interactive=True, now=T0 + 1)
    assert lim.limit == 16.0


@pytest.mark.parametrize(("samples", "now", "expected"), [
    pytest.param([(5.0, 0.0), (3.0, 1.0)], 1.0, 3.0, id="least-so-far"),
    pytest.param([(3.0, 0.0), (5.0, 16.0)], 16.0, 3.0, id="previous-bucket-still-counts"),
    pytest.param([(3.0, 0.0), (5.0, 16.0), (6.0, 31.0)], 31.0, 5.0, id="ages-out-after-a-window"),
    pytest.param([(3.0, 0.0), (7.0, 40.0)], 40.0, 7.0, id="a-long-gap-forgets-at-once"),
])
def test_windowed_min(samples, now, expected):
    w = WindowedMin(window_s=30.0)
    for value, t in samples:
        w.add(value, t)
    assert w.value == expected


def test_decaying_rate_holds_a_steady_rate_and_forgets_a_stopped_one():
    rate = DecayingRate(tau_s=1.0)
    assert rate.rate(0.0) == 0.0
    t = 0.0
    for _ in range(500):  # 100 per second for 5 s
        t += 0.01
        rate.add(t)
    assert rate.rate(t) == pytest.approx(100, rel=0.02)
    assert rate.rate(t + 1.0) == pytest.approx(100 / math.e, rel=0.02)
    assert rate.rate(t + 10.0) < 0.01
    rate.add(t + 10.0)
    rate.add(t + 9.0)  # a clock that steps back never inflates the count
    assert rate.rate(t + 10.0) == pytest.approx(2.0, abs=0.01)
