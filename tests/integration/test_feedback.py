"""POST /v1/feedback against a live gateway: items on an answer sent with the SDK (sync and
async), read back; a retried submission stored once; scopes; and the hostile cases — bad
fields, oversize values, too many items — each a clear 4xx."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

import steadyserve
from steadyserve.client import SteadyserveError

from .conftest import ECHO, HERE

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_feedback_from_the_sdk_stored_and_read_back(serve: Any, tmp_path: Path) -> None:
    (tmp_path / "steadyserve.toml").write_text(f"""
data_dir = "{tmp_path / 'state'}"
[feedback]
max_items_per_request = 3
max_comment_chars = 50
max_value_bytes = 64
[deployments.echo]
service = "{ECHO}"
replicas = 1
""")
    gw = serve([])
    admin = gw.admin_headers()
    with steadyserve.Client(gw.url) as c:
        answer = c.invoke("echo", "echo", text="is this fraud?")
        thumbs = c.feedback(answer.request_id, score=1, comment="quick and right")
        assert thumbs.stored and thumbs.request_id == answer.request_id
        label = c.feedback(answer.request_id, key="label", correction="fraud", value=0.93)
        assert label.stored and label.id != thumbs.id

    async def async_feedback() -> steadyserve.client.FeedbackReceipt:
        async with steadyserve.AsyncClient(gw.url) as ac:
            return await ac.feedback(answer.request_id, key="correct", score=False)

    assert asyncio.run(async_feedback()).stored
    with httpx.Client(base_url=gw.url, timeout=10) as h:
        items = h.get(f"/v1/feedback/{answer.request_id}", headers=admin).json()["feedback"]
        assert [(i["key"], i["score"], i["value"], i["correction"], i["comment"])
                for i in items] == [("rating", 1.0, None, None, "quick and right"),
                                    ("label", None, 0.93, "fraud", ""),
                                    ("correct", 0.0, None, None, "")]
        assert h.get(f"/v1/feedback/{answer.request_id}").status_code == 401  # admin only

        # the same item sent again (a retry after a lost answer) is stored once
        other = httpx.post(f"{gw.url}/v1/deployments/echo/echo",
                            json={"text": "x"}, timeout=10).headers["x-request-id"]
        item = {"request_id": other, "id": "retry-item-0001", "score": 5}
        first, again = h.post("/v1/feedback", json=item), h.post("/v1/feedback", json=item)
        assert (first.status_code, first.json()["stored"]) == (201, True), first.text
        assert (again.status_code, again.json()["stored"]) == (200, False), again.text
        assert len(h.get(f"/v1/feedback/{other}", headers=admin).json()["feedback"]) == 1

        # hostile and careless bodies: each a 4xx naming what was wrong
        rid = answer.request_id
        for body, status, param in [
            ({"request_id": rid, "score": 1, "sneaky": True}, 400, "sneaky"),
            ({"score": 1}, 400, "request_id"),
            ({"request_id": "", "score": 1}, 400, "request_id"),
            ({"request_id": "x" * 200, "score": 1}, 400, "request_id"),
            ({"request_id": rid, "score": "great"}, 400, "score"),
            ({"request_id": rid}, 400, "score"),  # nothing said
            ({"request_id": rid, "score": 1, "key": "a b"}, 400, "key"),
            ({"request_id": rid, "score": 1, "id": "../../etc"}, 400, "id"),
            ({"request_id": rid, "comment": "y" * 51}, 413, "comment"),
            ({"request_id": rid, "value": "z" * 100}, 413, "value"),
            ({"request_id": rid, "correction": list(range(50))}, 413, "correction"),
            ({"request_id": rid, "score": 1}, 409, None),  # a fourth item: over the bound
        ]:
            r = h.post("/v1/feedback", json=body)
            assert r.status_code == status, (body, r.text)
            assert param is None or r.json()["error"]["param"] == param, (body, r.text)
        assert h.post("/v1/feedback", content=b"[1, 2", headers={
            "content-type": "application/json"}).status_code == 400
        assert len(h.get(f"/v1/feedback/{rid}", headers=admin).json()["feedback"]) == 3
        deadline = time.monotonic() + 10  # the answers' records are written each second
        while True:
            summary = h.get("/v1/feedback/summary", params={"deployment": "echo"})
            assert summary.status_code == 200, summary.text
            if summary.json()["summary"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert summary.json()["summary"][0]["feedback_items"] >= 3, summary.text
        for params, status, param in [({"days": "0"}, 400, "days"),
                                      ({"days": "x"}, 400, "days"),
                                      ({"deployment": "d" * 200}, 400, "deployment"),
                                      ({"deployment": "nope"}, 404, "deployment")]:
            r = h.get("/v1/feedback/summary", params=params)
            assert r.status_code == status and r.json()["error"]["param"] == param, r.text

        # once keys exist: a key needs the feedback scope
        keys = {}
        for name, scopes in (("app", ["infer"]), ("rater", ["feedback"])):
            made = h.post("/v1/admin/keys", headers=admin, json={"name": name, "scopes": scopes})
            assert made.status_code == 201, made.text
            keys[name] = made.json()["key"]
        deadline = time.monotonic() + 10
        with steadyserve.Client(gw.url, api_key=keys["app"]) as app:
            while True:  # the key reaches the data plane within [auth] key_refresh_s
                try:
                    app.feedback(other, score=1)
                except SteadyserveError as exc:
                    if exc.status == 403:
                        assert "lacks the 'feedback' scope" in exc.message
                        break
                assert time.monotonic() < deadline
                time.sleep(0.2)
        with steadyserve.Client(gw.url, api_key=keys["rater"]) as rater:
            assert rater.feedback(other, score=2).stored
        with steadyserve.Client(gw.url) as anonymous:
            with pytest.raises(SteadyserveError) as refused:
                anonymous.feedback(other, score=3)
            assert refused.value.status == 401


SCORER = f"{HERE / 'services' / 'scorer.py'}:Scorer"


def test_feedback_that_marks_a_cached_answer_wrong_drops_it(serve: Any, tmp_path: Path) -> None:
    gw = serve([SCORER, "--name", "scorer"])
    with httpx.Client(base_url=gw.url, timeout=10) as h:
        def score(x: float) -> httpx.Response:
            r = h.post("/v1/deployments/scorer/score", json={"x": x})
            assert r.status_code == 200, r.text
            return r

        assert score(0.3).headers["x-steadyserve-cache"] == "miss"
        cached = score(0.3)
        assert cached.headers["x-steadyserve-cache"] == "hit"
        rid = cached.headers["x-request-id"]
        liked = h.post("/v1/feedback", json={"request_id": rid, "key": "correct", "score": 1})
        assert liked.status_code == 201 and "cache" not in liked.json(), liked.text
        assert score(0.3).headers["x-steadyserve-cache"] == "hit"  # a thumbs-up keeps it
        wrong = h.post("/v1/feedback", json={"request_id": rid, "key": "correct", "score": 0})
        assert wrong.status_code == 201, wrong.text
        assert wrong.json()["cache"]["dropped"] and wrong.json()["cache"]["l1_dropped"] == 1
        assert score(0.3).headers["x-steadyserve-cache"] == "miss"  # computed again
        other = score(0.6)  # a correction also says it was wrong
        again = score(0.6)
        assert again.headers["x-steadyserve-cache"] == "hit", other.headers
        fixed = h.post("/v1/feedback", json={"request_id": again.headers["x-request-id"],
                                             "key": "label", "correction": "ok"})
        assert fixed.json()["cache"]["dropped"], fixed.text
        assert score(0.6).headers["x-steadyserve-cache"] == "miss"
        unknown = h.post("/v1/feedback", json={"request_id": "never-served", "key": "correct",
                                               "score": 0})
        assert unknown.status_code == 201 and not unknown.json()["cache"]["dropped"]
