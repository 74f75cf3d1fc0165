"""A classifier stand-in for feedback tests: the probability of "fraud" is the input."""

from __future__ import annotations

from typing import Any

import steadyserve


class Scorer(steadyserve.Service):
    version = "v1"

    @steadyserve.handler(cache=True, cache_ttl_s=300)
    def score(self, x: float) -> dict[str, Any]:
        return {"score": x, "decision": "fraud" if x >= 0.5 else "ok"}
