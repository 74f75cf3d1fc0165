"""Peer for benchmarks/cache.py (gateway-hits): the cached echo hand-rolled in FastAPI.

What a user would write without steadyserve: one uvicorn worker, a module-level dict as the
cache, keyed by the request's text, no size bound, no TTL, no invalidation. Same path, body
and response as `benchmarks/cache_echo.py` behind `steadyserve run`, so one wrk script drives
both.

    .venv/bin/python -m uvicorn --app-dir benchmarks cache_fastapi_peer:app --port 8001
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

app = FastAPI()
_cache: dict[str, dict[str, Any]] = {}


class EchoIn(BaseModel):
    text: str


def compute(text: str) -> dict[str, Any]:
    return {"text": text}


@app.post("/v1/deployments/cache-echo/echo")
async def echo(body: EchoIn) -> dict[str, Any]:
    hit = _cache.get(body.text)
    if hit is None:
        hit = _cache[body.text] = compute(body.text)
    return hit


@app.get("/readyz")
async def readyz() -> dict[str, str]:
    return {"status": "ready"}
