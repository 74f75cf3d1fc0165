"""policies/quarantine.py: Quarantine, blame for crashed replicas shared by the inputs in flight."""

from __future__ import annotations

import pytest

from steadyserve.policies.quarantine import Quarantine

T0 = 1000.0


def quarantine(**kwargs) -> Quarantine:
    return Quarantine(crashes=2.0, quarantine_s=600.0, forget_after_s=600.0, **kwargs)


def test_one_crash_alone_blames_but_does_not_block():
    q = quarantine()
    assert q.on_crash(["poison"], T0) == []
    assert q._blame["poison"][0] == pytest.approx(1.0)
    assert not q.blocked("poison", T0)


def test_second_crash_quarantines():
    q = quarantine()
    q.on_crash(["poison"], T0)
    assert q.on_crash(["poison"], T0 + 1.0) == ["poison"]  # the retry's replica died too
    assert q.blocked("poison", T0 + 1.0)


@pytest.mark.parametrize(
    ("after", "blocked"),
    [
        pytest.param(0.0, True, id="at-once"),
        pytest.param(300.0, True, id="half-way"),
        pytest.param(599.9, True, id="just-before-end"),
        pytest.param(600.0, False, id="at-end"),
        pytest.param(5000.0, False, id="long-after"),
    ],
)
def test_blocked_for_quarantine_s(after, blocked):
    q = quarantine()
    q.on_crash(["poison"], T0)
    q.on_crash(["poison"], T0 + 1.0)
    assert q.blocked("poison", T0 + 1.0 + after) is blocked
    assert not q.blocked("innocent", T0 + 1.0 + after)


def test_unblocked_after_quarantine_stays_unblocked():
    q = quarantine()
    q.on_crash(["poison"], T0)
    q.on_crash(["poison"], T0)
    assert not q.blocked("poison", T0 + 600.0)
    assert not q.blocked("poison", T0 + 300.0)  # expired entry is gone, even for an older now


def test_already_quarantined_is_not_reported_again():
    q = quarantine()
    assert q.on_crash(["p"], T0) == []
    assert q.on_crash(["p"], T0) == ["p"]
    assert q.on_crash(["p"], T0) == []


@pytest.mark.parametrize(
    ("in_flight", "crashes_needed"),
    [
        pytest.param(1, 2, id="alone-2"),
        pytest.param(2, 4, id="halves-4"),
        pytest.param(3, 6, id="thirds-6-despite-rounding"),
        pytest.param(4, 8, id="quarters-8"),
        pytest.param(10, 20, id="tenths-20"),
    ],
)
def test_shared_blame_needs_more_crashes(in_flight, crashes_needed):
    q = quarantine()
    keys = ["poison"] + [f"other-{i}" for i in range(in_flight - 1)]
    for n in range(1, crashes_needed):
        # the others change every time: innocent bystanders never accumulate blame
        keys = ["poison"] + [f"other-{n}-{i}" for i in range(in_flight - 1)]
        assert q.on_crash(keys, T0 + n) == [], f"quarantined after {n} crashes"
    keys = ["poison"] + [f"last-{i}" for i in range(in_flight - 1)]
    assert q.on_crash(keys, T0 + crashes_needed) == ["poison"]
    assert q.blocked("poison", T0 + crashes_needed)
    assert not any(q.blocked(k, T0 + crashes_needed) for k in keys[1:])


def test_innocent_bystanders_of_one_crash_are_not_quarantined():
    q = quarantine()
    batch = [f"k{i}" for i in range(4)]
    assert q.on_crash(batch, T0) == []
    assert q.on_crash(batch, T0 + 1.0) == []
    assert not any(q.blocked(k, T0 + 1.0) for k in batch)


@pytest.mark.parametrize(
    ("gap", "quarantined"),
    [
        pytest.param(1.0, True, id="soon-after"),
        pytest.param(600.0, True, id="at-forget-after"),
        pytest.param(600.1, False, id="just-past-forget-after"),
        pytest.param(10_000.0, False, id="long-after"),
    ],
)
def test_old_blame_is_forgotten(gap, quarantined):
    q = quarantine()
    q.on_crash(["poison"], T0)
    assert (q.on_crash(["poison"], T0 + gap) == ["poison"]) is quarantined
    assert q.blocked("poison", T0 + gap) is quarantined


def test_forgotten_blame_starts_again_from_the_new_crash():
    q = quarantine()
    q.on_crash(["poison"], T0)
    q.on_crash(["poison"], T0 + 700.0)  # the first is forgotten: blame 1 again
    assert q.on_crash(["poison"], T0 + 701.0) == ["poison"]


def test_on_crash_with_no_inputs_is_a_no_op():
    q = quarantine()
    assert q.on_crash([], T0) == []
    assert q._blame == {}
    assert q._until == {}


@pytest.mark.parametrize("max_entries", [2, 4, 10])
def test_blame_memory_stays_bounded(max_entries):
    q = quarantine(max_entries=max_entries)
    for i in range(500):
        q.on_crash([f"k{i}"], T0 + i)
        assert len(q._blame) <= max_entries
    # the newest entry survives the trimming
    assert "k499" in q._blame


def test_trimming_keeps_the_most_recently_blamed_half_of_the_cap():
    q = quarantine(max_entries=4)
    for i, key in enumerate("abcd"):
        q.on_crash([key], T0 + i)
    q.on_crash(["a"], T0 + 10.0)  # blamed again: now the most recent
    q.on_crash(["e"], T0 + 11.0)  # 5 entries > 4: trimmed down to the 2 most recently blamed
    assert set(q._blame) == {"a", "e"}
    assert q.blocked("a", T0 + 11.0)  # and "a" reached 2 crashes on the way


@pytest.mark.parametrize(
    ("max_entries", "per_crash"),
    [
        pytest.param(1, 1, id="max-entries-1"),
        pytest.param(4, 3, id="3-new-inputs-per-crash"),
        pytest.param(10, 8, id="8-new-inputs-per-crash"),
    ],
)
def test_blame_memory_stays_bounded_for_large_crashes(max_entries, per_crash):
    q = quarantine(max_entries=max_entries)
    for i in range(200):
        q.on_crash([f"k{i}-{j}" for j in range(per_crash)], T0 + i)
    assert len(q._blame) <= max(max_entries, per_crash)


def test_quarantine_memory_stays_bounded():
    q = quarantine(max_entries=10)
    for i in range(200):  # 200 distinct poison inputs, each crashing twice, never seen again
        q.on_crash([f"p{i}"], T0 + 1000.0 * i)
        q.on_crash([f"p{i}"], T0 + 1000.0 * i + 1.0)
    assert len(q._until) <= 10
