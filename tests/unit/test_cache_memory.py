"""cache/memory.py: MemoryCache with a fake `now`: expiry windows, tags, the invalidation race,
byte accounting and eviction, under both eviction policies."""

from __future__ import annotations

import pytest

from steadyserve.cache.memory import ENTRY_OVERHEAD_BYTES, EPOCH_MEMORY_S, PRUNE_EVERY, MemoryCache

T0 = 1000.0
MiB = 1 << 20

pytestmark = pytest.mark.parametrize("policy", ["tinylfu", "lru"])


def cache(policy: str, capacity: int = MiB) -> MemoryCache:
    return MemoryCache(capacity, policy)


def put(c: MemoryCache, key: str, *, size: int = 100, now: float = T0, ttl_s: float = 10.0,
        keep_s: float = 0.0, tags: tuple[str, ...] = (), since: int | None = None,
        value: object = None) -> bool:
    return c.store(key, key if value is None else value, size, now=now, ttl_s=ttl_s, keep_s=keep_s,
                   tags=tags, since=since)


# fresh → stale → gone ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "state"),
    [
        pytest.param(0.0, "fresh", id="at-store"),
        pytest.param(9.999, "fresh", id="just-before-ttl"),
        pytest.param(10.0, "stale", id="at-ttl"),
        pytest.param(14.999, "stale", id="just-before-keep-ends"),
        pytest.param(15.0, "gone", id="at-keep-end"),
        pytest.param(1e6, "gone", id="long-after"),
    ],
)
def test_fresh_then_stale_then_gone(policy, offset, state):
    c = cache(policy)
    assert put(c, "k", ttl_s=10.0, keep_s=5.0)
    entry = c.get("k", T0 + offset)
    if state == "gone":
        assert entry is None
        assert "k" not in c and len(c) == 0 and c.used_bytes == 0
        assert (c.stats.expired, c.stats.misses) == (1, 1)
        return
    assert entry is not None and entry.value == "k"
    assert entry.fresh(T0 + offset) is (state == "fresh")
    assert (c.stats.hits, c.stats.stale_hits) == ((1, 0) if state == "fresh" else (0, 1))
    assert (entry.fresh_until, entry.keep_until) == (T0 + 10.0, T0 + 15.0)


def test_without_keep_an_entry_is_gone_at_its_ttl(policy):
    c = cache(policy)
    put(c, "k", ttl_s=1.0)
    assert c.get("k", T0 + 0.5) is not None
    assert c.get("k", T0 + 1.0) is None
    assert c.stats.as_dict() == {"hits": 1, "stale_hits": 0, "misses": 1, "stores": 1,
                                 "refused_stale_loads": 0, "expired": 1, "invalidated": 0}


def test_peek_neither_counts_nor_expires(policy):
    c = cache(policy)
    put(c, "k", ttl_s=1.0)
    assert c.peek("k") is not None
    assert c.peek("k") is c.peek("k")
    assert c.peek("nope") is None
    assert (c.stats.hits, c.stats.misses) == (0, 0)


# tags and invalidation ----------------------------------------------------------------------------


def test_invalidation_drops_every_tagged_entry_and_only_those(policy):
    c = cache(policy)
    put(c, "a1", tags=("account:1",))
    put(c, "a1-m", tags=("account:1", "merchant:9"))
    put(c, "a2", tags=("account:2",))
    put(c, "m9", tags=("merchant:9",))
    put(c, "untagged")
    assert c.tag_count() == 3
    assert c.invalidate(["account:1"], T0) == 2
    assert sorted(k for k in ("a1", "a1-m", "a2", "m9", "untagged") if k in c) == ["a2", "m9", "untagged"]
    assert c.stats.invalidated == 2
    # merchant:9 lost a1-m but still names m9
    assert c.tag_count() == 2
    assert c.invalidate(["merchant:9", "account:404"], T0) == 1
    assert "m9" not in c and c.tag_count() == 1
    assert c.used_bytes == 2 * (100 + ENTRY_OVERHEAD_BYTES)


def test_invalidating_an_unknown_tag_drops_nothing(policy):
    c = cache(policy)
    put(c, "a", tags=("account:1",))
    assert c.invalidate([], T0) == 0
    assert c.invalidate(["account:2"], T0) == 0
    assert "a" in c


@pytest.mark.parametrize(
    ("load_tags", "invalidated", "since_taken", "stored"),
    [
        pytest.param(("account:1",), ["account:1"], "before", False, id="race-refused"),
        pytest.param(("account:1", "merchant:9"), ["merchant:9"], "before", False,
                     id="any-tag-refuses"),
        pytest.param(("account:1",), ["account:2"], "before", True, id="other-tag-ok"),
        pytest.param(("account:1",), ["account:1"], "after", True, id="load-began-after"),
        pytest.param(("account:1",), ["account:1"], "none", True, id="no-since-no-check"),
        pytest.param((), ["account:1"], "before", True, id="untagged-load"),
    ],
)
def test_a_load_that_raced_an_invalidation_is_refused(policy, load_tags, invalidated, since_taken,
                                                      stored):
    """Load started (epoch taken), the data was updated (tag invalidated), load finishes: its
    answer may come from the old data, so store refuses it."""
    c = cache(policy)
    since: int | None = c.epoch()
    c.invalidate(invalidated, T0)
    if since_taken == "after":
        since = c.epoch()
    elif since_taken == "none":
        since = None
    assert put(c, "k", tags=load_tags, since=since) is stored
    assert ("k" in c) is stored
    assert c.stats.refused_stale_loads == (0 if stored else 1)
    if since is not None:
        assert c.stale_since(load_tags, since) is not stored


def test_two_loads_one_before_and_one_after_an_invalidation(policy):
    c = cache(policy)
    old_load = c.epoch()
    c.invalidate(["account:1"], T0)
    new_load = c.epoch()
    assert not put(c, "k", tags=("account:1",), since=old_load, value="old")
    assert put(c, "k", tags=("account:1",), since=new_load, value="new")
    entry = c.get("k", T0)
    assert entry is not None and entry.value == "new"
    # a later invalidation refuses the load begun in between
    c.invalidate(["account:1"], T0 + 1)
    assert not put(c, "k", tags=("account:1",), since=new_load, value="new")
    assert "k" not in c


def test_recent_invalidations_survive_pruning_old_ones_are_forgotten(policy):
    """Documented limit: an invalidation is remembered EPOCH_MEMORY_S; pruning runs every
    PRUNE_EVERY invalidations, so only a load older than that could store stale data."""
    c = cache(policy)
    ancient = c.epoch()
    c.invalidate(["old"], T0)
    c.invalidate(["recent"], T0 + EPOCH_MEMORY_S)
    while c.epoch() % PRUNE_EVERY:
        c.invalidate([f"filler:{c.epoch()}"], T0 + EPOCH_MEMORY_S + 10)
    assert not put(c, "r", tags=("recent",), since=ancient)
    assert put(c, "o", tags=("old",), since=ancient)  # forgotten: loads never live this long


def test_restore_replaces_tags(policy):
    c = cache(policy)
    put(c, "k", tags=("account:1", "merchant:9"))
    put(c, "k", tags=("account:2",), value="v2")
    assert c.tag_count() == 1
    assert c.invalidate(["account:1", "merchant:9"], T0) == 0
    entry = c.peek("k")
    assert entry is not None and entry.value == "v2" and entry.tags == ("account:2",)
    assert c.invalidate(["account:2"], T0) == 1
    assert "k" not in c and c.tag_count() == 0


def test_delete_and_clear_untag(policy):
    c = cache(policy)
    for i in range(5):
        put(c, f"k{i}", tags=(f"t:{i}", "all"))
    assert c.delete("k0") and not c.delete("k0")
    assert c.tag_count() == 5  # t:1..t:4 and all
    assert c.clear() == 4
    assert len(c) == 0 and c.tag_count() == 0 and c.used_bytes == 0
    assert c.invalidate(["all"], T0) == 0


# bytes and capacity ---------------------------------------------------------------------------------


def test_byte_accounting(policy):
    c = cache(policy)
    put(c, "a", size=100)
    put(c, "b", size=250)
    assert c.used_bytes == 350 + 2 * ENTRY_OVERHEAD_BYTES
    entry = c.peek("b")
    assert entry is not None and entry.size == 250 + ENTRY_OVERHEAD_BYTES
    put(c, "a", size=1000)  # re-store resizes
    assert c.used_bytes == 1250 + 2 * ENTRY_OVERHEAD_BYTES
    c.delete("b")
    assert c.used_bytes == 1000 + ENTRY_OVERHEAD_BYTES
    c.get("a", T0 + 10)  # expired: gone, bytes freed
    assert c.used_bytes == 0 and len(c) == 0


def test_a_value_larger_than_the_capacity_is_refused_and_drops_its_old_copy(policy):
    c = cache(policy, capacity=10_000)
    assert put(c, "k", size=100, tags=("t",))
    assert not put(c, "k", size=20_000, tags=("t",))
    assert "k" not in c and c.used_bytes == 0 and c.tag_count() == 0
    assert c.rejections >= 1


@pytest.mark.parametrize("capacity", [0, -5])
def test_zero_capacity_stores_nothing(policy, capacity):
    c = cache(policy, capacity=capacity)
    assert not put(c, "k")
    assert len(c) == 0 and c.get("k", T0) is None


def test_resize_evicts_down_to_the_new_capacity_and_keeps_tags_consistent(policy):
    per = 880 + ENTRY_OVERHEAD_BYTES
    c = cache(policy, capacity=100 * per)
    for i in range(50):
        assert put(c, f"k{i}", size=880, tags=(f"t:{i}", "all"))
    assert len(c) == 50 and c.used_bytes == 50 * per
    c.resize(10 * per)
    assert c.capacity_bytes == 10 * per
    assert 0 < len(c) <= 10
    assert c.used_bytes == len(c) * per <= 10 * per
    # TinyLFU counts a window key dropped by a shrink as an admission rejection
    assert c.evictions + c.rejections == 50 - len(c)
    assert c.tag_count() == len(c) + 1  # one t:i per survivor, plus "all"
    survivors = len(c)
    assert c.invalidate(["all"], T0) == survivors
    assert len(c) == 0 and c.used_bytes == 0 and c.tag_count() == 0


def test_resize_to_zero_empties_and_refuses_then_growing_stores_again(policy):
    c = cache(policy, capacity=10_000)
    put(c, "a", tags=("t",))
    c.resize(0)
    assert len(c) == 0 and c.used_bytes == 0 and c.tag_count() == 0
    assert not put(c, "b")
    c.resize(10_000)
    assert put(c, "b")
    assert "b" in c


def test_used_bytes_never_exceed_capacity_under_churn(policy):
    per = 400 + ENTRY_OVERHEAD_BYTES
    c = cache(policy, capacity=20 * per)
    for i in range(500):
        key = f"k{i % 60}"
        c.get(key, T0)
        put(c, key, size=400, tags=(f"t:{i % 7}",))
        assert c.used_bytes <= c.capacity_bytes
        assert c.used_bytes == sum(c.peek(k).size for k in (f"k{j}" for j in range(60)) if k in c)
    assert len(c) <= 20
