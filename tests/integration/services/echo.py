"""A tiny service for integration tests: no model, a little CPU, one batched handler."""

from __future__ import annotations

import os
import time
from typing import Any

import steadyserve


class Echo(steadyserve.Service):
    @steadyserve.handler
    def echo(self, text: str) -> dict[str, Any]:
        return {"text": text, "pid": os.getpid()}

    @steadyserve.handler
    def slow(self, seconds: float) -> dict[str, Any]:
        time.sleep(seconds)
        return {"slept": seconds, "pid": os.getpid()}

    @steadyserve.handler(batch=True, max_batch_size=16)
    def upper(self, texts: list[str]) -> list[str]:
        return [t.upper() for t in texts]


class Other(steadyserve.Service):
    version = "2"

    @steadyserve.handler
    def ping(self) -> str:
        return "pong"
