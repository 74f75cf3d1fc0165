"""Send one call to a replica of a deployment: pick, call, retry once elsewhere if safe.

A connect failure or a connection that dies mid-request (a replica killed, a replica
draining) is retried once on another replica when the handler is idempotent (the default
for inference). Any other answer, good or bad, is final.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from .. import codec
from ..errors import NoReadyReplica, ReplicaError, ReplicaUnavailable, from_wire
from ..observe.metrics import GatewayMetrics
from ..policies.balancing import update_peak_ewma
from ..replica.server import DEADLINE_HEADER
from .membership import Deployment, Endpoint, Handler
from .transport import Transport

REQUEST_ID_HEADER = b"x-request-id"


class Dispatcher:
    def __init__(
        self,
        transport: Transport,
        metrics: GatewayMetrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
        on_unavailable: Callable[[str, Endpoint], None] | None = None,
    ) -> None:
        self.transport = transport
        self.metrics = metrics
        self.clock = clock
        self.rand = rand
        self.on_unavailable = on_unavailable

    async def invoke(
        self, deployment: Deployment, handler: Handler, args: dict[str, Any],
        *, request_id: str, timeout_s: float,
    ) -> Any:
        body = codec.encode({"args": args})
        path = "/invoke/" + handler.name
        timeout_s = min(timeout_s, handler.spec.options.timeout_s)
        deadline = self.clock() + timeout_s
        attempts = 2 if handler.spec.options.idempotent else 1
        failed: Endpoint | None = None
        last_error: ReplicaError | None = None
        for attempt in range(attempts):
            endpoints = deployment.endpoints
            if failed is not None:
                endpoints = [e for e in endpoints if e is not failed]
            if not endpoints:
                break
            if attempt:
                self.metrics.retries.labels(deployment.name).inc()
            endpoint = endpoints[deployment.balancer.pick(endpoints, self.rand)]
            remaining = deadline - self.clock()
            headers = [
                (REQUEST_ID_HEADER, request_id.encode()),
                (DEADLINE_HEADER, str(int(remaining * 1000)).encode()),
                (b"content-type", codec.CONTENT_TYPE),
            ]
            endpoint.outstanding += 1
            started = self.clock()
            try:
                reply = await self.transport.request(
                    endpoint.address, "POST", path, body, headers, remaining
                )
            except ReplicaUnavailable as exc:
                self.metrics.upstream.labels(deployment.name, "unavailable").inc()
                if self.on_unavailable is not None:
                    self.on_unavailable(deployment.name, endpoint)
                failed, last_error = endpoint, exc
                continue
            except ReplicaError:
                self.metrics.upstream.labels(deployment.name, "timeout").inc()
                raise
            finally:
                endpoint.outstanding -= 1
            now = self.clock()
            endpoint.ewma_latency_s = update_peak_ewma(
                endpoint.ewma_latency_s, endpoint.ewma_at, now - started, now
            )
            endpoint.ewma_at = now
            message = codec.decode(reply.body)
            if reply.status == 200:
                self.metrics.upstream.labels(deployment.name, "ok").inc()
                return message["result"]
            error = from_wire(message.get("error", {}) if isinstance(message, dict) else {})
            self.metrics.upstream.labels(deployment.name, f"{reply.status // 100}xx").inc()
            if isinstance(error, ReplicaUnavailable):  # not ready / draining: safe elsewhere
                failed, last_error = endpoint, error
                continue
            raise error
        if last_error is not None:
            raise last_error
        raise NoReadyReplica(f"deployment {deployment.name!r} has no ready replica", retry_after_s=1)
