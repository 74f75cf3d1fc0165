"""A cached echo: the smallest service whose answers the gateway's response cache keeps.

Used by `benchmarks/cache.py` (gateway-hits): after the first request for a body every
identical one is answered by the gateway from its in-process cache (L1), without a replica
hop; with `Cache-Control: no-store` every request goes to the replica, as for an uncached
handler.

    .venv/bin/steadyserve run benchmarks/cache_echo.py:CacheEcho --replicas 1
    curl -si 127.0.0.1:8000/v1/deployments/cache-echo/echo -d '{"text": "hello"}'
    # x-steadyserve-cache: miss the first time, hit after
"""

from __future__ import annotations

import steadyserve


class CacheEcho(steadyserve.Service):
    @steadyserve.handler(cache=True, cache_ttl_s=3600)
    async def echo(self, text: str) -> dict:
        return {"text": text}
