"""Services for the autoscaling tests: one that takes a while to load, one that never loads."""

from __future__ import annotations

import os
import time
from typing import Any

import steadyserve


class SlowStart(steadyserve.Service):
    """Loads for LOAD_S seconds (weights, say), then sleeps `seconds` per request."""

    def setup(self) -> None:
        time.sleep(float(os.environ.get("LOAD_S", "1")))

    @steadyserve.handler
    def work(self, seconds: float = 0.0) -> dict[str, Any]:
        time.sleep(seconds)
        return {"replica": os.environ.get("STEADYSERVE_REPLICA_ID"), "pid": os.getpid()}


class BrokenStart(steadyserve.Service):
    """Its weights are missing: setup fails, the replica exits before it is ever ready."""

    def setup(self) -> None:
        raise RuntimeError("weights file /models/missing.bin not found")

    @steadyserve.handler
    def work(self, seconds: float = 0.0) -> dict[str, Any]:
        return {}
