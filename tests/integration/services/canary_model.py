"""A model for canary tests, shaped by its environment: a latency (CANARY_LATENCY_MS, slept:
steady under a busy CPU; async, so requests overlap), an error rate (CANARY_ERROR_RATE: a
handler error, a 500) and an accuracy (CANARY_ACCURACY: how often its score is on the right
side of 0.5 for the true label, which is x >= 0.5)."""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any

import steadyserve


class CanaryModel(steadyserve.Service):
    def setup(self) -> None:
        self.latency_s = float(os.environ.get("CANARY_LATENCY_MS", "20")) / 1000
        self.error_rate = float(os.environ.get("CANARY_ERROR_RATE", "0"))
        self.accuracy = float(os.environ.get("CANARY_ACCURACY", "1"))
        self.rng = random.Random()
        self.calls = 0

    @steadyserve.handler
    async def predict(self, x: float) -> dict[str, Any]:
        # async: requests overlap, as a replica of a real model server's would
        self.calls += 1
        await asyncio.sleep(self.latency_s * self.rng.uniform(0.8, 1.2))
        if self.rng.random() < self.error_rate:
            raise RuntimeError("injected failure")
        right = x >= 0.5
        says = right if self.rng.random() < self.accuracy else not right
        return {"score": 0.9 if says else 0.1}

    @steadyserve.handler
    def calls_served(self) -> int:
        return self.calls
