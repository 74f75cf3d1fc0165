"""observe/timeseries.py: SeriesStore tiers, increase with counter resets, queries, bounds,
persistence snapshots."""

from __future__ import annotations

import math

import pytest

from steadyserve.observe.timeseries import SeriesStore, labels_of, series_key

T0 = 60 * 16_667.0  # coarse steps start on it
KEY = series_key("requests_total", {"deployment": "a"})


def filled(values, *, start=T0, step=1.0, key=KEY, **kw) -> SeriesStore:
    store = SeriesStore(**kw)
    for i, v in enumerate(values):
        store.record(key[0], key[1], v, start + i * step)
    return store


# labels ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "want"),
    [
        (None, ()),
        ({}, ()),
        ({"b": "2", "a": "1"}, (("a", "1"), ("b", "2"))),
        ((("b", "2"), ("a", "1")), (("a", "1"), ("b", "2"))),
        ({"code": 500}, (("code", "500"),)),
    ],
)
def test_labels_are_sorted_tuples(given, want):
    assert labels_of(given) == want


def test_dict_and_tuple_labels_name_the_same_series():
    store = SeriesStore()
    store.record("g", {"b": "2", "a": "1"}, 1.0, T0)
    store.record("g", (("a", "1"), ("b", "2")), 2.0, T0 + 1)
    assert store.keys("g") == [(("a", "1"), ("b", "2"))]
    assert store.latest(series_key("g", {"a": "1", "b": "2"})) == 2.0
    assert store.keys("missing") == []


# raw tier: one point per step ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("times", "want_points"),
    [
        pytest.param([0.0, 1.0, 2.0], [(0.0, 0), (1.0, 1), (2.0, 2)], id="one-per-step"),
        pytest.param([0.0, 0.3, 0.9], [(0.9, 2)], id="same-step-overwrites"),
        pytest.param([0.0, 0.5, 1.2, 1.7], [(0.5, 1), (1.7, 3)], id="last-of-each-step"),
    ],
)
def test_raw_tier_keeps_one_point_per_step(times, want_points):
    store = SeriesStore()
    for i, dt in enumerate(times):
        store.record("g", None, i, T0 + dt)
    got = store.values(series_key("g"), 10.0, T0 + 5)
    assert got == [(T0 + t, float(v)) for t, v in want_points]


def test_out_of_order_and_nan_samples_are_rejected():
    store = filled([1.0, 2.0])
    store.record(KEY[0], KEY[1], 99.0, T0 - 5)
    store.record(KEY[0], KEY[1], math.nan, T0 + 5)
    assert store.rejected_samples == 2
    assert store.latest(KEY) == 2.0


# increase ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "window_s", "want"),
    [
        pytest.param([0, 1, 2, 3, 4, 5], 5.0, 5.0, id="steady"),
        pytest.param([0, 1, 2, 3, 4, 5], 2.0, 2.0, id="baseline-at-window-start"),
        pytest.param([0, 1, 2, 3, 4, 5], 2.5, 3.0, id="baseline-just-before-window-start"),
        pytest.param([0, 5, 10, 2, 4], 4.0, 14.0, id="reset-adds-post-reset-value"),
        pytest.param([10, 20, 0, 0, 3], 4.0, 13.0, id="reset-to-zero"),
        pytest.param([10, 20, 5, 1, 2], 4.0, 17.0, id="two-resets"),
        pytest.param([7, 7, 7, 7], 3.0, 0.0, id="flat"),
        pytest.param([3, 4], 100.0, 1.0, id="window-before-first-sample-counts-from-it"),
    ],
)
def test_increase_handles_counter_resets(values, window_s, want):
    store = filled(values)
    now = T0 + len(values) - 1
    assert store.increase(KEY, window_s, now) == pytest.approx(want)
    assert store.rate(KEY, window_s, now) == pytest.approx(want / window_s)


def test_increase_of_unknown_series_is_none():
    store = filled([1, 2])
    assert store.increase(series_key("nope"), 60.0, T0 + 1) is None
    assert store.rate(series_key("nope"), 60.0, T0 + 1) is None
    assert store.increase(KEY, 60.0, T0 - 10) is None  # nothing at or before `now`


def test_counter_that_appears_later_started_from_zero():
    # a labelled Prometheus counter appears only once incremented: its first value is an increase
    store = SeriesStore()
    other = series_key("requests_total", {"code": "2xx"})
    errors = series_key("requests_total", {"code": "5xx"})
    for i in range(10):
        store.record(*other, float(i), T0 + i)
    store.record(*errors, 3.0, T0 + 5)
    store.record(*errors, 4.0, T0 + 6)
    assert store.increase(errors, 300.0, T0 + 9) == 4.0
    # present from the first recording: counted from its first value
    assert store.increase(other, 300.0, T0 + 9) == 9.0


def test_an_evicted_series_coming_back_is_not_news():
    store = SeriesStore(max_series=1)
    store.record("a", None, 1_000.0, T0)
    store.record("b", None, 5.0, T0 + 10)  # evicts a
    store.record("a", None, 1_001.0, T0 + 20)  # evicts b; a's value is history, not an increase
    store.record("a", None, 1_003.0, T0 + 21)
    assert store.increase(series_key("a"), 60.0, T0 + 21) == 2.0


def test_coarse_tier_keeps_increase_exact_across_a_reset_inside_a_step():
    # the reset and the samples around it happen inside one coarse step; only the step's last
    # value reaches the coarse tier, but the adjusted total keeps the increase exact
    values = [0, 10, 20, 30, 2, 5] + [5 + i for i in range(1, 120)]
    store = filled(values, step=10.0)  # 10 s apart: 6 samples a coarse step
    now = T0 + 10.0 * (len(values) - 1)
    want = 30 + 5 + 119
    assert store.tier_for(3_600.0) == "coarse"
    assert store.increase(KEY, 3_600.0, now) == pytest.approx(want)


# tiers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("window_s", "tier"),
    [(1.0, "raw"), (300.0, "raw"), (600.0, "raw"), (600.5, "coarse"), (3_600.0, "coarse"),
     (3 * 86_400.0, "coarse")],
)
def test_tier_for_window(window_s, tier):
    assert SeriesStore().tier_for(window_s) == tier


def test_queries_read_raw_for_short_windows_and_coarse_for_long():
    # a gauge at 1 Hz for 30 min, with a one-second spike mid-step that only the raw tier keeps
    values = [1.0] * 1_800
    values[1_790] = 100.0  # 10 s before the end: inside the current coarse step, then overwritten
    values[900 + 30] = 50.0  # an older spike in the middle of a coarse step
    store = filled(values)
    now = T0 + 1_799
    raw = store.values(KEY, 600.0, now)
    coarse = store.values(KEY, 1_800.0, now)
    assert len(raw) == 600
    assert max(v for _, v in raw) == 100.0
    assert len(coarse) == 30  # one point per minute
    assert all(t % 60 == 59 for t, _ in coarse)  # the last sample of each step
    assert max(v for _, v in coarse) == 1.0  # both spikes were overwritten within their steps
    assert store.avg_over(KEY, 600.0, now) == pytest.approx((599 + 100) / 600)
    assert store.avg_over(KEY, 1_800.0, now) == 1.0
    assert store.avg_over(series_key("nope"), 60.0, now) is None


def test_latest_and_latest_sample():
    store = filled([1.0, 2.0, 3.0])
    assert store.latest(KEY) == 3.0
    assert store.latest_sample(KEY) == (T0 + 2, 3.0)
    assert store.latest(series_key("nope")) is None


# bounds --------------------------------------------------------------------------------------


def test_memory_is_bounded_by_ring_capacities():
    store = SeriesStore()
    for i in range(100_000):  # 10 s apart: 11.6 days, past the 3-day coarse retention
        store.record("g", None, float(i), T0 + 10.0 * i)
    raw, coarse = store.tier_lengths(series_key("g"))
    assert raw == store.raw_capacity == 602
    assert coarse == store.coarse_capacity == math.ceil((3 * 86_400 + 3_600) / 60) + 2
    # and the retained history still answers a 3-day question exactly
    now = T0 + 10.0 * 99_999
    assert store.increase(series_key("g"), 3 * 86_400.0, now) == pytest.approx(3 * 86_400 / 10, abs=6)


def test_series_count_is_capped_least_recently_updated_first():
    store = SeriesStore(max_series=3)
    for i, name in enumerate(["a", "b", "c"]):
        store.record(name, None, 1.0, T0 + i)
    store.record("a", None, 2.0, T0 + 3)  # a is now the most recent
    store.record("d", None, 1.0, T0 + 4)  # evicts b
    assert sorted(store.names()) == ["a", "c", "d"]
    assert store.evicted_series == 1
    assert len(store) == 3


def test_series_without_samples_for_the_retention_are_dropped():
    store = SeriesStore(retention_s=3_600.0)
    store.record("old", None, 1.0, T0)
    store.record("new", None, 1.0, T0 + 3_601)
    assert store.names() == ["new"]


# persistence ---------------------------------------------------------------------------------


def test_snapshot_returns_finished_coarse_steps_once():
    store = filled(range(150))  # T0 .. T0+149: steps [T0, T0+60) and [T0+60, T0+120) finished
    first = store.snapshot_for_persistence(T0 + 149)
    assert [(t, v) for _, _, t, v in first] == [(T0 + 59, 59.0), (T0 + 119, 119.0)]
    assert all(name == KEY[0] and labels == KEY[1] for name, labels, _, _ in first)
    assert store.snapshot_for_persistence(T0 + 149) == []  # nothing new
    assert [(t, v) for _, _, t, v in store.snapshot_for_persistence(T0 + 180)] == [(T0 + 149, 149.0)]
    store.record(KEY[0], KEY[1], 200.0, T0 + 190)
    assert store.snapshot_for_persistence(T0 + 195) == []  # its step is in progress…
    # …unless the process stops: then its last point goes too
    assert [(t, v) for _, _, t, v in store.snapshot_for_persistence(T0 + 195, final=True)] == \
        [(T0 + 190, 200.0)]


def test_load_restores_the_coarse_tier_after_a_restart():
    before = filled(range(7_200))  # two hours of a 1/s counter
    points = before.snapshot_for_persistence(T0 + 7_200)
    after = SeriesStore()
    assert after.load(points) == len(points) == 120
    assert after.load(points) == 0  # not newer: skipped
    # the restarted process' counter starts again from 0: a reset, counted from there
    for i in range(1, 61):
        after.record(KEY[0], KEY[1], float(i), T0 + 7_200 + i)
    now = T0 + 7_260
    assert after.increase(KEY, 3_600.0, now) == pytest.approx(3_600.0, abs=2)
    assert after.increase(KEY, 60.0, now) == pytest.approx(60.0)
    # restored points are already stored: only the finished live step goes out
    assert [(t, v) for _, _, t, v in after.snapshot_for_persistence(now)] == [(T0 + 7_259, 59.0)]


def test_step_increases_per_step_with_resets_and_gaps():
    store = SeriesStore()
    # a counter sampled every 20 s: +1/s, reset to 0 at T0+120 (a restart), then silent
    for i, v in enumerate([0, 20, 40, 60, 80, 100, 0, 20]):
        store.record(KEY[0], KEY[1], float(v), T0 + 20 * i)
    # coarse: one point per minute, the last sample of [T0, T0+60) etc.; steps are
    # (T0, T0+60] ... (T0+180, T0+240]: T0+40 (its first point: from 0), T0+100, and T0+140
    # after the reset (0 then 20)
    assert store.step_increases(KEY, T0 + 240, 60.0, 4) == [40.0, 60.0, 20.0, None]
    # raw: every sample; (T0, T0+60] holds T0+20, 40 and 60
    assert store.step_increases(KEY, T0 + 60, 60.0, 1, "raw") == [60.0]
    assert store.step_increases(series_key("missing"), T0 + 60, 60.0, 2) == [None, None]
    assert store.step_increases(KEY, T0 + 60, 60.0, 0) == []


def test_a_series_first_point_is_an_increase_only_when_it_was_news():
    restored = SeriesStore()
    restored.load([(KEY[0], KEY[1], T0 + 30, 500.0), (KEY[0], KEY[1], T0 + 90, 560.0)])
    assert restored.step_increases(KEY, T0 + 120, 60.0, 2) == [None, 60.0]  # a baseline
    store = filled([1.0, 2.0])  # the first recording: a baseline too
    later = series_key("requests_total", {"deployment": "b"})
    store.record(later[0], later[1], 5.0, T0 + 30)  # appeared later: 5 since it began at 0
    assert store.step_increases(KEY, T0 + 60, 60.0, 1, "raw") == [1.0]
    assert store.step_increases(later, T0 + 60, 60.0, 1, "raw") == [5.0]
