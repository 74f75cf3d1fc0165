"""`POST /v1/feedback`: what a user thought of an answer, named by the answer's
`X-Request-ID` (a key with the `feedback` scope, or none while inference is open). One
request may get several items, each with a `key` (what is rated: "rating", "correct", …),
a `score`, a `value`, a `correction` (the right answer, e.g. a label) and a `comment`
(LangSmith's shape). An item's `id` may be chosen by the client, so a retried submission is
stored once (the SDK does this); the gateway picks one otherwise.

Stored in the database at once; with the database down the answer is a 503 with
Retry-After (nothing is accepted that is not stored). `GET /v1/feedback/{request_id}`
(admin) reads a request's items back.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import uuid
from typing import TYPE_CHECKING, Any

import orjson

from ..config import FeedbackConfig
from ..errors import ClientError, DependencyUnavailable, PayloadTooLarge
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


def _store(gw: Gateway) -> FeedbackStore:
    if gw.feedback_store is None:
        raise DependencyUnavailable("feedback is stored in the database, which this gateway "
                                    "could not open; see its log", retry_after_s=5)
    return gw.feedback_store


async def submit(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    store = _store(gw)
    body = await req.json(gw.config.max_body_bytes)
    item = parse_item(body, gw.full_config.feedback, req.principal, time.time())
    added = await asyncio.to_thread(store.add, item)  # DatabaseUnavailable: 503, not accepted
    return json_response({"id": item["id"], "request_id": item["request_id"],
                          "stored": added}, status=201 if added else 200)


async def of_request(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    request_id = params["request_id"]
    if not _REQUEST_ID.fullmatch(request_id) or "/" in request_id:
        raise ClientError(f"a request id is 1 to {MAX_REQUEST_ID_CHARS} of A-Z a-z 0-9 . _ : + "
                          "= - (in a path)", param="request_id")
    items = await asyncio.to_thread(_store(gw).of_request, request_id)
    return json_response({"request_id": request_id, "feedback": items})
