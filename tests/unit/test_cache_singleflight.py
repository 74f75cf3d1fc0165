"""cache/singleflight.py: N concurrent identical misses → one upstream call, and a leader that
fails or goes away never fails (or hangs) its waiters.

`get` below drives Singleflight exactly as gateway/cached.py's `_fill` / `_lead` do for one
key: claim; the leader calls upstream then resolves (or abandons on any failure, and raises to
its own caller); a waiter waits, and on LeaderGone tries again; in the last round it stops
waiting on others and calls upstream itself.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from steadyserve.cache.singleflight import LeaderGone, Singleflight
from steadyserve.gateway.cached import MAX_ROUNDS

pytestmark = pytest.mark.asyncio

N = 1000


async def get(sf: Singleflight, key: str, upstream: Callable[[str], Awaitable[Any]]) -> Any:
    """The protocol as gateway/cached.py runs it: lead or wait; a waiter whose leader went away
    tries again, at most MAX_ROUNDS leaders, then answers with the last leader's error."""
    last: Exception | None = None
    for _ in range(MAX_ROUNDS):
        led, joined = sf.claim([key])
        if led:
            try:
                value = await upstream(key)
            except BaseException as exc:
                sf.abandon(led, error=exc if isinstance(exc, Exception) else None, attributable=True)
                raise
            sf.resolve(key, value)
            return value
        try:
            return await Singleflight.wait(joined[key])
        except LeaderGone as gone:
            last = gone.error or last
    assert last is not None
    raise last


class Upstream:
    """Counts calls; each waits for `gate`; the calls numbered in `fail` raise."""

    def __init__(self, *, fail: tuple[int, ...] = (), always_fail: bool = False) -> None:
        self.calls = 0
        self.gate = asyncio.Event()
        self.fail = fail
        self.always_fail = always_fail
        self.started = asyncio.Event()

    async def __call__(self, key: str) -> str:
        self.calls += 1
        n = self.calls
        self.started.set()
        await self.gate.wait()
        await asyncio.sleep(0)
        if self.always_fail or n in self.fail:
            raise RuntimeError(f"upstream call {n} failed")
        return f"value-of-{key}"


async def settle(rounds: int = 5) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


async def test_1000_identical_concurrent_requests_make_one_upstream_call():
    sf = Singleflight()
    up = Upstream()
    tasks = [asyncio.ensure_future(get(sf, "k", up)) for _ in range(N)]
    await settle()
    assert up.calls == 1 and len(sf) == 1
    up.gate.set()
    results = await asyncio.gather(*tasks)
    assert results == ["value-of-k"] * N
    assert up.calls == 1
    assert sf.coalesced == N - 1
    assert len(sf) == 0  # resolved flights are forgotten: the next miss calls upstream again
    assert await get(sf, "k", up) == "value-of-k" and up.calls == 2


async def test_different_keys_do_not_coalesce():
    sf = Singleflight()
    up = Upstream()
    up.gate.set()
    results = await asyncio.gather(*(get(sf, f"k{i % 10}", up) for i in range(100)))
    assert results == [f"value-of-k{i % 10}" for i in range(100)]
    assert up.calls == 10


async def test_a_failed_leader_wakes_its_waiters_and_one_becomes_the_next_leader():
    sf = Singleflight()
    up = Upstream(fail=(1,))
    leader = asyncio.ensure_future(get(sf, "k", up))
    await up.started.wait()
    waiters = [asyncio.ensure_future(get(sf, "k", up)) for _ in range(N)]
    await settle()
    up.gate.set()
    with pytest.raises(RuntimeError, match="upstream call 1 failed"):
        await leader  # the leader's own caller hears its failure
    assert await asyncio.gather(*waiters) == ["value-of-k"] * N
    assert up.calls == 2
    assert len(sf) == 0


async def test_a_cancelled_leader_does_not_fail_its_waiters():
    sf = Singleflight()
    up = Upstream()
    leader = asyncio.ensure_future(get(sf, "k", up))
    await up.started.wait()
    waiters = [asyncio.ensure_future(get(sf, "k", up)) for _ in range(N)]
    await settle()
    leader.cancel()  # its client hung up
    await settle()
    assert leader.cancelled()
    assert not any(w.done() for w in waiters)
    assert up.calls == 2  # a waiter took over as leader
    up.gate.set()
    assert await asyncio.gather(*waiters) == ["value-of-k"] * N
    assert up.calls == 2


async def test_a_cancelled_waiter_does_not_cancel_the_shared_flight():
    sf = Singleflight()
    up = Upstream()
    leader = asyncio.ensure_future(get(sf, "k", up))
    await up.started.wait()
    waiters = [asyncio.ensure_future(get(sf, "k", up)) for _ in range(10)]
    await settle()
    waiters[0].cancel()
    await settle()
    assert waiters[0].cancelled()
    assert len(sf) == 1 and not leader.done()
    up.gate.set()
    assert await leader == "value-of-k"
    assert await asyncio.gather(*waiters[1:]) == ["value-of-k"] * 9
    assert up.calls == 1


async def test_a_waiter_keeps_its_own_deadline():
    sf = Singleflight()
    up = Upstream()
    leader = asyncio.ensure_future(get(sf, "k", up))
    await up.started.wait()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(get(sf, "k", up), timeout=0.01)
    assert not leader.done()
    up.gate.set()
    assert await leader == "value-of-k"


async def test_an_always_failing_upstream_is_not_stampeded():
    sf = Singleflight()
    up = Upstream(always_fail=True)
    up.gate.set()
    results = await asyncio.gather(*(get(sf, "k", up) for _ in range(N)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)  # nobody hangs
    assert len(sf) == 0
    assert up.calls <= MAX_ROUNDS


async def test_an_always_failing_upstream_fails_everyone_and_leaves_no_flight_behind():
    sf = Singleflight()
    up = Upstream(always_fail=True)
    up.gate.set()
    results = await asyncio.wait_for(
        asyncio.gather(*(get(sf, "k", up) for _ in range(50)), return_exceptions=True), timeout=5)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert len(sf) == 0


# the primitives ---------------------------------------------------------------------------------


async def test_claim_in_groups_leads_the_new_keys_and_joins_the_others():
    sf = Singleflight()
    led, joined = sf.claim(["a", "b"])
    assert led == ["a", "b"] and joined == {}
    led2, joined2 = sf.claim(["b", "c", "a"])
    assert led2 == ["c"] and set(joined2) == {"a", "b"}
    assert sf.coalesced == 2
    sf.resolve("a", 1)
    sf.abandon(["b"])
    sf.resolve("c", 3)
    assert await Singleflight.wait(joined2["a"]) == 1
    with pytest.raises(LeaderGone):
        await Singleflight.wait(joined2["b"])
    assert len(sf) == 0


async def test_resolve_and_abandon_of_unknown_keys_are_no_ops():
    sf = Singleflight()
    sf.resolve("nope", 1)
    sf.abandon(["nope"])
    sf.claim(["k"])
    sf.resolve("k", 1)
    sf.resolve("k", 2)  # twice: the second is ignored
    sf.abandon(["k"])
    assert len(sf) == 0


async def test_abandon_without_waiters_logs_no_unretrieved_exception():
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        sf = Singleflight()
        sf.claim(["k"])
        sf.abandon(["k"])
        del sf
        gc.collect()
        await settle()
    finally:
        loop.set_exception_handler(previous)
    assert errors == []
