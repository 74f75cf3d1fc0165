"""The replica's batcher on a real event loop: gather while busy, one result per item,
errors to every caller, cancelled and expired items never computed."""

from __future__ import annotations

import asyncio
import time

import pytest

from steadyserve.errors import HandlerFailed, ReplicaTimeout
from steadyserve.replica.batcher import Batcher
from steadyserve.replica.runner import Runner

from .services import Gate

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def runner():
    r = Runner()
    yield r
    r.shutdown()


async def _started(fn, runner, **kw) -> Batcher:
    b = Batcher(fn, runner, max_batch_size=kw.pop("max_batch_size", 64),
                max_wait_s=kw.pop("max_wait_s", 0.0), **kw)
    b.start()
    return b


async def test_runs_at_once_when_idle_and_gathers_while_busy(runner):
    svc = Gate()
    svc.setup()
    b = await _started(svc.work, runner)
    first = asyncio.create_task(b.submit([1]))
    await asyncio.sleep(0.05)  # the first batch is now computing (blocked on the gate)
    rest = [asyncio.create_task(b.submit([i])) for i in range(2, 12)]
    await asyncio.sleep(0.05)
    svc.gate.set()
    assert await first == [10]
    assert [await t for t in rest] == [[i * 10] for i in range(2, 12)]
    assert svc.batches == [[1], list(range(2, 12))]
    await b.stop()


async def test_caps_batches_by_size(runner):
    svc = Gate()
    svc.setup()
    svc.gate.set()
    b = await _started(svc.work, runner, max_batch_size=4)
    assert await b.submit(list(range(10))) == [i * 10 for i in range(10)]
    assert [len(x) for x in svc.batches] == [4, 4, 2]
    await b.stop()


async def test_max_wait_lets_a_batch_fill_before_running(runner):
    svc = Gate()
    svc.setup()
    svc.gate.set()
    b = await _started(svc.work, runner, max_batch_size=8, max_wait_s=0.2)
    tasks = [asyncio.create_task(b.submit([i])) for i in range(3)]
    await asyncio.sleep(0.05)
    tasks += [asyncio.create_task(b.submit([i])) for i in range(3, 8)]  # fills the batch
    await asyncio.gather(*tasks)
    assert svc.batches == [list(range(8))]
    await b.stop()


async def test_a_failing_batch_fails_every_caller_and_the_batcher_lives_on(runner):
    calls = []

    def flaky(items):
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("model exploded")
        return items

    b = await _started(flaky, runner)
    results = await asyncio.gather(*(b.submit([i]) for i in range(3)), return_exceptions=True)
    assert any(isinstance(r, HandlerFailed) and "model exploded" in str(r) for r in results)
    assert await b.submit([7]) == [7]
    await b.stop()


@pytest.mark.parametrize("bad", [lambda items: items[:-1], lambda items: "oops", lambda items: None],
                         ids=["one-short", "string", "none"])
async def test_a_batch_must_return_one_result_per_item(runner, bad):
    b = await _started(bad, runner)
    with pytest.raises(HandlerFailed):
        await b.submit([1, 2])
    await b.stop()


async def test_cancelled_callers_items_are_never_computed(runner):
    svc = Gate()
    svc.setup()
    b = await _started(svc.work, runner)
    first = asyncio.create_task(b.submit([1]))
    await asyncio.sleep(0.05)
    doomed = asyncio.create_task(b.submit([99]))
    kept = asyncio.create_task(b.submit([2]))
    await asyncio.sleep(0.01)
    doomed.cancel()
    svc.gate.set()
    await first
    assert await kept == [20]
    assert [99] not in svc.batches and all(99 not in batch for batch in svc.batches)
    await b.stop()


async def test_items_past_their_deadline_are_dropped_before_compute(runner):
    svc = Gate()
    svc.setup()
    b = await _started(svc.work, runner)
    first = asyncio.create_task(b.submit([1]))
    await asyncio.sleep(0.05)
    late = asyncio.create_task(b.submit([5], deadline=time.monotonic() + 0.01))
    await asyncio.sleep(0.05)
    svc.gate.set()
    await first
    with pytest.raises(ReplicaTimeout):
        await late
    assert all(5 not in batch for batch in svc.batches)
    assert b.stats.dropped_expired == 1
    await b.stop()


async def test_the_queue_is_bounded_and_refuses_with_overloaded(runner):
    from steadyserve.errors import Overloaded

    svc = Gate()
    svc.setup()
    b = await _started(svc.work, runner, max_queue=4)
    first = asyncio.create_task(b.submit([1]))  # computing, blocked on the gate
    await asyncio.sleep(0.05)
    queued = asyncio.create_task(b.submit([2, 3, 4]))
    await asyncio.sleep(0.01)
    with pytest.raises(Overloaded):
        await b.submit([5, 6])
    svc.gate.set()
    assert await first == [10] and await queued == [20, 30, 40]
    await b.stop()


async def test_it_counts_whole_batches_a_request_sat_out(runner):
    svc = Gate()
    svc.setup()
    b = await _started(svc.work, runner, max_batch_size=2)
    first = asyncio.create_task(b.submit_timed([1]))  # batch 1 computes, gate closed
    await asyncio.sleep(0.05)
    rest = [asyncio.create_task(b.submit_timed([i])) for i in range(2, 7)]
    await asyncio.sleep(0.01)
    svc.gate.set()
    (_, t1), *timed = [await first] + [await t for t in rest]
    missed = [t.missed_batches for _, t in timed]
    assert t1.missed_batches == 0
    # items 2,3 join batch 2 (they only waited out batch 1); 4,5 sit out batch 2; 6 sits out 2 and 3
    assert missed == [0, 0, 1, 1, 2]
    await b.stop()


async def test_stopping_fails_queued_requests_as_the_replicas_fault(runner):
    """Queued work a stopping replica never ran is retried elsewhere by the gateway: it is
    ReplicaUnavailable (the replica's doing), not HandlerFailed (the request's)."""
    from steadyserve.errors import ReplicaUnavailable

    svc = Gate()
    svc.setup()
    b = await _started(svc.work, runner, max_batch_size=1)
    first = asyncio.create_task(b.submit([1]))  # computing, blocked on the gate
    await asyncio.sleep(0.05)
    queued = asyncio.create_task(b.submit([2]))
    await asyncio.sleep(0.01)
    await b.stop()
    svc.gate.set()
    with pytest.raises(ReplicaUnavailable, match="shutting down") as info:
        await queued
    assert info.value.code == "replica_unavailable"
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
