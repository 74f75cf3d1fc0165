"""The smallest useful service: answers with what it was sent. Measures steadyserve's own
overhead (client → gateway → replica → gateway → client) with no model in the way.

    .venv/bin/steadyserve run benchmarks/services/echo.py:Echo --replicas 1
    curl -s 127.0.0.1:8000/v1/deployments/echo/echo -d '{"text": "hello"}'
"""

from __future__ import annotations

import steadyserve


class Echo(steadyserve.Service):
    @steadyserve.handler
    async def echo(self, text: str) -> dict:
        return {"text": text}

    @steadyserve.handler(batch=True, max_batch_size=64)
    def echo_batch(self, texts: list[str]) -> list[dict]:
        """A batched handler with no work in it: what the serving path costs per call when
        the model costs nothing (benchmarks/serving.py --only coalesce)."""
        return [{"text": t} for t in texts]
