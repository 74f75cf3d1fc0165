"""cache/memory.py: MemoryCache with a fake `now`: expiry windows, tags, the invalidation race,
bounded invalidation memory (folding into a floor), byte accounting and eviction, under both
eviction policies."""

from __future__ import annotations

import pytest

from steadyserve.cache.memory import ALL_TAGS, ENTRY_OVERHEAD_BYTES, MAX_TRACKED_INVALIDATIONS, MemoryCache
from steadyserve.config import CacheConfig

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


# bounded invalidation memory: the oldest tags fold into a floor ---------------------------------


def test_the_default_bound_is_the_config_default(policy):
    """Replicas do not read [cache]: their ReadThrough uses the constant, which must match."""
    assert MAX_TRACKED_INVALIDATIONS == CacheConfig().max_tracked_invalidations
    assert MemoryCache(MiB, policy).max_tracked_invalidations == MAX_TRACKED_INVALIDATIONS


@pytest.mark.parametrize(
    ("bound", "calls", "tracked", "floor", "folded"),
    [
        # bound 4 folds down to 3 (= 4 - 4 // 4) once a fifth tag arrives
        pytest.param(4, [["a"], ["b"], ["c"], ["d"]], 4, 0, 0, id="at-the-bound-nothing-folds"),
        pytest.param(4, [["a"], ["b"], ["c"], ["d"], ["e"]], 3, 2, 2, id="one-over-folds-two"),
        pytest.param(4, [["a", "b", "c", "d", "e", "f"]], 3, 1, 3, id="one-call-over-the-bound"),
        pytest.param(4, [["a"], ["b"], ["a"], ["c"], ["d"]], 4, 0, 0, id="repeats-count-once"),
        # b=2 c=3 a=4 (moved to the end) d=5 e=6: the oldest are b and c, so the floor is 3
        # (had a stayed first, it would have folded and taken the floor to 4)
        pytest.param(4, [["a"], ["b"], ["c"], ["a"], ["d"], ["e"]], 3, 3, 2,
                     id="a-repeat-is-young-again"),
        # bound 8 keeps 6: folds of 3 at calls 9, 12, 15, 18; then two more tracked
        pytest.param(8, [[f"t{i}"] for i in range(20)], 8, 12, 12, id="many-folds"),
        pytest.param(1, [["a"], ["b"], ["c"]], 1, 2, 2, id="bound-one"),
        pytest.param(2, [[ALL_TAGS], [ALL_TAGS], ["a"]], 1, 0, 0, id="all-is-never-tracked"),
    ],
)
def test_folding_keeps_the_tracked_tags_within_the_bound(policy, bound, calls, tracked, floor, folded):
    c = MemoryCache(MiB, policy, max_tracked_invalidations=bound)
    for tags in calls:
        c.invalidate(tags, T0)
        assert c.tracked_invalidations <= bound
    assert (c.tracked_invalidations, c.floor_epoch, c.folded_invalidations) == (tracked, floor, folded)
    assert c.epoch() == len(calls)


@pytest.mark.parametrize(
    ("since", "load_tags", "stored"),
    [
        # bound 4; epochs: a=1 b=2 c=3 d=4 e=5 → a and b fold, floor 2, c d e tracked
        pytest.param(0, ("a",), False, id="folded-tag-before-floor"),
        pytest.param(0, ("zzz",), False, id="never-invalidated-tag-before-floor"),
        pytest.param(1, ("unrelated",), False, id="just-before-floor"),
        pytest.param(0, (), True, id="untagged-before-floor"),
        pytest.param(2, ("a",), True, id="folded-tag-at-floor"),
        pytest.param(2, ("zzz",), True, id="other-tag-at-floor"),
        pytest.param(2, ("c",), False, id="tracked-tag-after-since"),
        pytest.param(3, ("c",), True, id="tracked-tag-before-since"),
        pytest.param(4, ("e", "zzz"), False, id="any-tag-refuses"),
        pytest.param(5, ("a", "b", "c", "d", "e"), True, id="after-everything"),
    ],
)
def test_a_load_older_than_the_floor_is_refused_and_newer_ones_are_exact(policy, since, load_tags,
                                                                         stored):
    """The floor only ever refuses more than exact tracking would: a folded tag's epoch is at
    most the floor, so for a load that began at or after the floor it could not matter."""
    c = MemoryCache(MiB, policy, max_tracked_invalidations=4)
    for tag in "abcde":
        c.invalidate([tag], T0)
    assert (c.floor_epoch, c.tracked_invalidations) == (2, 3)
    assert c.stale_since(load_tags, since) is not stored
    assert put(c, "k", tags=load_tags, since=since) is stored
    exact = MemoryCache(MiB, policy)  # unbounded enough: nothing folds
    for tag in "abcde":
        exact.invalidate([tag], T0)
    if exact.stale_since(load_tags, since):
        assert not stored  # folding never stores what exact tracking refuses


def test_folding_never_stores_a_row_loaded_before_its_invalidation(policy):
    """Property over many interleavings: whatever folded, a load refused by exact tracking is
    refused by the bounded store too, and a load begun after the last invalidation stores."""
    bounded = MemoryCache(MiB, policy, max_tracked_invalidations=8)
    exact = MemoryCache(MiB, policy, max_tracked_invalidations=10_000)
    epochs: list[int] = []
    for i in range(300):
        epochs.append(bounded.epoch())
        tags = [f"t:{(i * 7 + j) % 37}" for j in range(i % 3 + 1)]
        bounded.invalidate(tags, T0)
        exact.invalidate(tags, T0)
        assert bounded.tracked_invalidations <= 8
        for since in epochs[-20:]:
            for tag in ("t:0", "t:5", "t:36", "never"):
                if exact.stale_since((tag,), since):
                    assert bounded.stale_since((tag,), since), (i, since, tag)
        assert not bounded.stale_since(("t:0",), bounded.epoch())
    assert bounded.folded_invalidations > 0 and bounded.floor_epoch > 0


def test_a_bad_bound_is_refused(policy):
    with pytest.raises(ValueError):
        MemoryCache(MiB, policy, max_tracked_invalidations=0)


def test_the_all_tag_refuses_every_tagged_load_and_takes_no_tracked_slot(policy):
    c = MemoryCache(MiB, policy, max_tracked_invalidations=4)
    for tag in "abcde":
        c.invalidate([tag], T0)
    assert (c.floor_epoch, c.tracked_invalidations) == (2, 3)
    since = c.epoch()  # 5: after the floor, so only ALL can refuse what follows
    put(c, "tagged", tags=("account:1",))
    put(c, "untagged")
    assert c.invalidate([ALL_TAGS], T0) == 1
    assert "tagged" not in c and "untagged" in c
    assert c.tracked_invalidations == 3 and c.floor_epoch == 2
    assert not put(c, "k", tags=("never-invalidated",), since=since)
    assert put(c, "u", since=since)  # untagged: depends on no data
    assert put(c, "k", tags=("never-invalidated",), since=c.epoch())


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
