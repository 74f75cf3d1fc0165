"""What the data-plane routes may use of a gateway process, and nothing more.

Inference (`routes.invoke`, `openai.embeddings`, the response cache in `cached`) and the
probes take a `DataPlane`, not the whole `Gateway`: the type checker (mypy --strict) then
refuses any reach from them into the control plane (supervisor, rollouts, alerting, keys,
the cluster lease). A data-plane worker process (gateway.worker) is exactly this much: its
membership and config arrive from the gateway process, and what it reports goes back there
(gateway.channel); every other route it forwards.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any, Protocol

from ..cache.tiered import ResponseCache
from ..config import Config, GatewayConfig
from ..observe.metrics import GatewayMetrics
from .canary import Splits
from .dispatch import Dispatcher
from .membership import Membership
from .shadow import Shadows


class DataPlane(Protocol):
    @property
    def config(self) -> GatewayConfig: ...
    @property
    def full_config(self) -> Config: ...
    @property
    def membership(self) -> Membership: ...
    @property
    def dispatcher(self) -> Dispatcher: ...
    @property
    def cache(self) -> ResponseCache | None: ...
    @property
    def metrics(self) -> GatewayMetrics: ...
    @property
    def affinity(self) -> bool: ...
    @property
    def draining(self) -> bool: ...
    @property
    def shadows(self) -> Shadows: ...
    @property
    def splits(self) -> Splits: ...

    def spawn(self, coro: Awaitable[None], name: str) -> None: ...

    async def invalidate(self, tags: Sequence[str]) -> dict[str, Any]: ...
