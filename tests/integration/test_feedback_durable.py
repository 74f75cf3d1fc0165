"""Accepted feedback is never lost: stored at once while PostgreSQL is up, spooled (fsync'd)
while it is stopped, the gateway SIGKILLed with items still spooled, PostgreSQL started
again, a new gateway on the same data directory replays them — count in = count stored, no
duplicates. Then the summary joins the feedback to the recorded answers: rate, scores and
the label metrics against the recorded predictions."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from .conftest import HERE, STEADYSERVE, PrivatePostgres, start

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCORER = f"{HERE / 'services' / 'scorer.py'}:Scorer"


def wait_until(check: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def stored_ids(pg: PrivatePostgres) -> list[str]:
    with psycopg.connect(pg.url, connect_timeout=5) as conn:
        return [r[0] for r in conn.execute("SELECT id FROM feedback").fetchall()]


def test_feedback_survives_a_database_outage_and_a_killed_gateway(
        private_pg: PrivatePostgres, tmp_path: Path) -> None:
    (tmp_path / "steadyserve.toml").write_text(f"""
data_dir = "{tmp_path / 'state'}"
database_url = "{private_pg.url}"
[alerting]
enabled = false
[feedback]
record_flush_s = 0.2
[deployments.scorer]
service = "{SCORER}"
replicas = 1
feedback_prediction = "score"
feedback_positive = "fraud"
""")
    gw = start([], tmp_path)
    accepted: dict[str, int] = {}
    try:
        gw.wait_ready(60)
        with httpx.Client(base_url=gw.url, timeout=10) as c:
            answers = []
            for i in range(20):
                x = i / 19
                r = c.post("/v1/deployments/scorer/score", json={"x": x})
                assert r.status_code == 200, r.text
                answers.append((r.headers["x-request-id"], x))

            def send(rid: str, x: float, n: int) -> int:
                item = {"request_id": rid, "id": f"item-{n:05d}", "key": "label",
                        "correction": "fraud" if x >= 0.5 else "ok", "score": 1}
                r = c.post("/v1/feedback", json=item)
                assert r.status_code in (201, 202), r.text
                accepted[item["id"]] = r.status_code
                return r.status_code

            for n, (rid, x) in enumerate(answers[:5]):  # the database is up: stored
                assert send(rid, x, n) == 201
            time.sleep(1.0)  # the answers' records are written ([feedback] record_flush_s)
            private_pg.stop()
            for n, (rid, x) in enumerate(answers[5:], start=5):  # down: spooled, 202
                assert send(rid, x, n) == 202
            for n, (rid, x) in enumerate(answers[:15], start=20):  # second items, also spooled
                assert send(rid, x, n) == 202
            summary = c.get("/v1/feedback/summary")
            assert summary.status_code == 503, summary.text  # said, not a 500
    finally:
        gw.stop(signal.SIGKILL)  # with 30 items in the spool
    assert list(accepted.values()).count(202) == 30
    private_pg.start()
    again = start([], tmp_path)
    try:
        again.wait_ready(60)
        ids = wait_until(lambda: (got := stored_ids(private_pg)) and len(got) >= 35 and got,
                         30, "the spool was not replayed")
        time.sleep(2.0)  # a replay running twice would show now
        ids = stored_ids(private_pg)
        assert sorted(ids) == sorted(accepted) and len(ids) == len(set(ids)) == 35
        r = httpx.get(f"{again.url}/v1/feedback/summary", params={"deployment": "scorer"},
                      timeout=10)
        assert r.status_code == 200, r.text
        [row] = r.json()["summary"]
        assert (row["version"], row["answers"], row["feedback_items"]) == ("v1", 20, 35)
        labels = row["labels"]
        assert labels["n"] == 35 and labels["accuracy"]["rate"] == 1.0, labels
        assert labels["precision"] == 1.0 and labels["recall"] == 1.0
        assert 0 < labels["brier"] < 0.25
        assert row["scores"]["label"]["n"] == 35 and row["scores"]["label"]["mean"] == 1.0
        assert r.json()["spooled"] == 0
        shown = subprocess.run([*STEADYSERVE, "feedback", "--url", again.url], text=True,
                               capture_output=True, timeout=60, cwd=tmp_path,
                               env={"COLUMNS": "220", "PATH": "/usr/bin:/bin"})
        assert shown.returncode == 0, shown.stderr
        assert "scorer" in shown.stdout and "1.000 [" in shown.stdout, shown.stdout
        bad = subprocess.run([*STEADYSERVE, "feedback", "--deployment", "nope", "--url",
                              again.url], text=True, capture_output=True, timeout=60,
                             cwd=tmp_path)
        assert bad.returncode == 1, bad.stderr
        assert bad.stderr.strip().splitlines() == [
            "steadyserve: /v1/feedback/summary refused (404): no deployment 'nope'"], bad.stderr
    finally:
        again.stop()
