"""`POST /v1/feedback`: what a user thought of an answer, named by the answer's
`X-Request-ID` (a key with the `feedback` scope, or none while inference is open). One
request may get several items, each with a `key` (what is rated: "rating", "correct", …),
a `score`, a `value`, a `correction` (the right answer, e.g. a label) and a `comment`
(LangSmith's shape). An item's `id` may be chosen by the client, so a retried submission is
stored once (the SDK does this); the gateway picks one otherwise.

Stored in the database at once (201). With the database down, an item is written to a
local spool and fsync'd before the answer (202, `"spooled": true`): `replay` stores the
spooled items in order when the database is back, each exactly once (the item id makes a
replay after a crash harmless). A full spool (`[feedback] spool_max_bytes`) is a 503 with
Retry-After: nothing is accepted that is not kept. `GET /v1/feedback/{request_id}` (admin)
reads a request's items back.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
from typing import TYPE_CHECKING, Any

import orjson

from ..config import FeedbackConfig
from ..errors import ClientError, DependencyUnavailable, NotFound, PayloadTooLarge
from ..policies import quality
from ..store.spool import Spool, SpoolFull
from .http import Request, Response, json_response

if TYPE_CHECKING:
    from ..auth.keys import ApiKey
    from ..store.feedback import FeedbackStore
    from .app import Gateway

FIELDS = ("id", "request_id", "key", "score", "value", "correction", "comment")
_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")
REQUEST_ID_PATTERN = "[A-Za-z0-9._:/+=-]{1,128}"  # what the gateway keeps of an X-Request-ID
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
_KEY = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
MAX_REQUEST_ID_CHARS = 128

SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["request_id"],
    "properties": {
        "request_id": {"type": "string", "pattern": f"^{REQUEST_ID_PATTERN}$",
                       "description": "the X-Request-ID of the answer"},
        "id": {"type": "string", "pattern": "^[A-Za-z0-9_-]{8,64}$",
               "description": "this item's id: a retry with the same id is stored once"},
        "key": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,64}$",
                "description": "what is rated (default 'rating')"},
        "score": {"type": ["number", "boolean", "null"]},
        "value": {"description": "any JSON, at most [feedback] max_value_bytes"},
        "correction": {"description": "the right answer (e.g. a label), any JSON"},
        "comment": {"type": "string"},
    },
}


def parse_item(body: Any, limits: FeedbackConfig, sender: ApiKey | None,
               now: float) -> dict[str, Any]:
    """One feedback item from a request body, checked (ClientError / PayloadTooLarge naming
    the field otherwise)."""
    if not isinstance(body, dict):
        raise ClientError("send a JSON object: request_id and at least one of score, value, "
                          "correction, comment")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise ClientError(f"unknown field {unknown[0][:64]!r}; fields: {list(FIELDS)}",
                          param=unknown[0][:64])
    request_id = body.get("request_id")
    if not isinstance(request_id, str) or not _REQUEST_ID.fullmatch(request_id):
        raise ClientError(f"'request_id' must be the X-Request-ID of an answer (1 to "
                          f"{MAX_REQUEST_ID_CHARS} of A-Z a-z 0-9 . _ : / + = -)",
                          param="request_id")
    item_id = body.get("id", uuid.uuid4().hex)
    if not isinstance(item_id, str) or not _ID.fullmatch(item_id):
        raise ClientError("'id' must be 8 to 64 letters, digits, '_' or '-'", param="id")
    key = body.get("key", "rating")
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ClientError("'key' must be 1 to 64 letters, digits or '_.:-'", param="key")
    score = body.get("score")
    if score is not None:
        if not isinstance(score, int | float) or not math.isfinite(score):
            raise ClientError("'score' must be a finite number or a boolean", param="score")
        score = float(score)
    comment = body.get("comment", "")
    if not isinstance(comment, str):
        raise ClientError("'comment' must be text", param="comment")
    if len(comment) > limits.max_comment_chars:
        raise PayloadTooLarge(f"'comment' is over {limits.max_comment_chars} characters",
                              param="comment")
    for name in ("value", "correction"):
        if body.get(name) is not None and \
                len(orjson.dumps(body[name])) > limits.max_value_bytes:
            raise PayloadTooLarge(f"'{name}' is over {limits.max_value_bytes} bytes as JSON",
                                  param=name)
    if score is None and body.get("value") is None and body.get("correction") is None \
            and not comment:
        raise ClientError("say something: at least one of score, value, correction, comment",
                          param="score")
    return {"id": item_id, "request_id": request_id, "key": key, "score": score,
            "value": body.get("value"), "correction": body.get("correction"),
            "comment": comment, "key_id": sender.id if sender is not None else None,
            "created_at": now}


REPLAY_EVERY_S = 1.0
REPLAY_BATCH = 200
log = logging.getLogger("steadyserve.feedback")


def _store(gw: Gateway) -> FeedbackStore:
    if gw.feedback_store is None:
        raise DependencyUnavailable("feedback is stored in the database, which this gateway "
                                    "could not open; see its log", retry_after_s=5)
    return gw.feedback_store


async def submit(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    body = await req.json(gw.config.max_body_bytes)
    item = parse_item(body, gw.full_config.feedback, req.principal, time.time())
    answer: dict[str, Any] = {"id": item["id"], "request_id": item["request_id"]}
    fb = gw.full_config.feedback
    wrong = fb.invalidate_cached_on_wrong and marks_wrong(item, fb.correct_key)
    try:
        added = await asyncio.to_thread(_store(gw).add, item)
    except DependencyUnavailable as exc:  # the database is down (or was never opened)
        spool = gw.feedback_spool
        if spool is None:
            raise
        try:
            await asyncio.to_thread(spool.append, item)
        except SpoolFull:
            raise DependencyUnavailable(
                f"the database is down ({exc.message}) and the feedback spool is full "
                "([feedback] spool_max_bytes): try again later", retry_after_s=30) from None
        answer.update(stored=False, spooled=True)
    else:
        answer["stored"] = added
    if wrong:  # once the item is kept: a refused one (409, 413, 503) changes nothing
        answer["cache"] = await forget_answer(gw, item["request_id"])
    if gw.canaries is not None and gw.canaries.running():
        await label_canary(gw, item)
    return json_response(answer, status=202 if answer.get("spooled") else
                         201 if answer["stored"] else 200)


def marks_wrong(item: dict[str, Any], correct_key: str) -> bool:
    """Feedback saying the answer was wrong: a correction, or a score <= 0 under
    `correct_key` ("correct": false)."""
    return item["correction"] is not None or (
        item["key"] == correct_key and item["score"] is not None and item["score"] <= 0)


def label_of(item: dict[str, Any], record: dict[str, Any], positive: str,
             correct_key: str) -> bool | None:
    """Whether the recorded answer was right by this item: a `correct_key` score (> 0 right),
    or a correction compared with the recorded prediction (>= 0.5 means the positive
    label); None when the item says neither."""
    if item["key"] == correct_key and isinstance(item["score"], int | float):
        return bool(item["score"] > 0)
    prediction = record.get("prediction")
    if item["correction"] is None or prediction is None:
        return None
    return (float(prediction) >= 0.5) == is_positive(item["correction"], positive)


async def label_canary(gw: Gateway, item: dict[str, Any]) -> None:
    """Count a label for the canary arm that served the answer (control.canary)."""
    assert gw.canaries is not None
    record = gw.recorder.queued(item["request_id"]) if gw.recorder is not None else None
    if record is None and gw.record_store is not None:
        try:
            record = await asyncio.to_thread(gw.record_store.get, item["request_id"])
        except DependencyUnavailable:
            return
    if record is None or not record.get("arm"):
        return
    d = gw.membership.get(str(record["deployment"]))
    if d is None:
        return
    correct = label_of(item, record, d.config.feedback_positive,
                       gw.full_config.feedback.correct_key)
    if correct is not None:
        gw.canaries.label(record, correct)


async def forget_answer(gw: Gateway, request_id: str) -> dict[str, Any]:
    """Drop a wrong answer from the response cache (its keys are in its request record:
    the queued one, else the stored one), here, in L2 and in this gateway's workers."""
    if gw.cache is None:
        return {"dropped": False, "why": "no response cache"}
    record = gw.recorder.queued(request_id) if gw.recorder is not None else None
    if record is None and gw.record_store is not None:
        try:
            record = await asyncio.to_thread(gw.record_store.get, request_id)
        except DependencyUnavailable:
            return {"dropped": False, "why": "the database is down: the answer's record is "
                                             "out of reach"}
    if record is None or not record.get("cache_keys"):
        return {"dropped": False, "why": "no cached answer recorded for this request"}
    keys = [str(k) for k in orjson.loads(record["cache_keys"])]
    gw.controls.fanout({"t": "forget", "keys": keys})
    return {"dropped": True, **await gw.cache.forget(keys)}


async def replay(spool: Spool, store: FeedbackStore) -> None:
    """Store spooled feedback in order once the database takes it; never dies."""
    down = False
    while True:
        await asyncio.sleep(REPLAY_EVERY_S)
        try:
            while spool.count:
                batch = await asyncio.to_thread(spool.pending, REPLAY_BATCH)
                if not batch:
                    break
                for _, item in batch:  # a crash before the ack stores them again: a no-op
                    await asyncio.to_thread(store.add, item, bounded=False)
                await asyncio.to_thread(spool.ack, batch[-1][0])
                log.info("stored %d spooled feedback items; %d left", len(batch), spool.count)
            down = False
        except DependencyUnavailable as exc:
            if not down:
                log.warning("spooled feedback waits for the database: %s", exc.message)
            down = True
        except Exception:
            log.exception("replaying spooled feedback failed; trying again")


async def of_request(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    request_id = params["request_id"]
    if not _REQUEST_ID.fullmatch(request_id) or "/" in request_id:
        raise ClientError(f"a request id is 1 to {MAX_REQUEST_ID_CHARS} of A-Z a-z 0-9 . _ : + "
                          "= - (in a path)", param="request_id")
    items = await asyncio.to_thread(_store(gw).of_request, request_id)
    return json_response({"request_id": request_id, "feedback": items})


SUMMARY_MAX_DAYS = 366


def is_positive(correction: Any, positive: str) -> bool:
    """A label from a correction: true, 1, "true", "1" or the deployment's positive label."""
    if isinstance(correction, bool):
        return correction
    if isinstance(correction, int | float):
        return correction == 1
    return isinstance(correction, str) and correction.strip().lower() in (
        positive.lower(), "true", "1")


def summarize(answers: dict[tuple[str, str], int], items: list[dict[str, Any]],
              positives: dict[str, str]) -> list[dict[str, Any]]:
    """Per deployment and model version: recorded answers, feedback items and their rate,
    each score key's mean with its 95 % interval, and for labelled answers with a recorded
    prediction, accuracy (Wilson interval), precision, recall, Brier score and reliability."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for key in answers:
        groups[key] = {"items": 0, "scores": {}, "pairs": []}
    for it in items:
        where = (it["deployment"] or "-", it["version"] or "") if it["deployment"] \
            else ("-", "")  # feedback on an answer that was not recorded
        g = groups.setdefault(where, {"items": 0, "scores": {}, "pairs": []})
        g["items"] += 1
        if it["score"] is not None:
            g["scores"].setdefault(it["key"], []).append(float(it["score"]))
        prediction = it["prediction"]
        if it["correction"] is not None and prediction is not None and 0 <= prediction <= 1:
            g["pairs"].append((float(prediction), is_positive(
                it["correction"], positives.get(where[0], "positive"))))
    out = []
    for (deployment, version), g in sorted(groups.items()):
        n_answers = answers.get((deployment, version), 0)
        out.append({
            "deployment": deployment, "version": version, "answers": n_answers,
            "feedback_items": g["items"], "feedback_rate": quality.rate(g["items"], n_answers),
            "scores": {k: quality.to_json(quality.mean_interval(v))
                       for k, v in sorted(g["scores"].items())},
            "labels": quality.to_json(quality.label_metrics(g["pairs"])) if g["pairs"] else None,
        })
    return out


async def summary(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    days = req.query_int("days", 1, SUMMARY_MAX_DAYS, default=7)
    deployment = req.query("deployment", 128)
    if deployment is not None and deployment not in gw.membership.deployments:
        raise NotFound(f"no deployment {deployment!r}", param="deployment")
    records = gw.record_store
    if records is None:
        raise DependencyUnavailable("feedback lives in the database, which this gateway could "
                                    "not open; see its log", retry_after_s=5)
    cfg = gw.full_config
    since = time.time() - days * 86_400

    def read() -> list[dict[str, Any]]:
        rows = summarize(records.answers(since),
                         records.feedback_joined(since, cfg.feedback.summary_max_rows),
                         {d.name: d.feedback_positive for d in cfg.deployments})
        return [r for r in rows if deployment is None or r["deployment"] == deployment]

    rows = await asyncio.to_thread(read)
    return json_response({"days": days, "summary": rows,
                          "spooled": gw.feedback_spool.count if gw.feedback_spool else 0})
