"""The messages between the gateway's control process and its data-plane workers: one JSON
object per line over a Unix socket in a private (0700) directory. JSON, never pickle: a
message is data, whoever wrote it. Every line is bounded (`MAX_MESSAGE_BYTES`); a longer or
malformed one ends the connection (the worker reconnects, the control process sends the
whole state again).

    control → worker                          worker → control
    {"t": "state", "deployments": {...}}      {"t": "hello", "worker": k}
    {"t": "eject" | "shed_batch" |            {"t": "report", "demand": {...}, "metrics": "…"}
        "serve_stale" | "expect_capacity",    {"t": "unavailable", "deployment", "replica"}
        "deployment", ...}                    {"t": "activate", "deployment"}
    {"t": "invalidate", "tags": [...]}        {"t": "invalidated", "tags": [...]}
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # a state with many replicas' schemas, a metrics text


class ChannelClosed(Exception):
    """The other side went away, or sent something that is not a message."""


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any]:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        raise ChannelClosed("the other side closed the channel") from exc
    except asyncio.LimitOverrunError as exc:
        raise ChannelClosed(f"a message over {MAX_MESSAGE_BYTES} bytes") from exc
    try:
        message = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ChannelClosed(f"not a message: {exc}") from exc
    if not isinstance(message, dict) or not isinstance(message.get("t"), str):
        raise ChannelClosed("not a message: a JSON object with a type 't' is expected")
    return message


def encode(message: dict[str, Any]) -> bytes:
    return orjson.dumps(message) + b"\n"
