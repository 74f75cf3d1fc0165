"""gateway/admission.py: Admission (concurrency limit + two-class CoDel wait queue), parse_priority.

No sleeps: tasks are driven with `asyncio.sleep(0)` yields and time is a FakeClock, except
for the one test of a real (10 ms) wait allowance.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from steadyserve.config import ResilienceConfig
from steadyserve.errors import ClientError, Overloaded
from steadyserve.gateway.admission import Admission, Shed, parse_priority
from steadyserve.testing import FakeClock

LONG = 10.0  # a deadline and queue allowance no test reaches


def admission(clock: FakeClock, **overrides) -> Admission:
    cfg = dict(limit_initial=2, queue_target_s=LONG, queue_interval_s=LONG)
    cfg.update(overrides)
    return Admission(ResilienceConfig(**cfg), replicas=2, clock=clock)


async def saturated(clock: FakeClock, **overrides) -> Admission:
    """An Admission (limit 2) with both slots held by interactive requests."""
    adm = admission(clock, **overrides)
    await adm.acquire("interactive", clock.now + LONG)
    await adm.acquire("interactive", clock.now + LONG)
    return adm


async def settle(rounds: int = 10) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


def at_once(coro) -> None:
    """Run `acquire` to its end without letting it suspend: returns if it went through,
    raises what it raised; fails the test if it would have waited."""
    try:
        coro.send(None)
    except StopIteration:
        return
    coro.close()
    raise AssertionError("acquire waited instead of answering at once")


async def promptly(coro, within_s: float = 1.0):
    """Await `coro`, failing the test (TimeoutError) if it takes longer than `within_s`."""
    return await asyncio.wait_for(coro, within_s)


async def cleanup(adm: Admission, *tasks: asyncio.Task) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# parse_priority ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(None, "interactive", id="missing"),
        pytest.param("", "interactive", id="empty"),
        pytest.param("interactive", "interactive", id="interactive"),
        pytest.param("batch", "batch", id="batch"),
        pytest.param("BATCH ", "batch", id="upper-with-space"),
        pytest.param(" Interactive\t", "interactive", id="mixed-case-tab"),
    ],
)
def test_parse_priority_ok(value, expected):
    assert parse_priority(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("high", id="unknown"),
        pytest.param("   ", id="blank"),
        pytest.param("interactive,batch", id="list"),
        pytest.param("bat ch", id="inner-space"),
        pytest.param("x" * 1000, id="long"),
    ],
)
def test_parse_priority_rejects(value):
    with pytest.raises(ClientError) as info:
        parse_priority(value)
    assert info.value.param == "x-priority"
    assert info.value.status == 400
    assert len(info.value.message) < 200  # long values are cut


# the fast path -------------------------------------------------------------------------------


async def test_under_the_limit_acquire_returns_at_once():
    clock = FakeClock()
    adm = admission(clock)
    for _ in range(2):
        at_once(adm.acquire("interactive", clock.now + LONG))
    assert adm.inflight == 2
    assert adm.queued == 0


async def test_third_waits_and_gets_the_slot_on_release():
    clock = FakeClock()
    adm = admission(clock)
    await adm.acquire("interactive", clock.now + LONG)
    await adm.acquire("batch", clock.now + LONG)
    third = asyncio.create_task(adm.acquire("interactive", clock.now + LONG))
    await settle()
    assert not third.done()
    assert adm.queued == 1
    adm.release()
    await settle()
    assert third.done() and third.exception() is None
    assert adm.inflight == 2
    assert adm.queued == 0
    adm.release()
    adm.release()
    assert adm.inflight == 0


async def test_new_arrivals_queue_behind_waiters_even_when_a_slot_is_free():
    clock = FakeClock()
    adm = await saturated(clock)
    waiter = asyncio.create_task(adm.acquire("interactive", clock.now + LONG))
    await settle()
    adm.limit.limit = 3.0  # room now, but someone is waiting: no overtaking on the fast path
    late = asyncio.create_task(adm.acquire("interactive", clock.now + LONG))
    await settle()
    assert not late.done()
    adm.release()
    await settle()
    assert waiter.done() and late.done()
    assert adm.inflight == 3
    await cleanup(adm, waiter, late)


# priorities ------------------------------------------------------------------------------------


async def test_interactive_waiters_go_before_earlier_batch_waiters():
    clock = FakeClock()
    adm = await saturated(clock)
    order: list[str] = []

    async def client(name: str, priority: str) -> None:
        await adm.acquire(priority, clock.now + LONG)
        order.append(name)

    tasks = []
    for name, priority in [("b1", "batch"), ("b2", "batch"), ("i1", "interactive"),
                           ("i2", "interactive")]:
        tasks.append(asyncio.create_task(client(name, priority)))
        await settle(1)
        clock.advance(0.001)
    await settle()
    assert order == []
    for expected in (["i1"], ["i1", "i2"], ["i1", "i2", "b1"], ["i1", "i2", "b1", "b2"]):
        adm.release()
        await settle()
        assert order == expected
        assert adm.inflight == 2
    await cleanup(adm, *tasks)


async def test_overloaded_batch_class_waits_only_the_target_interactive_the_interval():
    clock = FakeClock()
    adm = await saturated(clock, queue_target_s=0.01)
    adm.codels["batch"].overloaded = True
    started = time.monotonic()
    with pytest.raises(Overloaded) as info:
        await promptly(adm.acquire("batch", clock.now + LONG), 0.5)
    assert time.monotonic() - started < 0.2  # the 10 ms target, not the long interval
    assert info.value.status == 503
    assert adm.shed == {"interactive": 0, "batch": 1}
    interactive = asyncio.create_task(adm.acquire("interactive", clock.now + LONG))
    await asyncio.sleep(0.05)
    assert not interactive.done()  # still waiting: its class is calm
    assert adm.queued == 1
    adm.release()
    await settle()
    assert interactive.done() and interactive.exception() is None
    await cleanup(adm, interactive)


async def test_batch_served_on_the_fast_path_even_when_codel_is_overloaded():
    clock = FakeClock()
    adm = admission(clock)
    adm.codels["batch"].overloaded = True
    at_once(adm.acquire("batch", clock.now + LONG))
    assert adm.inflight == 1


async def test_batch_share_of_the_queue_is_capped():
    clock = FakeClock()
    adm = admission(clock, queue_max=4, batch_queue_share=0.5)  # at most 2 batch waiters
    await adm.acquire("interactive", clock.now + LONG)
    await adm.acquire("interactive", clock.now + LONG)
    waiters = [asyncio.create_task(adm.acquire("batch", clock.now + LONG)) for _ in range(2)]
    await settle()
    with pytest.raises(Overloaded):
        at_once(adm.acquire("batch", clock.now + LONG))
    inter = asyncio.create_task(adm.acquire("interactive", clock.now + LONG))
    await settle()
    assert adm.queued == 3 and not inter.done()
    await cleanup(adm, *waiters, inter)


# a full queue ----------------------------------------------------------------------------------


async def test_full_queue_interactive_evicts_the_newest_batch_waiter():
    clock = FakeClock()
    adm = await saturated(clock, queue_max=2, batch_queue_share=1.0)
    older = asyncio.create_task(adm.acquire("batch", clock.now + LONG))
    await settle()
    newer = asyncio.create_task(adm.acquire("batch", clock.now + LONG))
    await settle()
    assert adm.queued == 2
    inter = asyncio.create_task(adm.acquire("interactive", clock.now + LONG))
    await settle()
    assert newer.done() and isinstance(newer.exception(), Overloaded)
    assert not older.done() and not inter.done()
    assert adm.queued == 2
    assert adm.shed == {"interactive": 0, "batch": 1}
    adm.release()
    await settle()
    assert inter.done() and not older.done()  # the interactive one goes first
    adm.release()
    await settle()
    assert older.done() and older.exception() is None
    assert adm.inflight == 2
    await cleanup(adm, older, newer, inter)


@pytest.mark.parametrize("priority", ["batch", "interactive"])
async def test_full_queue_without_batch_waiters_refuses(priority):
    clock = FakeClock()
    adm = await saturated(clock, queue_max=2, batch_queue_share=1.0)
    queued = [asyncio.create_task(adm.acquire("interactive", clock.now + LONG))
              for _ in range(2)]
    await settle()
    with pytest.raises(Overloaded):
        at_once(adm.acquire(priority, clock.now + LONG))
    assert adm.shed[priority] == 1
    assert adm.queued == 2
    assert not any(t.done() for t in queued)
    await cleanup(adm, *queued)


async def test_full_queue_batch_arrival_refused_even_with_batch_waiters():
    clock = FakeClock()
    adm = await saturated(clock, queue_max=2, batch_queue_share=1.0)
    queued = [asyncio.create_task(adm.acquire(p, clock.now + LONG))
              for p in ("interactive", "batch")]
    await settle()
    with pytest.raises(Overloaded):
        at_once(adm.acquire("batch", clock.now + LONG))
    assert not any(t.done() for t in queued)  # nobody was evicted for it
    await cleanup(adm, *queued)


async def test_queue_max_zero_refuses_everything_past_the_limit():
    clock = FakeClock()
    adm = await saturated(clock, queue_max=0)
    for priority in ("interactive", "batch"):
        with pytest.raises(Overloaded):
            at_once(adm.acquire(priority, clock.now + LONG))
    assert adm.queued == 0


# waiting too long ------------------------------------------------------------------------------


async def test_waiter_refused_when_its_allowance_passes():
    clock = FakeClock()
    adm = await saturated(clock, queue_target_s=0.005, queue_interval_s=0.01)
    started = time.monotonic()
    with pytest.raises(Overloaded):
        await promptly(adm.acquire("interactive", clock.now + LONG), 0.5)
    assert time.monotonic() - started < 0.1
    assert adm.queued == 0
    assert adm.inflight == 2
    assert adm.shed["interactive"] == 1
    adm.release()  # the slot is not handed to the one that left
    assert adm.inflight == 1


@pytest.mark.parametrize("deadline_in", [0.0, -1.0], ids=["deadline-now", "deadline-passed"])
async def test_waiter_with_no_time_left_refused_at_once(deadline_in):
    clock = FakeClock()
    adm = admission(clock)  # the queue would allow 10 s; the deadline allows nothing
    await adm.acquire("interactive", clock.now + LONG)
    await adm.acquire("interactive", clock.now + LONG)
    started = time.monotonic()
    with pytest.raises(Overloaded):
        await promptly(adm.acquire("interactive", clock.now + deadline_in), 0.5)
    assert time.monotonic() - started < 0.05
    assert adm.queued == 0


async def test_dequeue_feeds_codel_with_the_fake_clock_wait():
    clock = FakeClock()
    adm = await saturated(clock, queue_target_s=0.005, queue_interval_s=LONG)
    tasks = [asyncio.create_task(adm.acquire("interactive", clock.now + LONG)) for _ in range(2)]
    await settle()
    clock.advance(0.5)
    adm.release()
    await settle()
    assert adm.codels["interactive"].first_above_at == clock.now  # waited 0.5 s > 5 ms target
    adm.release()
    await settle()
    assert adm.codels["interactive"].empty_since == clock.now  # the queue drained
    await cleanup(adm, *tasks)


# cancellation --------------------------------------------------------------------------------


async def test_cancelled_waiter_leaves_the_queue():
    clock = FakeClock()
    adm = await saturated(clock)
    waiter = asyncio.create_task(adm.acquire("interactive", clock.now + LONG))
    await settle()
    waiter.cancel()
    await settle()
    assert waiter.cancelled()
    assert adm.queued == 0
    adm.release()
    adm.release()
    assert adm.inflight == 0


async def test_cancelled_waiter_that_was_just_handed_a_slot_passes_it_on():
    clock = FakeClock()
    adm = await saturated(clock)
    doomed = asyncio.create_task(adm.acquire("interactive", clock.now + LONG))
    await settle()
    nxt = asyncio.create_task(adm.acquire("interactive", clock.now + LONG))
    await settle()
    try:
        doomed.cancel()  # cancelled, and before it runs again ...
        adm.release()  # ... the freed slot is handed to it
        await settle()
        assert doomed.cancelled()
        assert nxt.done() and nxt.exception() is None  # it passed the slot on
        assert adm.inflight == 2
        adm.release()
        adm.release()
        assert adm.inflight == 0
        assert adm.queued == 0
    finally:
        await cleanup(adm, doomed, nxt)


async def test_waiter_cancelled_just_after_the_handover_is_still_cancelled():
    clock = FakeClock()
    adm = await saturated(clock)
    doomed = asyncio.create_task(adm.acquire("interactive", clock.now + LONG))
    await settle()
    nxt = asyncio.create_task(adm.acquire("interactive", clock.now + LONG))
    await settle()
    try:
        adm.release()  # the freed slot is handed to `doomed` ...
        doomed.cancel()  # ... which is cancelled before it runs again
        await settle()
        assert doomed.cancelled()
        assert nxt.done() and nxt.exception() is None
        assert adm.inflight == 2
    finally:
        await cleanup(adm, doomed, nxt)
        if not doomed.cancelled() and doomed.exception() is None:
            adm.release()  # it kept the slot: give it back so the accounting stays whole


async def test_inflight_consistent_after_a_mixed_run():
    clock = FakeClock()
    adm = admission(clock, queue_max=3, batch_queue_share=1.0)
    holders = 0
    for _ in range(2):
        await adm.acquire("interactive", clock.now + LONG)
        holders += 1
    tasks = {
        "b1": asyncio.create_task(adm.acquire("batch", clock.now + LONG)),
        "i1": asyncio.create_task(adm.acquire("interactive", clock.now + LONG)),
        "b2": asyncio.create_task(adm.acquire("batch", clock.now + LONG)),
    }
    await settle()
    tasks["i2"] = asyncio.create_task(adm.acquire("interactive", clock.now + LONG))  # evicts b2
    await settle()
    tasks["i1"].cancel()  # cancelled while waiting
    await settle()
    for _ in range(4):  # every holder, old and new, releases once it has its slot
        adm.release()
        holders -= 1
        await settle()
        for name, t in list(tasks.items()):
            if t.done():
                del tasks[name]
                if not t.cancelled() and t.exception() is None:
                    holders += 1
    assert not tasks
    assert adm.inflight == holders
    for _ in range(holders):
        adm.release()
    assert adm.inflight == 0
    assert adm.queued == 0


# rejecting at once, and why ----------------------------------------------------------------


def measured(adm: Admission, rtt_s: float) -> None:
    """One response seen: the round trip the expected-wait estimate uses."""
    adm.on_sample(queue_s=0.0, service_s=rtt_s, batched=False, rtt_s=rtt_s)


async def test_a_request_that_would_wait_out_its_allowance_is_refused_at_once():
    clock = FakeClock()
    adm = admission(clock, queue_interval_s=0.1, interactive_queue_target_s=0.1)
    measured(adm, 0.2)  # slots free up every 0.2 s / limit 2 = 0.1 s
    await adm.acquire("interactive", clock.now + LONG)
    await adm.acquire("interactive", clock.now + LONG)
    first = asyncio.create_task(adm.acquire("interactive", clock.now + LONG))
    await settle()
    assert adm.queued == 1  # first in line: the next slot is its own
    with pytest.raises(Overloaded) as info:
        at_once(adm.acquire("interactive", clock.now + LONG))  # 2 × 0.1 s > 0.1 s
    assert info.value.reason == "at_once" and info.value.retry_after_s >= 1
    assert adm.queued == 1
    adm.release()
    await settle()
    assert first.done() and first.exception() is None
    await cleanup(adm, first)


async def test_first_in_line_waits_its_allowance_when_a_slow_moment_inflates_the_estimate():
    """A round trip of 1 s (a moment's slowness) says one slot every 0.5 s, over the 0.1 s
    allowance: the first in line still waits (the next slot is its own) and gets the slot
    freed within its allowance; the one behind it is refused at once; an unfreed allowance
    still ends in a 503."""
    clock = FakeClock()
    adm = admission(clock, queue_interval_s=0.1, interactive_queue_target_s=0.1)
    measured(adm, 1.0)
    await adm.acquire("interactive", clock.now + LONG)
    await adm.acquire("interactive", clock.now + LONG)
    first = asyncio.create_task(adm.acquire("interactive", clock.now + LONG))
    await settle()
    assert adm.queued == 1
    with pytest.raises(Overloaded) as behind:
        at_once(adm.acquire("interactive", clock.now + LONG))
    assert behind.value.reason == "at_once"
    adm.release()
    await settle()
    assert first.done() and first.exception() is None
    late = asyncio.create_task(adm.acquire("interactive", clock.now + LONG))
    await settle()
    assert adm.queued == 1
    await asyncio.sleep(0.15)  # its 0.1 s allowance passes with no slot freed (the timer
    # runs on the loop's clock): refused, having waited
    await settle()
    assert late.done() and isinstance(late.exception(), Overloaded)
    assert late.exception().reason == "waited"
    await cleanup(adm)


async def test_nothing_measured_yet_means_the_request_queues():
    clock = FakeClock()
    adm = await saturated(clock, queue_interval_s=0.1)
    tasks = [asyncio.create_task(adm.acquire("interactive", clock.now + LONG)) for _ in range(3)]
    await settle()
    assert adm.queued == 3
    await cleanup(adm, *tasks)


async def test_the_interactive_target_follows_half_an_unloaded_round_trip():
    clock = FakeClock()
    adm = admission(clock, interactive_queue_target_s=0.1)
    measured(adm, 0.030)
    measured(adm, 0.020)
    measured(adm, 0.050)
    assert adm.codels["interactive"].target_s == pytest.approx(0.010)
    measured(adm, 0.5)  # never above the configured target
    assert adm.codels["interactive"].target_s <= 0.1
    assert adm.codels["batch"].target_s == LONG  # the batch class keeps its own


async def test_shed_reasons_name_the_rule():
    clock = FakeClock()
    adm = await saturated(clock, queue_max=0)
    with pytest.raises(Overloaded) as full:
        at_once(adm.acquire("interactive", clock.now + LONG))
    assert full.value.reason == "queue_full"
    adm.shed_batch_until = clock.now + 60
    with pytest.raises(Overloaded) as shed:
        at_once(adm.acquire("batch", clock.now + LONG))
    assert shed.value.reason == "shed_batch"


@pytest.mark.parametrize(
    ("interactive_per_s", "completed_per_s", "shed"),
    [
        (60, 100, False),  # batch traffic holds the slots: interactive at 60 % is not shed
        (5, 0, False),  # light load, nothing completing lately: limit / rtt = 100/s
        (95, 100, True),  # interactive alone at capacity
        (300, 100, True),  # interactive alone at 3x
    ],
)
async def test_a_standing_interactive_line_is_shed_only_when_interactive_alone_overloads(
        interactive_per_s, completed_per_s, shed):
    clock = FakeClock()
    adm = admission(clock, queue_interval_s=1.0, interactive_queue_target_s=0.005)
    measured(adm, 0.02)  # limit 2 / 0.02 s: slots free at 100/s, one every 10 ms
    await adm.acquire("batch", clock.now + LONG)
    await adm.acquire("batch", clock.now + LONG)
    line = [asyncio.create_task(adm.acquire("interactive", clock.now + LONG)) for _ in range(2)]
    await settle()
    assert len(adm.queues["interactive"]) == 2  # a line of two: standing, or a batch cycle
    adm.codels["interactive"].overloaded = True  # its waits were over the 5 ms target
    adm.interactive_arrivals.count, adm.interactive_arrivals.at = interactive_per_s, clock.now
    adm.completions.count, adm.completions.at = completed_per_s, clock.now
    third = adm.acquire("interactive", clock.now + LONG)  # would wait 3 × 10 ms
    if shed:
        with pytest.raises(Overloaded) as info:
            at_once(third)
        assert info.value.reason == "at_once"
        await cleanup(adm, *line)
    else:
        task = asyncio.create_task(third)  # the calm allowance: it waits its turn
        await settle()
        assert len(adm.queues["interactive"]) == 3 and not task.done()
        await cleanup(adm, *line, task)


async def test_a_stalled_gateway_loop_does_not_spend_a_waiters_allowance():
    # the expiry timer fires 0.2 s late by the clock: the gateway itself did not run, and the
    # reply that frees a slot is read after the timer. The waiter keeps its place, once.
    # (The timers are driven by hand: the real ones are LONG.)
    clock = FakeClock()
    adm = await saturated(clock)
    waiter = asyncio.create_task(adm.acquire("interactive", clock.now + LONG))
    await settle()
    queued = adm.queues["interactive"][0]
    due = clock.now + 0.01
    clock.advance(0.2)  # the stall, as the clock saw it
    adm._expire("interactive", queued, due)
    assert not waiter.done() and adm.queued == 1 and queued.extended
    adm.release()  # the reply read after the stall hands its slot over
    await settle()
    assert waiter.done() and waiter.exception() is None
    assert adm.shed["interactive"] == 0
    # given once: a second late timer sheds it
    late = asyncio.create_task(adm.acquire("interactive", clock.now + LONG))
    await settle()
    queued = adm.queues["interactive"][0]
    for _ in range(2):
        clock.advance(0.2)
        adm._expire("interactive", queued, clock.now - 0.2)
    with pytest.raises(Overloaded) as info:
        await promptly(late, 0.5)
    assert info.value.reason == "waited"
    # a timer on time sheds at once
    on_time = asyncio.create_task(adm.acquire("interactive", clock.now + LONG))
    await settle()
    adm._expire("interactive", adm.queues["interactive"][0], clock.now)
    with pytest.raises(Overloaded):
        await promptly(on_time, 0.5)


async def test_an_overloaded_class_gets_no_stall_grace():
    clock = FakeClock()
    adm = await saturated(clock, queue_target_s=LONG / 2)
    adm.codels["batch"].overloaded = True  # batch traffic alone overloads: short allowance
    waiter = asyncio.create_task(adm.acquire("batch", clock.now + LONG))
    await settle()
    queued = adm.queues["batch"][0]
    clock.advance(0.2)
    adm._expire("batch", queued, clock.now - 0.2)  # late, but its class sheds on its clock
    with pytest.raises(Overloaded) as info:
        await promptly(waiter, 0.5)
    assert info.value.reason == "waited"


async def test_ongoing_area_integrates_in_flight_and_queued_over_time():
    # the autoscaler's demand: ∫ (in flight + queued) dt, exact between changes
    clock = FakeClock()
    adm = admission(clock)
    assert adm.ongoing_area() == 0.0
    await adm.acquire("interactive", clock.now + LONG)
    await adm.acquire("interactive", clock.now + LONG)
    clock.advance(1.0)  # 2 in flight for 1 s
    third = asyncio.create_task(adm.acquire("interactive", clock.now + LONG))
    await settle()
    clock.advance(0.5)  # 2 in flight + 1 queued for 0.5 s
    assert adm.ongoing_area() == pytest.approx(2.0 + 1.5)
    adm.release()  # the queued one takes the slot: still 2
    await settle()
    clock.advance(1.0)
    adm.release()
    adm.release()
    clock.advance(5.0)  # idle adds nothing
    assert third.done() and adm.ongoing_area() == pytest.approx(3.5 + 2.0)


async def test_while_replicas_start_for_the_demand_interactive_waiters_wait_for_them():
    clock = FakeClock()
    # without a scale-up, a waiter gets the calm allowance (50 ms here) and is then shed
    adm = await saturated(clock, queue_interval_s=0.05)
    shed = asyncio.create_task(adm.acquire("interactive", clock.now + 30))
    await asyncio.sleep(0.2)
    assert shed.done() and isinstance(shed.exception(), Shed)
    # with replicas starting (the autoscaler said so), it waits for a slot instead
    adm = await saturated(clock, queue_interval_s=0.05)
    adm.scaling_up_until = clock.now + 5
    waiting = asyncio.create_task(adm.acquire("interactive", clock.now + 30))
    batch = asyncio.create_task(adm.acquire("batch", clock.now + 30))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    assert batch.done() and isinstance(batch.exception(), Shed)  # batch traffic still yields
    adm.release()
    await settle()
    assert waiting.done() and waiting.exception() is None
    # past the time the replicas were due, the usual rules again
    clock.advance(6)
    late = asyncio.create_task(adm.acquire("interactive", clock.now + 30))
    await asyncio.sleep(0.2)
    assert late.done() and isinstance(late.exception(), Shed)
