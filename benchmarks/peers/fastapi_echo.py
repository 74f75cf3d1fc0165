"""Peer for the echo benchmark: the same endpoint written directly in FastAPI, no gateway hop.

    .venv/bin/python -m uvicorn --app-dir benchmarks/peers fastapi_echo:app --port 8001

Same path and body as steadyserve's native route, so one wrk script drives both.
"""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel

app = FastAPI()


class EchoIn(BaseModel):
    text: str


@app.post("/v1/deployments/echo/echo")
async def echo(body: EchoIn) -> dict:
    return {"text": body.text}


@app.get("/readyz")
async def readyz() -> dict:
    return {"status": "ready"}
