"""The smallest useful service: an echo, for trying the platform without a model."""

from __future__ import annotations

import steadyserve


class Echo(steadyserve.Service):
    @steadyserve.handler
    async def echo(self, text: str) -> dict[str, str]:
        return {"text": text}

    @steadyserve.handler(batch=True, max_batch_size=64)
    def upper(self, texts: list[str]) -> list[str]:
        return [t.upper() for t in texts]
