from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from steadyserve.auth.keyring import KeyRing
from steadyserve.config import (
    AuthConfig,
    CacheConfig,
    Config,
    DeploymentConfig,
    GatewayConfig,
    ResilienceConfig,
)
from steadyserve.gateway.app import Gateway
from steadyserve.gateway.transport import InProcessTransport
from steadyserve.service import Service
from steadyserve.testing import InProcessDeployment, start_inprocess

Factory = Callable[..., Awaitable[tuple[Gateway, httpx.AsyncClient, dict[str, InProcessDeployment]]]]


def admin_headers(gateway: Gateway) -> dict[str, str]:
    """The Authorization header of the gateway's local admin key (admin routes need it)."""
    token = getattr(gateway, "admin_token", None)
    return {"authorization": f"Bearer {token}"} if token else {}


@pytest.fixture
async def make_gateway() -> AsyncIterator[Factory]:
    """Build a gateway whose replicas are ReplicaApps in this process (no sockets)."""
    started: list[tuple[httpx.AsyncClient, list[InProcessDeployment]]] = []

    async def factory(
        services: dict[str, tuple[type[Service], int]], *, cache: CacheConfig | None = None,
        auth: AuthConfig | None = None, keys: KeyRing | None = None,
        resilience: ResilienceConfig | None = None,
        calls: dict[str, tuple[str, ...]] | None = None, **gateway_overrides: Any,
    ) -> tuple[Gateway, httpx.AsyncClient, dict[str, InProcessDeployment]]:
        config = Config(
            deployments=tuple(
                DeploymentConfig(name=name, service=f"tests:{cls.__name__}", replicas=n,
                                 calls=(calls or {}).get(name, ()))
                for name, (cls, n) in services.items()
            ),
            gateway=GatewayConfig(**{"allowed_hosts": ("gw",), **gateway_overrides}),
            cache=cache if cache is not None else CacheConfig(),
            auth=auth if auth is not None else AuthConfig(),
            resilience=resilience if resilience is not None else ResilienceConfig(),
        )
        gateway = Gateway(config, transport=InProcessTransport(), keys=keys)
        deployments = {
            name: await start_inprocess(gateway, name, cls, replicas=n)
            for name, (cls, n) in services.items()
        }
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://gw")
        started.append((client, list(deployments.values())))
        return gateway, client, deployments

    yield factory
    for client, deployments in started:
        await client.aclose()
        for d in deployments:
            await d.stop()


class HangingUp:
    """A POST driven through a gateway's ASGI interface whose client hangs up on cue
    (httpx's in-process transport reads a response whole, so it cannot leave mid-way):
    `await gateway(h.scope, h.receive, h.send)`, then `h.leave()`."""

    def __init__(self, path: str, payload: dict[str, Any]) -> None:
        import asyncio
        import json

        self.body = json.dumps(payload).encode()
        self.scope = {"type": "http", "method": "POST", "path": path,
                      "raw_path": path.encode(), "query_string": b"",
                      "headers": [(b"host", b"gw"), (b"content-type", b"application/json"),
                                  (b"content-length", str(len(self.body)).encode())],
                      "client": ("127.0.0.1", 5000), "server": ("gw", 80), "scheme": "http",
                      "http_version": "1.1"}
        self.left = asyncio.Event()
        self.read = False
        self.chunks: list[bytes] = []
        self.on_chunk: Callable[[int], None] | None = None

    def leave(self) -> None:
        self.left.set()

    async def receive(self) -> dict[str, Any]:
        if not self.read:
            self.read = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            self.chunks.append(message["body"])
            if self.on_chunk is not None:
                self.on_chunk(len(self.chunks))
