"""policies/alert_lifecycle.py: what a silence may be (matchers, duration, size, count) on
creation and on restore."""

from __future__ import annotations

import math

import pytest

from steadyserve.policies.alert_lifecycle import (
    AlertBook,
    RuleSpec,
    Silence,
    SilenceLimits,
    SilenceRefused,
    check_duration,
    check_matchers,
    silence_bytes,
)
from steadyserve.policies.alert_rules import Evaluation

T0 = 1_700_000_000.0
LIMITS = SilenceLimits(max_active=3, max_bytes=300, min_s=60.0, max_s=86_400.0)


@pytest.mark.parametrize(
    ("matchers", "match_all", "want"),
    [
        pytest.param({"alertname": "X"}, False, {"alertname": "X"}, id="one-label"),
        pytest.param({"alertname": "X", "replica": ""}, False, {"alertname": "X", "replica": ""},
                     id="an-empty-value-beside-a-real-one-is-fine"),
        pytest.param({"_private": "1", "a1": "x"}, False, {"_private": "1", "a1": "x"}, id="names"),
        pytest.param({}, True, {}, id="match-all-said-explicitly"),
        pytest.param({"team": ""}, True, {"team": ""}, id="all-empty-with-match-all"),
    ],
)
def test_matchers_accepted(matchers, match_all, want):
    assert check_matchers(matchers, match_all) == want


@pytest.mark.parametrize(
    ("matchers", "match_all", "param", "message"),
    [
        pytest.param({"": ""}, False, "matchers", "not a label name", id="empty-name"),
        pytest.param({"": ""}, True, "matchers", "not a label name", id="empty-name-even-with-match-all"),
        pytest.param({}, False, "matchers", "match every alert", id="no-matcher"),
        pytest.param({"alertname": ""}, False, "matchers", "match every alert", id="all-values-empty"),
        pytest.param({"a-b": "x"}, False, "matchers", "not a label name", id="dash"),
        pytest.param({"1a": "x"}, False, "matchers", "not a label name", id="leading-digit"),
        pytest.param({"a" * 129: "x"}, False, "matchers", "not a label name", id="long-name"),
        pytest.param({"a": "x" * 1025}, False, "matchers", "at most 1024", id="long-value"),
        pytest.param({"a": 1}, False, "matchers", "must be a string", id="number-value"),
        pytest.param({f"l{i}": "x" for i in range(33)}, False, "matchers", "at most 32", id="too-many"),
        pytest.param(["alertname"], False, "matchers", "an object", id="not-an-object"),
        pytest.param(None, False, "matchers", "an object", id="missing"),
        pytest.param({"a": "x"}, "yes", "match_all", "true or false", id="match-all-not-a-bool"),
    ],
)
def test_matchers_refused(matchers, match_all, param, message):
    with pytest.raises(SilenceRefused, match=message) as caught:
        check_matchers(matchers, match_all)
    assert (caught.value.kind, caught.value.param) == ("invalid", param)


@pytest.mark.parametrize(
    ("duration", "ok"),
    [(60, True), (60.0, True), (86_400, True), (3600.5, True), (59.999, False), (1e-9, False),
     (0, False), (-60, False), (86_400.001, False), (math.inf, False), (math.nan, False),
     (10**400, False), (True, False), ("3600", False), (None, False)],
)
def test_duration_must_be_a_finite_number_within_the_limits(duration, ok):
    if ok:
        assert check_duration(duration, LIMITS) == float(duration)
        return
    with pytest.raises(SilenceRefused, match="duration_s") as caught:
        check_duration(duration, LIMITS)
    assert (caught.value.kind, caught.value.param) == ("invalid", "duration_s")


def silence(i: int, comment: str = "", start: float = T0, length_s: float = 3600.0,
            **matchers: str) -> Silence:
    return Silence(f"s{i}", matchers or {"alertname": f"A{i}"}, start, start + length_s, "ops", comment)


def test_a_silence_over_max_bytes_is_too_large():
    book = AlertBook()
    small = silence(1, "x" * 200)
    assert silence_bytes(small) <= LIMITS.max_bytes
    book.add_silence(small, LIMITS)
    big = silence(2, "x" * 300)
    with pytest.raises(SilenceRefused) as caught:
        book.add_silence(big, LIMITS)
    assert caught.value.kind == "too_large" and f"{silence_bytes(big)} bytes" in caught.value.message
    assert [s.id for s in book.silences()] == ["s1"]


def test_multibyte_text_counts_in_bytes():
    assert silence_bytes(silence(1, "é" * 100)) == silence_bytes(silence(1, "e" * 100)) + 100


def test_more_than_max_active_is_refused_until_one_ends():
    book = AlertBook()
    for i in range(3):
        book.add_silence(silence(i), LIMITS)
    with pytest.raises(SilenceRefused) as caught:
        book.add_silence(silence(9), LIMITS)
    assert caught.value.kind == "too_many"
    book.add_silence(silence(1, "replacing s1 keeps the count"), LIMITS)
    assert book.expire_silence("s0", T0 + 10)
    book.add_silence(silence(9, start=T0 + 20), LIMITS)  # s0 has ended: room again
    assert sorted(s.id for s in book.silences(T0 + 30)) == ["s1", "s2", "s9"]


def test_match_all_is_kept_and_mutes_everything():
    book = AlertBook([RuleSpec(name="X", annotations={})])
    with pytest.raises(SilenceRefused):
        book.add_silence(Silence("all", {}, T0, T0 + 600))
    book.add_silence(Silence("all", {}, T0, T0 + 600, match_all=True), LIMITS)
    assert Silence.from_dict(book.silences()[0].to_dict()).match_all is True
    result = book.step({"X": [Evaluation({"deployment": "a"}, True, 1.0, "")]}, T0 + 1)
    assert result.notifications == []
    assert [a.silenced_by for a in book.alerts("firing")] == [("all",)]


def test_restore_keeps_only_what_the_api_would_take():
    book = AlertBook()
    for i in range(3):
        book.add_silence(silence(i, start=T0 + i))
    state = book.to_dict()
    state["silences"] += [
        silence(10, "x" * 1000).to_dict(),  # oversized (from before the cap)
        {**silence(11).to_dict(), "matchers": {"": ""}},  # matches everything, not said so
        silence(12, length_s=30 * 86_400.0).to_dict(),  # longer than max_s
        silence(13, start=T0 - 7200).to_dict(),  # ended before the restart
        {"id": "broken"},  # unreadable
        silence(14, start=T0 + 100).to_dict(),  # valid and newest: pushes out the oldest
    ]
    restored = AlertBook.from_dict(state, silence_limits=LIMITS, now=T0 + 200)
    assert sorted(s.id for s in restored.silences()) == ["s1", "s14", "s2"]
    # without limits (old callers), everything readable comes back as it was
    assert len(AlertBook.from_dict(book.to_dict()).silences()) == 3
