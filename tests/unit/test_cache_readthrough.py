"""cache/readthrough.py: ReadThrough, the synchronous thread-safe cache services put in front of
a database: hits, coalesced loads, absent keys, bounded retries, bounded waits on another
caller's load, invalidation races, bounded invalidation memory, capacity 0."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from steadyserve.cache.readthrough import ReadThrough
from steadyserve.errors import DependencyUnavailable, to_http
from steadyserve.testing import FakeClock

THREADS = 50


class DbDown(Exception):
    """The loader's retryable failure (DatabaseUnavailable in the risk example)."""


class Loader:
    """A fake table: rows for the keys in `rows`; records every call; may fail or block."""

    def __init__(self, rows: Mapping[int, Any] | None = None, *, fail_first: int = 0,
                 always_fail: bool = False, error: type[BaseException] = DbDown) -> None:
        self.rows = dict(rows if rows is not None else {i: {"id": i, "v": i * 10} for i in range(100)})
        self.calls: list[list[int]] = []
        self.fail_first = fail_first
        self.always_fail = always_fail
        self.error = error
        self.gate: threading.Event | None = None
        self.lock = threading.Lock()

    def __call__(self, keys: list[int]) -> dict[int, Any]:
        with self.lock:
            self.calls.append(list(keys))
            n = len(self.calls)
        if self.gate is not None:
            assert self.gate.wait(10), "test never opened the gate"
        if self.always_fail or n <= self.fail_first:
            raise self.error(f"load {n} failed")
        return {k: self.rows[k] for k in keys if k in self.rows}


class Sleeps:
    def __init__(self) -> None:
        self.pauses: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.pauses.append(seconds)


def make(clock: FakeClock | None = None, *, capacity: int = 1 << 20, ttl_s: float = 60.0,
         attempts: int = 3, **kw: Any) -> ReadThrough[int, Any]:
    return ReadThrough(name="features", capacity_bytes=capacity, ttl_s=ttl_s, retry_on=(DbDown,),
                       attempts=attempts, backoff_s=0.05, clock=clock or FakeClock(), sleep=Sleeps(),
                       **kw)


def account_tags(key: int) -> Iterable[str]:
    return [f"account:{key}"]


def wait_until(predicate: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.001)


# hits and misses --------------------------------------------------------------------------------


def test_first_call_loads_the_missing_keys_the_second_is_served_from_cache():
    rt = make()
    load = Loader()
    assert rt.get_many([1, 2, 3], load) == {k: load.rows[k] for k in (1, 2, 3)}
    assert rt.get_many([3, 2, 1], load) == {k: load.rows[k] for k in (1, 2, 3)}
    assert load.calls == [[1, 2, 3]]
    assert rt.get_many([2, 4, 2], load) == {2: load.rows[2], 4: load.rows[4]}
    assert load.calls == [[1, 2, 3], [4]]  # only the missing key, once despite the duplicate
    s = rt.stats()
    assert (s["entries"], s["loads"], s["hits"]) == (4, 2, 4)
    assert s["bytes"] > 0 and s["name"] == "features" and s["enabled"]


def test_entries_expire_after_ttl():
    clock = FakeClock()
    rt = make(clock, ttl_s=10)
    load = Loader()
    rt.get_many([1], load)
    clock.advance(9.99)
    rt.get_many([1], load)
    assert len(load.calls) == 1
    clock.advance(0.01)
    rt.get_many([1], load)
    assert len(load.calls) == 2


def test_missing_keys_are_absent_and_not_cached():
    rt = make()
    load = Loader(rows={1: "one"})
    assert rt.get_many([1, 404], load) == {1: "one"}
    assert rt.get_many([1, 404], load) == {1: "one"}
    assert load.calls == [[1, 404], [404]]  # 404 asked again: no negative caching
    load.rows[404] = "now exists"
    assert rt.get_many([404], load) == {404: "now exists"}
    assert rt.stats()["entries"] == 2


def test_50_threads_asking_one_key_with_a_slow_loader_make_one_load():
    rt = make()
    load = Loader()
    load.gate = threading.Event()
    with ThreadPoolExecutor(THREADS) as pool:
        futures = [pool.submit(rt.get_many, [7], load) for _ in range(THREADS)]
        wait_until(lambda: rt.coalesced == THREADS - 1)
        load.gate.set()
        results = [f.result(timeout=5) for f in futures]
    assert results == [{7: load.rows[7]}] * THREADS
    assert load.calls == [[7]]
    assert rt.stats()["loads"] == 1


def test_overlapping_key_sets_from_many_threads_load_each_key_once():
    rt = make()
    load = Loader()
    load.gate = threading.Event()
    sets = [[i % 5, (i + 1) % 5, 10 + i % 3] for i in range(THREADS)]
    with ThreadPoolExecutor(THREADS) as pool:
        futures = [pool.submit(rt.get_many, keys, load) for keys in sets]
        time.sleep(0.05)  # let them claim (correctness does not depend on it)
        load.gate.set()
        results = [f.result(timeout=5) for f in futures]
    for keys, got in zip(sets, results, strict=True):
        assert got == {k: load.rows[k] for k in keys}
    loaded = [k for call in load.calls for k in call]
    assert sorted(loaded) == sorted(set(loaded)) == [0, 1, 2, 3, 4, 10, 11, 12]


# retries and failure ----------------------------------------------------------------------------


def test_a_retryable_failure_twice_then_success_loads_three_times():
    rt = make()
    load = Loader(fail_first=2)
    assert rt.get_many([1], load) == {1: load.rows[1]}
    assert len(load.calls) == 3
    assert rt.sleep.pauses == [0.05, 0.1]  # type: ignore[attr-defined]
    s = rt.stats()
    assert (s["loads"], s["load_failures"], s["entries"]) == (3, 2, 1)
    assert rt.get_many([1], load) == {1: load.rows[1]} and len(load.calls) == 3


def test_always_failing_gives_dependency_unavailable_after_attempts():
    rt = make(attempts=4)
    load = Loader(always_fail=True)
    with pytest.raises(DependencyUnavailable) as info:
        rt.get_many([1, 2], load)
    err = info.value
    assert len(load.calls) == 4
    assert isinstance(err.__cause__, DbDown)
    assert err.status == 503 and err.retry_after_s > 0
    assert "features" in err.message and "4 times" in err.message
    http = to_http(err)
    assert http.status == 503 and (b"retry-after", b"1") in http.headers
    assert rt.stats()["entries"] == 0
    assert rt._loading == {}  # nothing left claimed: the next call tries again
    load.always_fail = False
    load.fail_first = 0
    assert rt.get_many([1], load) == {1: load.rows[1]}


def test_a_non_retryable_error_is_raised_at_once():
    rt = make()
    load = Loader(always_fail=True, error=KeyError)
    with pytest.raises(KeyError):
        rt.get_many([1], load)
    assert len(load.calls) == 1 and rt._loading == {}


def test_threads_waiting_on_a_failing_load_do_not_hang():
    rt = make(attempts=2)
    load = Loader(always_fail=True)
    load.gate = threading.Event()
    with ThreadPoolExecutor(THREADS) as pool:
        futures = [pool.submit(rt.get_many, [1], load) for _ in range(THREADS)]
        wait_until(lambda: rt.coalesced == THREADS - 1)
        load.gate.set()
        errors = [f.exception(timeout=5) for f in futures]
    assert all(isinstance(e, DependencyUnavailable) for e in errors)
    assert rt._loading == {}
    # the leader already retried `attempts` times: its waiters share its 503 instead of piling
    # THREADS × attempts more loads onto a dependency that is down
    assert len(load.calls) == 2


def test_waiters_of_a_load_that_exhausted_its_retries_share_its_503():
    rt = make(attempts=1)
    load = Loader(fail_first=1)
    load.gate = threading.Event()
    with ThreadPoolExecutor(10) as pool:
        futures = [pool.submit(rt.get_many, [1], load) for _ in range(10)]
        wait_until(lambda: rt.coalesced == 9)
        load.gate.set()
        outcomes = [f.exception(timeout=5) or f.result() for f in futures]
    assert all(isinstance(o, DependencyUnavailable) for o in outcomes)
    assert len(load.calls) == 1
    assert rt.get_many([1], load) == {1: load.rows[1]}  # the next call loads afresh


# waiting on another caller's load is bounded --------------------------------------------------------


def test_a_waiter_on_a_load_that_blocks_gets_a_503_after_wait_timeout():
    """The loader hangs (its own timeouts failed): the caller that joined it gives up after
    wait_timeout_s with DependencyUnavailable, instead of hanging with it."""
    rt = make(wait_timeout_s=0.05)
    load = Loader()
    hang = threading.Event()

    def hangs_on_1(keys: list[int]) -> dict[int, Any]:
        if 1 in keys:
            assert hang.wait(10), "test never let the load finish"
        return load(keys)

    with ThreadPoolExecutor(2) as pool:
        leader = pool.submit(rt.get_many, [1, 2], hangs_on_1)
        wait_until(lambda: rt._loading.keys() == {1, 2})
        started = time.monotonic()
        with pytest.raises(DependencyUnavailable) as info:
            rt.get_many([2, 3], hangs_on_1)  # 3 is ours (loaded at once), 2 the blocked leader's
        waited = time.monotonic() - started
        assert 0.05 <= waited < 2.0
        err = info.value
        assert err.status == 503 and err.retry_after_s > 0
        assert "features" in err.message and "0.05s" in err.message
        http = to_http(err)
        assert http.status == 503 and (b"retry-after", b"1") in http.headers
        assert rt.stats()["wait_timeouts"] == 1
        assert load.calls == [[3]]  # ours ran; the leader's is still blocked
        hang.set()  # the blocked load still finishes and serves later callers
        assert leader.result(timeout=5) == {1: load.rows[1], 2: load.rows[2]}
    assert rt._loading == {}
    assert load.calls == [[3], [1, 2]]
    assert rt.get_many([1, 2, 3], load) == {k: load.rows[k] for k in (1, 2, 3)}
    assert len(load.calls) == 2  # all three were cached


def test_a_waiter_whose_load_finishes_in_time_is_not_refused():
    rt = make(wait_timeout_s=5.0)
    load = Loader()
    load.gate = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        leader = pool.submit(rt.get_many, [4], load)
        wait_until(lambda: len(load.calls) == 1)
        waiter = pool.submit(rt.get_many, [4], load)
        wait_until(lambda: rt.coalesced == 1)
        load.gate.set()
        assert leader.result(timeout=5) == waiter.result(timeout=5) == {4: load.rows[4]}
    assert rt.stats()["wait_timeouts"] == 0 and load.calls == [[4]]


# invalidation -------------------------------------------------------------------------------------


def test_invalidate_drops_tagged_entries_only():
    rt = make()
    load = Loader()
    rt.get_many([1, 2], load, tags=account_tags)
    assert rt.invalidate(["account:1"]) == 1
    rt.get_many([1, 2], load, tags=account_tags)
    assert load.calls == [[1, 2], [1]]
    assert rt.stats()["invalidated"] == 1


def test_invalidate_while_a_load_is_in_flight_keeps_its_result_out_of_the_cache():
    """Load started, the row was updated and invalidated, load finishes with the old row: it is
    returned to this caller (who asked before the update) but not cached."""
    rt = make()
    old = Loader(rows={1: "old"})

    def racing_load(keys: list[int]) -> dict[int, Any]:
        result = old(keys)
        rt.invalidate(["account:1"])  # the update lands while this load is in flight
        return result

    assert rt.get_many([1], racing_load, tags=account_tags) == {1: "old"}
    assert rt.stats()["refused_stale_loads"] == 1 and rt.stats()["entries"] == 0
    new = Loader(rows={1: "new"})
    assert rt.get_many([1], new, tags=account_tags) == {1: "new"}
    assert len(new.calls) == 1
    assert rt.get_many([1], new, tags=account_tags) == {1: "new"} and len(new.calls) == 1


def test_invalidate_of_another_tag_during_a_load_does_not_refuse_it():
    rt = make()
    load = Loader()

    def load_while_other_changes(keys: list[int]) -> dict[int, Any]:
        rt.invalidate(["account:999"])
        return load(keys)

    rt.get_many([1], load_while_other_changes, tags=account_tags)
    rt.get_many([1], load, tags=account_tags)
    assert len(load.calls) == 1


def test_invalidate_from_another_thread_during_a_gated_load():
    rt = make()
    load = Loader(rows={1: "old"})
    load.gate = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        f = pool.submit(rt.get_many, [1], load, account_tags)
        wait_until(lambda: len(load.calls) == 1)
        rt.invalidate(["account:1"])
        load.gate.set()
        assert f.result(timeout=5) == {1: "old"}
    load.gate = None
    load.rows[1] = "new"
    assert rt.get_many([1], load, tags=account_tags) == {1: "new"}
    assert len(load.calls) == 2


def test_invalidation_memory_is_bounded_and_folding_keeps_loads_honest():
    """Many unique tags: at most max_tracked_invalidations are remembered; a load that began
    before the fold floor is not cached (it may have missed a forgotten tag), but is returned."""
    rt = make(max_tracked_invalidations=100)
    load = Loader(rows={1: "old"})

    def load_across_a_flood(keys: list[int]) -> dict[int, Any]:
        result = load(keys)
        for i in range(10):  # 1,000 unique tags while this load is in flight, none of them ours
            rt.invalidate([f"other:{i}:{j}" for j in range(100)])
        return result

    assert rt.get_many([1], load_across_a_flood, tags=account_tags) == {1: "old"}
    s = rt.stats()
    assert s["tracked_invalidations"] <= 100 and s["folded_invalidations"] >= 900
    assert s["refused_stale_loads"] == 1 and s["entries"] == 0  # conservative: not cached
    load.rows[1] = "new"
    assert rt.get_many([1], load, tags=account_tags) == {1: "new"}  # a later load is stored
    assert rt.get_many([1], load, tags=account_tags) == {1: "new"}
    assert len(load.calls) == 2


# capacity -------------------------------------------------------------------------------------------


def test_capacity_zero_caches_nothing_but_still_retries():
    rt = make(capacity=0)
    load = Loader(fail_first=1)
    assert rt.get_many([1, 2], load) == {1: load.rows[1], 2: load.rows[2]}
    assert rt.get_many([1, 2], load) == {1: load.rows[1], 2: load.rows[2]}
    assert len(load.calls) == 3  # one failure + two loads: nothing was kept
    s = rt.stats()
    assert not s["enabled"] and s["entries"] == 0


def test_clear_empties():
    rt = make()
    load = Loader()
    rt.get_many([1, 2], load)
    assert rt.clear() == 2
    rt.get_many([1], load)
    assert len(load.calls) == 2


@pytest.mark.parametrize(
    "kwargs",
    [{"attempts": 0}, {"ttl_s": 0}, {"ttl_s": -1}, {"backoff_s": -0.1}, {"wait_timeout_s": 0},
     {"wait_timeout_s": float("nan")}, {"max_tracked_invalidations": 0}],
    ids=["attempts-0", "ttl-0", "ttl-negative", "backoff-negative", "wait-0", "wait-nan",
         "tracked-0"],
)
def test_bad_settings_are_refused(kwargs):
    base: dict[str, Any] = {"name": "x", "capacity_bytes": 1024, "ttl_s": 1.0}
    with pytest.raises(ValueError):
        ReadThrough(**{**base, **kwargs})
