"""policies/outlier.py: OutlierPolicy.may_eject, HostHealth (and the reason it is ejected),
record, eject_host, start_probe, slow_start_weight, timeout_blames_replica."""

from __future__ import annotations

import pytest

from steadyserve.policies.outlier import (
    HandlerErrors,
    HostHealth,
    OutlierPolicy,
    eject_host,
    note_answer,
    record,
    sick,
    slow_start_weight,
    start_probe,
    timeout_blames_replica,
)

POLICY = OutlierPolicy()  # 5 failures, 30 s base, 300 s cap, share 0.5, 10 s slow start
T0 = 1000.0


def fail_times(h: HostHealth, n: int, now: float, may_eject: bool = True):
    """Record `n` failures at `now`; returns the final state and the list of events."""
    events = []
    for _ in range(n):
        h, event = record(h, False, now, POLICY, may_eject)
        events.append(event)
    return h, events


def ejected_host(now: float = T0) -> HostHealth:
    h, events = fail_times(HostHealth(), POLICY.consecutive_failures, now)
    assert events[-1] == "ejected"
    return h


def returned_host(now: float = T0) -> HostHealth:
    """Ejected at `now`, probed when due, probe succeeded: back in rotation, in slow start."""
    h = ejected_host(now)
    h = start_probe(h)
    h, event = record(h, True, h.ejected_until, POLICY, True)
    assert event == "returned"
    return h


# the reason an ejection carries ------------------------------------------------------------


def probe_failed(h: HostHealth) -> HostHealth:
    h, event = record(start_probe(h), False, h.ejected_until, POLICY, True)
    assert event == "ejected"
    return h


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        pytest.param(lambda: HostHealth(), "", id="never-ejected"),
        pytest.param(lambda: fail_times(HostHealth(), 4, T0)[0], "", id="4-failures-in-rotation"),
        pytest.param(lambda: ejected_host(), "5 consecutive failures", id="consecutive-failures"),
        pytest.param(lambda: fail_times(HostHealth(), 5, T0, may_eject=False)[0], "",
                     id="share-full-not-ejected"),
        pytest.param(lambda: start_probe(ejected_host()), "5 consecutive failures",
                     id="probing-keeps-it"),
        pytest.param(lambda: probe_failed(ejected_host()),
                     "its probe failed (ejected 2 times in a row)", id="probe-failed"),
        pytest.param(lambda: probe_failed(probe_failed(ejected_host())),
                     "its probe failed (ejected 3 times in a row)", id="probe-failed-twice"),
        pytest.param(lambda: returned_host(), "", id="returned-forgets-it"),
        pytest.param(lambda: eject_host(HostHealth(), T0, POLICY, "an automatic action"),
                     "an automatic action", id="automatic-action"),
        pytest.param(lambda: eject_host(returned_host(), T0 + 31, POLICY,
                                        "its handler failed 90% of its last 20 requests"),
                     "its handler failed 90% of its last 20 requests", id="handler-errors"),
    ],
)
def test_an_ejection_says_why_until_the_replica_returns(make, reason):
    h = make()
    assert h.reason == reason
    assert (h.ejected_until > 0) == bool(reason)


def test_eject_host_is_what_consecutive_failures_do_but_with_its_reason():
    by_failures = ejected_host(T0)
    direct = eject_host(HostHealth(consecutive_failures=2), T0, POLICY, "an automatic action")
    assert (direct.ejections, direct.ejected_until) == (by_failures.ejections,
                                                         by_failures.ejected_until)
    again = eject_host(returned_host(T0), T0 + 31, POLICY, "x")
    assert again.ejections == 2 and again.ejected_until == pytest.approx(T0 + 31 + 60)


# may_eject ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "ejected", "allowed"),
    [
        pytest.param(0, 0, False, id="no-replicas"),
        pytest.param(1, 0, False, id="1-never-the-last-one"),
        pytest.param(2, 0, True, id="2-first-ok"),
        pytest.param(2, 1, False, id="2-second-would-leave-none"),
        pytest.param(3, 0, True, id="3-first-ok"),
        pytest.param(3, 1, False, id="3-floor-of-1.5-is-1"),
        pytest.param(4, 0, True, id="4-first-ok"),
        pytest.param(4, 1, True, id="4-second-ok"),
        pytest.param(4, 2, False, id="4-third-over-half"),
        pytest.param(10, 0, True, id="10-first-ok"),
        pytest.param(10, 4, True, id="10-fifth-ok"),
        pytest.param(10, 5, False, id="10-sixth-over-half"),
    ],
)
def test_may_eject_share_half(total, ejected, allowed):
    assert OutlierPolicy(max_ejection_share=0.5).may_eject(total, ejected) is allowed


@pytest.mark.parametrize("share", [0.01, 0.1, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("total", [1, 2, 3, 4, 10, 100])
def test_may_eject_never_the_last_one_and_at_least_one_when_two(total, share):
    policy = OutlierPolicy(max_ejection_share=share)
    # ejecting one by one stops while at least one replica still serves
    ejected = 0
    while policy.may_eject(total, ejected):
        ejected += 1
        assert ejected <= total
    assert total - ejected >= 1
    if total >= 2:
        assert ejected >= 1, "a tiny share must still allow ejecting one replica"
    assert ejected <= max(1, int(total * share))


# record: consecutive failures ---------------------------------------------------------------


def test_four_failures_keep_it_in_the_fifth_ejects_for_30s():
    h, events = fail_times(HostHealth(), 4, T0)
    assert events == [None] * 4
    assert h.consecutive_failures == 4
    assert not h.ejected(T0)
    h, event = record(h, False, T0, POLICY, True)
    assert event == "ejected"
    assert h.ejected_until == pytest.approx(T0 + 30.0)
    assert h.ejections == 1
    assert h.consecutive_failures == 0
    assert h.ejected(T0)


def test_not_ejected_when_may_eject_is_false():
    h, events = fail_times(HostHealth(), 8, T0, may_eject=False)
    assert events == [None] * 8
    assert h.ejected_until == 0.0
    assert not h.ejected(T0)
    assert not h.due_for_probe(T0)
    # once the share allows it again, the next failure ejects at once
    h, event = record(h, False, T0, POLICY, True)
    assert event == "ejected"


def test_success_resets_consecutive_failures():
    h, _ = fail_times(HostHealth(), 4, T0)
    h, event = record(h, True, T0, POLICY, True)
    assert event is None
    assert h.consecutive_failures == 0
    h, events = fail_times(h, 4, T0)
    assert events == [None] * 4
    assert not h.ejected(T0)


def test_success_on_healthy_host_changes_nothing():
    h = HostHealth()
    assert record(h, True, T0, POLICY, True) == (h, None)


# ejected → probe → returned / ejected again ---------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "ejected", "due"),
    [
        pytest.param(0.0, True, False, id="at-ejection"),
        pytest.param(15.0, True, False, id="half-way"),
        pytest.param(29.999, True, False, id="just-before"),
        pytest.param(30.0, False, True, id="at-ejected-until"),
        pytest.param(500.0, False, True, id="long-after"),
    ],
)
def test_ejected_until_then_due_for_probe(offset, ejected, due):
    h = ejected_host(T0)
    assert h.ejected(T0 + offset) is ejected
    assert h.due_for_probe(T0 + offset) is due


def test_start_probe_keeps_it_out_until_the_outcome():
    h = start_probe(ejected_host(T0))
    for now in (T0 + 30.0, T0 + 31.0, T0 + 10_000.0):
        assert h.ejected(now)
        assert not h.due_for_probe(now)


def test_straggler_failure_while_ejected_changes_nothing():
    h = ejected_host(T0)
    for now in (T0 + 1.0, T0 + 40.0):  # before and after ejected_until, no probe running
        assert record(h, False, now, POLICY, True) == (h, None)


def test_successful_probe_returns_it_in_slow_start():
    h = start_probe(ejected_host(T0))
    now = T0 + 30.0
    h, event = record(h, True, now, POLICY, True)
    assert event == "returned"
    assert not h.ejected(now)
    assert not h.due_for_probe(now)
    assert not h.probing
    assert h.returned_at == now
    assert h.ejections == 1  # remembered until a healthy period has passed
    assert slow_start_weight(h, now, POLICY) == pytest.approx(0.1)


def test_failed_probe_ejects_again_for_twice_as_long():
    h = start_probe(ejected_host(T0))
    now = T0 + 30.0
    h, event = record(h, False, now, POLICY, True)
    assert event == "ejected"
    assert h.ejections == 2
    assert not h.probing
    assert h.ejected_until == pytest.approx(now + 60.0)
    assert h.ejected(now + 59.0)
    assert h.due_for_probe(now + 60.0)


def test_failed_probe_ejects_again_even_when_share_is_full():
    h = start_probe(ejected_host(T0))
    _, event = record(h, False, T0 + 30.0, POLICY, False)
    assert event == "ejected"


def test_ejection_duration_grows_linearly_then_caps_at_300s():
    h = ejected_host(T0)
    now = T0
    durations = [h.ejected_until - now]
    for _ in range(13):
        now = h.ejected_until
        h, event = record(start_probe(h), False, now, POLICY, True)
        assert event == "ejected"
        durations.append(h.ejected_until - now)
    assert durations == pytest.approx(
        [30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 300, 300, 300, 300]
    )


# forgetting past ejections ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("healthy_for", "next_ejection_s"),
    [
        pytest.param(1.0, 60.0, id="soon-after-return-remembered"),
        pytest.param(29.9, 60.0, id="just-under-base-remembered"),
        pytest.param(30.0, 30.0, id="base-after-return-forgotten"),
        pytest.param(1000.0, 30.0, id="long-after-forgotten"),
    ],
)
def test_multiplier_forgotten_after_healthy_period(healthy_for, next_ejection_s):
    h = returned_host(T0)
    back = h.returned_at
    h, event = record(h, True, back + healthy_for, POLICY, True)
    assert event is None
    later = back + healthy_for + 1.0
    h, events = fail_times(h, POLICY.consecutive_failures, later)
    assert events[-1] == "ejected"
    assert h.ejected_until - later == pytest.approx(next_ejection_s)


def test_forgetting_also_clears_pending_failures():
    h = returned_host(T0)
    back = h.returned_at
    h, _ = fail_times(h, 3, back + 40.0)
    h, event = record(h, True, back + 41.0, POLICY, True)
    assert event is None
    assert (h.consecutive_failures, h.ejections) == (0, 0)


# slow start ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("since_return", "weight"),
    [
        pytest.param(0.0, 0.1, id="at-return-floor"),
        pytest.param(0.5, 0.1, id="below-floor-clamped"),
        pytest.param(1.0, 0.1, id="10pct"),
        pytest.param(2.5, 0.25, id="25pct"),
        pytest.param(5.0, 0.5, id="half"),
        pytest.param(9.0, 0.9, id="90pct"),
        pytest.param(10.0, 1.0, id="end-of-window"),
        pytest.param(100.0, 1.0, id="long-after"),
    ],
)
def test_slow_start_ramp(since_return, weight):
    h = returned_host(T0)
    assert slow_start_weight(h, h.returned_at + since_return, POLICY) == pytest.approx(weight)


def test_slow_start_ramp_is_monotonic():
    h = returned_host(T0)
    weights = [slow_start_weight(h, h.returned_at + i * 0.25, POLICY) for i in range(50)]
    assert weights == sorted(weights)
    assert weights[0] == pytest.approx(0.1)
    assert weights[-1] == 1.0


@pytest.mark.parametrize("now", [0.0, 1.0, T0, 1e9])
def test_slow_start_weight_is_one_for_a_host_never_ejected(now):
    assert slow_start_weight(HostHealth(), now, POLICY) == 1.0


def test_slow_start_disabled_with_zero_window():
    h = returned_host(T0)
    assert slow_start_weight(h, h.returned_at, OutlierPolicy(slow_start_s=0.0)) == 1.0


# handler errors weighed against the peers' ---------------------------------------------------

def window(answers: int, errors: int) -> HandlerErrors:
    return HandlerErrors(float(answers), float(errors))


@pytest.mark.parametrize(("candidate", "peers", "expected"), [
    (window(20, 20), [window(20, 0)], True),  # fails everything, peers fine
    (window(20, 16), [window(10, 0), window(10, 1)], True),  # 80 % vs 5 %
    (window(19, 19), [window(40, 0)], False),  # too few of its own answers
    (window(20, 20), [window(19, 0)], False),  # too few peer answers to compare
    (window(20, 20), [], False),  # a single replica: nothing to compare with
    (window(20, 15), [window(20, 0)], False),  # 75 % is under the 80 % ratio
    (window(20, 20), [window(20, 5)], False),  # peers fail 25 %: not a quarter of 100 %
    (window(20, 20), [window(20, 20), window(20, 20)], False),  # poison everywhere
    (window(40, 36), [window(30, 6)], True),  # 90 % vs 20 %
    (window(40, 36), [window(30, 7)], False),  # 90 % vs 23 %: more than a quarter
])
def test_sick_compares_a_replica_with_its_peers(candidate, peers, expected):
    assert sick(candidate, peers, error_ratio=0.8, min_requests=20) is expected


def test_handler_error_window_decays():
    w = HandlerErrors()
    for _ in range(40):
        w = note_answer(w, error=True, window=20)
    assert w.answers == 20 and w.ratio == 1.0  # halved at 40
    for _ in range(20):
        w = note_answer(w, error=False, window=20)
    assert w.answers == 20 and w.ratio == pytest.approx(0.5)  # halved again: old errors fade


@pytest.mark.parametrize(
    ("budget_s", "handler_timeout_s", "p99_s", "blamed"),
    [
        (0.004, 60.0, 0.030, False),  # a client's 4 ms on a 30 ms model: the request's
        (0.080, 60.0, 0.030, False),  # under 3 x p99
        (0.085, 60.0, 0.030, True),  # 90 % of 3 x p99 had time enough: the replica hangs
        (0.040, 60.0, 0.001, False),  # under the 50 ms floor: scheduling noise
        (0.050, 60.0, 0.001, True),
        (0.300, 60.0, None, False),  # nothing observed yet: only the handler's own timeout
        (59.0, 60.0, None, True),
        (0.5, 0.5, 2.0, True),  # the handler's whole timeout is always enough
    ],
)
def test_a_timeout_is_the_replicas_only_when_it_had_the_time_the_handler_needs(
        budget_s, handler_timeout_s, p99_s, blamed):
    assert timeout_blames_replica(budget_s, handler_timeout_s=handler_timeout_s, p99_s=p99_s,
                                  p99_multiple=3.0) is blamed
