"""Request records and the feedback summary, without a database: the prediction read from
an answer, sampling and the queue's bound, a worker's records checked, a write that fails
putting them back, labels from corrections, and the per-version summary."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from steadyserve.config import FeedbackConfig
from steadyserve.gateway.feedback_routes import is_positive, marks_wrong, summarize
from steadyserve.gateway.records import RecordWriter, RequestRecorder, prediction_at
from steadyserve.store import DatabaseUnavailable


@pytest.mark.parametrize(("body", "path", "want"), [
    (b'[{"score": 0.25}]', "0.score", 0.25),
    (b'{"score": 1}', "score", 1.0),
    (b'{"a": {"b": [0, 0.5]}}', "a.b.1", 0.5),
    (b'[{"score": 0.25}]', "1.score", None),  # no second item
    (b'{"score": "high"}', "score", None),
    (b'{"score": true}', "score", None),  # a bool is not a probability
    (b'{"error": {}}', "score", None),
    (b"not json", "score", None),
    (b"[1, 2]", "x", None),
])
def test_the_prediction_read_from_an_answer(body: bytes, path: str, want: float | None) -> None:
    assert prediction_at(body, path) == want


def record(r: RequestRecorder, rid: str, deployment: str = "risk", status: int = 200,
           body: bytes = b'[{"score": 0.9}]') -> None:
    r.record(request_id=rid, deployment=deployment, handler="score", version="7",
             replica="risk-0", cache="miss", status=status, seconds=0.0123, key_id=None,
             body=body, now=100.0)


def test_records_are_sampled_bounded_and_carry_the_prediction() -> None:
    draws = iter([0.1, 0.9, 0.2, 0.3, 0.4])
    r = RequestRecorder(FeedbackConfig(record_sample_rate=0.5, record_queue_max=2),
                        {"risk": "0.score", "echo": None}, rng=lambda: next(draws))
    record(r, "a")  # drawn 0.1 < 0.5: kept
    record(r, "b")  # 0.9: not sampled
    record(r, "c", status=500)  # kept, no prediction read from an error
    record(r, "d")  # the queue is full: dropped, counted
    assert [(x["request_id"], x["prediction"], x["latency_ms"]) for x in r.queue] == [
        ("a", 0.9, 12.3), ("c", None, 12.3)]
    assert r.dropped == 1
    taken = r.take(10)
    r.put_back([*taken, dict(taken[0], request_id="e")])  # one more than fits
    assert [x["request_id"] for x in r.queue] == ["a", "c"] and r.dropped == 2


def test_a_workers_records_are_checked() -> None:
    r = RequestRecorder(FeedbackConfig(), {})
    record(r, "good")
    good = r.take(1)[0]
    r.merge([good, {**good, "status": "200"}, {**good, "extra": 1}, "junk",
             {k: v for k, v in good.items() if k != "replica"}, {**good, "prediction": "x"}])
    r.merge("not a list")
    assert [x["request_id"] for x in r.queue] == ["good"]


class FakeStore:
    def __init__(self) -> None:
        self.down = False
        self.rows: list[dict[str, Any]] = []
        self.pruned: list[tuple[float, int]] = []

    def add(self, rows: list[dict[str, Any]]) -> None:
        if self.down:
            raise DatabaseUnavailable("down")
        self.rows += rows

    def prune(self, before: float, max_rows: int) -> int:
        self.pruned.append((before, max_rows))
        return 0


def test_a_write_the_database_refuses_keeps_the_records() -> None:
    r = RequestRecorder(FeedbackConfig(record_retention_s=50, max_records=9), {})
    store = FakeStore()
    writer = RecordWriter(r, store, wall=lambda: 1000.0)
    record(r, "a")
    store.down = True
    asyncio.run(writer.flush())
    assert len(r.queue) == 1 and store.rows == []
    store.down = False
    record(r, "b")
    asyncio.run(writer.flush())
    assert [x["request_id"] for x in store.rows] == ["a", "b"] and not r.queue
    assert store.pruned == [(950.0, 9)]


@pytest.mark.parametrize(("correction", "positive", "want"), [
    ("fraud", "fraud", True), ("FRAUD ", "fraud", True), ("ok", "fraud", False),
    (True, "fraud", True), (False, "fraud", False), (1, "x", True), (0, "x", False),
    ("true", "x", True), ("1", "x", True), ({"label": "fraud"}, "fraud", False),
])
def test_labels_from_corrections(correction: Any, positive: str, want: bool) -> None:
    assert is_positive(correction, positive) is want


def test_the_summary_per_deployment_and_version() -> None:
    answers = {("risk", "7"): 4, ("risk", "8"): 2}
    items = [
        {"deployment": "risk", "version": "7", "key": "rating", "score": 1.0,
         "correction": None, "prediction": 0.9},
        {"deployment": "risk", "version": "7", "key": "rating", "score": 0.0,
         "correction": None, "prediction": 0.2},
        {"deployment": "risk", "version": "7", "key": "label", "score": None,
         "correction": "fraud", "prediction": 0.9},
        {"deployment": "risk", "version": "7", "key": "label", "score": None,
         "correction": "ok", "prediction": 0.7},  # wrong: predicted fraud
        {"deployment": None, "version": None, "key": "rating", "score": 1.0,
         "correction": None, "prediction": None},  # its answer was not recorded
    ]
    rows = summarize(answers, items, {"risk": "fraud"})
    by = {(r["deployment"], r["version"]): r for r in rows}
    v7 = by[("risk", "7")]
    assert (v7["answers"], v7["feedback_items"], v7["feedback_rate"]) == (4, 4, 1.0)
    assert v7["scores"]["rating"]["n"] == 2 and v7["scores"]["rating"]["mean"] == 0.5
    assert v7["labels"]["n"] == 2 and v7["labels"]["accuracy"]["rate"] == 0.5
    assert v7["labels"]["precision"] == 0.5 and v7["labels"]["recall"] == 1.0
    assert v7["labels"]["brier"] == pytest.approx((0.01 + 0.49) / 2)
    v8 = by[("risk", "8")]
    assert (v8["feedback_items"], v8["feedback_rate"], v8["labels"]) == (0, 0.0, None)
    assert by[("-", "")]["feedback_items"] == 1 and by[("-", "")]["answers"] == 0



@pytest.mark.parametrize(("item", "wrong"), [
    ({"key": "correct", "score": 0.0, "correction": None}, True),
    ({"key": "correct", "score": -1.0, "correction": None}, True),
    ({"key": "correct", "score": 1.0, "correction": None}, False),
    ({"key": "rating", "score": 0.0, "correction": None}, False),  # a low rating, not "wrong"
    ({"key": "label", "score": None, "correction": "ok"}, True),
    ({"key": "correct", "score": None, "correction": None}, False),
])
def test_which_feedback_marks_an_answer_wrong(item: dict[str, Any], wrong: bool) -> None:
    assert marks_wrong(item, "correct") is wrong


def test_a_queued_record_is_found_with_its_cache_keys() -> None:
    r = RequestRecorder(FeedbackConfig(), {})
    r.record(request_id="a", deployment="risk", handler="score", version="7", replica="risk-0",
             cache="hit", status=200, seconds=0.001, key_id=None, body=b"{}", now=1.0,
             cache_keys=("risk/score/v7/abc",))
    assert r.queued("a")["cache_keys"] == '["risk/score/v7/abc"]'
    assert r.queued("b") is None
