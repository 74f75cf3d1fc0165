"""Admin routes for API keys: list, create, rotate, revoke (`auth.manage` does the work).

A change is applied to this gateway's key ring at once; the other gateways sharing the
database see it within `[auth] key_refresh_s`.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING, Any

from ..auth import manage
from ..auth.keys import parse_spec
from ..errors import ClientError, DependencyUnavailable
from ..store.database import MAX_ROWS
from ..store.keys import KeyStore
from ..store.usage import DAY_S
from .http import Request, Response, json_response

if TYPE_CHECKING:
    from .app import Gateway


def _store(gw: Gateway) -> KeyStore:
    if gw.keys.store is None:
        raise DependencyUnavailable("API keys live in the database, which this gateway could "
                                    "not open; see its log", retry_after_s=5)
    return gw.keys.store


def _creator(req: Request) -> str:
    key = req.principal
    return f"key:{key.id}" if key is not None else "api"


async def list_keys(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    keys = await asyncio.to_thread(_store(gw).load)
    return json_response({"keys": [k.public() for k in keys]})


async def create_key(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    body = await req.json(gw.config.max_body_bytes)
    if not isinstance(body, dict):
        raise ClientError("send a JSON object: name, scopes, rate_limit_per_s, burst, priority, "
                          "deployments, expires_in_s")
    spec = parse_spec(body)
    key, token = await asyncio.to_thread(manage.create, _store(gw), spec, created_by=_creator(req))
    gw.keys.put(key)
    return json_response({**key.public(), "key": token}, 201)


async def rotate_key(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    grace = 0.0
    if req.header(b"content-length") not in (None, "0"):
        body = await req.json(gw.config.max_body_bytes)
        raw = body.get("grace_s", 0) if isinstance(body, dict) else None
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw) \
                or not 0 <= raw <= 30 * 86_400:
            raise ClientError("'grace_s' must be a number of seconds in [0, 30 days]",
                              param="grace_s")
        grace = float(raw)
    key, token = await asyncio.to_thread(manage.rotate, _store(gw), params["key"], grace_s=grace)
    gw.keys.put(key)
    return json_response({**key.public(), "key": token})


async def revoke_key(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    key = await asyncio.to_thread(manage.revoke, _store(gw), params["key"])
    gw.keys.put(key)
    return json_response(key.public())


USAGE_MAX_DAYS = 366
USAGE_MAX_ROWS = 1000


async def usage_rows(gw: Gateway, days: int, limit: int) -> list[dict[str, Any]]:
    """Per key and deployment over the last `days` UTC days (today included): the stored rows
    plus what this gateway counted since its last flush, with each key's name; most requests
    first."""
    flusher = gw.usage_flusher
    if flusher is None:
        raise DependencyUnavailable("key usage lives in the database, which this gateway could "
                                    "not open; see its log", retry_after_s=5)
    store = flusher.store

    def rows(pending: dict[tuple[str, str], list[float]]) -> list[dict[str, Any]]:
        return _usage_rows(gw, store.totals(time.time() - (days - 1) * DAY_S, MAX_ROWS),
                           pending, limit)

    return await flusher.read(rows)


def _usage_rows(gw: Gateway, stored: list[dict[str, Any]],
                pending: dict[tuple[str, str], list[float]], limit: int) -> list[dict[str, Any]]:
    rows = {(r["key_id"], r["deployment"]): r for r in stored}
    for (key_id, deployment), (req, err, rej, seen) in pending.items():
        row = rows.setdefault((key_id, deployment), {
            "key_id": key_id, "deployment": deployment, "requests": 0, "errors": 0,
            "rejected": 0, "last_seen": 0.0})
        row["requests"] += int(req)
        row["errors"] += int(err)
        row["rejected"] += int(rej)
        row["last_seen"] = max(row["last_seen"], seen)
    names = {k.id: k.name for k in gw.keys.keys()}
    out = sorted(rows.values(), key=lambda r: (-r["requests"], r["key_id"], r["deployment"]))
    return [{**r, "name": names.get(r["key_id"])} for r in out[:limit]]


async def key_usage(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    days = req.query_int("days", 1, USAGE_MAX_DAYS, default=7)
    limit = req.query_int("limit", 1, USAGE_MAX_ROWS, default=100)
    return json_response({"days": days, "usage": await usage_rows(gw, days, limit)})
