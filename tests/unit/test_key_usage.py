"""Per-key usage in memory: counting by key and deployment, taking and merging (a worker's
report, a failed flush), the bound on entries, a worker's report checked, the flush loop
keeping what it could not store, and a reader seeing every count once while a flush writes."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from steadyserve.auth.usage import OVERFLOW_KEY, UsageFlusher, UsageMeter, from_wire, to_wire
from steadyserve.store import DatabaseUnavailable


def test_requests_errors_and_refusals_are_counted_per_key_and_deployment() -> None:
    m = UsageMeter()
    for status, t in [(200, 1.0), (503, 2.0), (429, 3.0), (200, 4.0)]:
        m.record("k1", "echo", status, t)
    m.record("k1", "risk", 200, 5.0)
    m.record("k2", "echo", 400, 6.0)
    assert m.counts == {("k1", "echo"): [4, 1, 1, 4.0], ("k1", "risk"): [1, 0, 0, 5.0],
                        ("k2", "echo"): [1, 0, 1, 6.0]}
    taken = m.take()
    assert len(taken) == 3 and m.counts == {}
    m.merge(taken)
    m.merge({("k1", "echo"): [2, 0, 0, 3.0]})  # an older report: last seen stays the latest
    assert m.counts[("k1", "echo")] == [6, 1, 1, 4.0]


def test_keys_beyond_the_bound_are_counted_under_one_key() -> None:
    m = UsageMeter(max_entries=2)
    for key in ("a", "b", "c", "d"):
        m.record(key, "echo", 200, 1.0)
    assert m.counts == {("a", "echo"): [1, 0, 0, 1.0], ("b", "echo"): [1, 0, 0, 1.0],
                        (OVERFLOW_KEY, "echo"): [2, 0, 0, 1.0]}
    assert m.overflowed == 2
    m.merge({("e", "echo"): [5, 0, 0, 2.0]})
    assert m.counts[(OVERFLOW_KEY, "echo")] == [7, 0, 0, 2.0]


@pytest.mark.parametrize(("wire", "expected"), [
    ([["k", "echo", 3, 1, 0, 9.5]], {("k", "echo"): [3.0, 1.0, 0.0, 9.5]}),
    ("not a list", {}),
    ([["k", "echo", 3, 1, 0]], {}),  # a field missing
    ([["k", "echo", -3, 1, 0, 1.0]], {}),  # negative
    ([["k", 7, 3, 1, 0, 1.0]], {}),  # a deployment that is not text
    ([["k", "echo", "3", 1, 0, 1.0]], {}),
    ([["k", f"d{i}", 1, 0, 0, 1.0] for i in range(10)], {("k", f"d{i}"): [1.0, 0.0, 0.0, 1.0]
                                                          for i in range(4)}),  # at most 4
])
def test_a_workers_report_is_checked(wire: Any, expected: dict[Any, Any]) -> None:
    assert from_wire(wire, max_rows=4) == expected


def test_to_wire_and_back() -> None:
    counts = {("k", "echo"): [3.0, 1.0, 0.0, 9.5]}
    assert from_wire(to_wire(counts), 10) == counts


class FakeStore:
    def __init__(self) -> None:
        self.down = False
        self.added: list[tuple[dict[Any, Any], float]] = []
        self.pruned: list[float] = []

    def add(self, counts: dict[Any, Any], now: float) -> None:
        if self.down:
            raise DatabaseUnavailable("down")
        self.added.append(({k: list(v) for k, v in counts.items()}, now))

    def prune(self, before: float) -> None:
        if self.down:
            raise DatabaseUnavailable("down")
        self.pruned.append(before)


def test_a_flush_that_fails_keeps_the_counts_for_the_next() -> None:
    meter, store = UsageMeter(), FakeStore()
    clock = [100_000.0]
    flusher = UsageFlusher(meter, store, 10, retention_days=2, wall=lambda: clock[0])
    meter.record("k", "echo", 200, 1.0)
    store.down = True
    asyncio.run(flusher.flush())
    assert store.added == [] and meter.counts == {("k", "echo"): [1, 0, 0, 1.0]}
    meter.record("k", "echo", 500, 2.0)
    store.down = False
    clock[0] += 10
    asyncio.run(flusher.flush())
    assert store.added == [({("k", "echo"): [2, 1, 0, 2.0]}, 100_010.0)]
    assert store.pruned == [100_010.0 - 2 * 86_400] and meter.counts == {}
    clock[0] += 10
    asyncio.run(flusher.flush())  # nothing counted: nothing written; pruned once an hour
    assert len(store.added) == 1 and len(store.pruned) == 1


def test_a_reader_during_a_flush_sees_each_count_once() -> None:
    """The flush has taken the counts and its write has not committed: a reader then saw them
    neither in memory nor in the database. It waits for the flush now, and reads them once."""
    meter = UsageMeter()
    written, release = threading.Event(), threading.Event()

    class SlowStore(FakeStore):
        def add(self, counts: dict[Any, Any], now: float) -> None:
            written.set()
            assert release.wait(5)
            super().add(counts, now)

    store = SlowStore()
    flusher = UsageFlusher(meter, store, 10, retention_days=2, wall=lambda: 0.0)

    def total(pending: dict[Any, Any]) -> float:
        stored = sum(c[("k", "echo")][0] for c, _ in store.added if ("k", "echo") in c)
        return stored + sum(c[0] for c in pending.values())

    async def scenario() -> tuple[float, float]:
        meter.record("k", "echo", 200, 1.0)
        flush = asyncio.create_task(flusher.flush())
        assert await asyncio.to_thread(written.wait, 5)  # taken, not yet stored
        assert meter.counts == {}
        meter.record("k", "echo", 200, 2.0)  # counted while the write runs
        reader = asyncio.create_task(flusher.read(total))
        await asyncio.sleep(0.05)
        assert not reader.done()  # it waits for the flush
        release.set()
        await flush
        during = await reader
        return during, await flusher.read(total)

    assert asyncio.run(scenario()) == (2, 2)
