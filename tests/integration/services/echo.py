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


class Wedge(steadyserve.Service):
    """`block` occupies the single model thread for good, as a deadlocked model would:
    /readyz still answers, the deep health check (canary through the model thread) does not."""

    @steadyserve.handler(canary={"text": "canary"})
    def echo(self, text: str) -> dict[str, Any]:
        return {"text": text, "pid": os.getpid()}

    @steadyserve.handler
    def block(self) -> str:
        time.sleep(3600)
        return "never"


class Flaky(steadyserve.Service):
    """Replica `flaky-0` fails every call (until restarted… and after: it is a bad replica)."""

    @steadyserve.handler
    def work(self, x: str) -> dict[str, Any]:
        if os.environ.get("STEADYSERVE_REPLICA_ID") == "flaky-0":
            # a replica fault (retried elsewhere, counted against it), not the request's fault
            raise steadyserve.RetryableError("this replica is broken")
        return {"x": x, "pid": os.getpid()}


class Broken(steadyserve.Service):
    """Never starts: setup fails every time (a deployment that stays not ready)."""

    def setup(self) -> None:
        raise RuntimeError("this service cannot start (on purpose)")

    @steadyserve.handler
    def work(self, x: str) -> dict[str, Any]:
        return {"x": x}
