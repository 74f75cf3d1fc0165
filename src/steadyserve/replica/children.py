"""Child calls: a handler calling another deployment's handler (steadyserve.compose) goes
back through the gateway, so it gets what a client request gets — admission, balancing,
retries within the budget, ejection, the response cache — and carries its parent's:

    the deadline      X-Request-Timeout-Ms: what is left of the parent's budget, less the
                      time the hops still to come are expected to take (below)
    the priority      X-Priority: the parent's admission class
    the request id    <parent id>.<n>: the n-th child call of that request
    the trace         traceparent: the gateway's span of the parent's attempt
    the credential    its deployment's child-call token (STEADYSERVE_CHILD_TOKEN: the
                      gateway lets it call what `[deployments.NAME] calls` lists) and
                      X-Steadyserve-On-Behalf-Of: the grant the gateway sent with the parent
                      request, handed back unchanged — the parent's key (the child is allowed
                      exactly what that key allows), its depth (the gateway refuses past
                      max_call_depth: 508 loop_detected) and its deadline (auth.childcalls)
    the caller        X-Steadyserve-Caller (this replica: the gateway sends the call to
                      another one) and whether it holds its model thread while it waits

Per-hop budgets: the caller learns, per parent handler, the order of the child calls it makes
(the last request's sequence) and each child's latency (an EWMA of the 90th-percentile-ish
upper value: max(ewma, last)). A child call gets the remaining budget less the expected time
of the calls that followed it last time, so a slow first hop fails fast (its own deadline)
instead of leaving nothing for the last one. With no budget left for it, it fails at once.

Cancellation: the parent request's child calls are registered on it; when the gateway hangs
up on the parent (its client left, or its deadline passed), the replica cancels them, which
closes their connections, which the gateway turns into cancelled dispatches at the children.
A sync handler waiting for a child gets `ChildCallCancelled` in its thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import itertools
import logging
import os
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..errors import ClientGone, DeadlineExceeded, SteadyError, from_wire

log = logging.getLogger("steadyserve.children")

DEFAULT_TIMEOUT_S = 60.0  # a child call made outside any request (setup, a batch)
MIN_CHILD_BUDGET_S = 0.005  # less than this left for a child: fail it now
EWMA_ALPHA = 0.2


class ChildCallCancelled(ClientGone):
    """The parent request was cancelled while this child call ran."""


@dataclass
class ParentCall:
    """The request a handler is serving, as its child calls need it."""

    request_id: str
    handler: str
    deadline: float | None = None  # monotonic
    priority: str = "interactive"
    grant: str | None = None  # the gateway's, handed back with child calls (auth.childcalls)
    traceparent: str | None = None
    sync: bool = True
    children: set[Any] = field(default_factory=set)  # futures of calls in flight
    calls: list[str] = field(default_factory=list)  # "deployment/handler", in order made
    counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    cancelled: bool = False

    def cancel_children(self) -> None:
        self.cancelled = True
        for fut in list(self.children):
            fut.cancel()


PARENT: contextvars.ContextVar[ParentCall | None] = contextvars.ContextVar(
    "steadyserve_parent_call", default=None)


def budget_for(remaining: float, target: str, sequence: list[str], position: int,
               expected: dict[str, float]) -> float:
    """The child's budget (pure): what remains less the expected time of the calls that
    came after this one in the learned `sequence` (from `position` on)."""
    later = sequence[position + 1:] if position < len(sequence) and \
        sequence[position] == target else []
    return remaining - sum(expected.get(hop, 0.0) for hop in later)


class ChildCaller:
    """Makes child calls for this replica; one per replica process."""

    def __init__(self, gateway_url: str | None, token: str | None, replica_id: str,
                 clock: Any = time.monotonic, host: str | None = None) -> None:
        self.gateway_url = gateway_url.rstrip("/") if gateway_url else None
        self.host = host  # the Host header: one the gateway serves (allowed_hosts)
        self.token = token
        self.replica_id = replica_id
        self.clock = clock
        self.loop: asyncio.AbstractEventLoop | None = None
        self.session: Any = None
        self.transport: Any = None  # tests: an httpx AsyncClient on the gateway app
        self.expected: dict[str, float] = {}  # child "deployment/handler" → seconds
        self.sequences: dict[str, list[str]] = {}  # parent handler → its child calls
        self.hop_counts: dict[str, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_environment(cls, replica_id: str) -> ChildCaller:
        return cls(os.environ.get("STEADYSERVE_GATEWAY_URL"),
                   os.environ.get("STEADYSERVE_CHILD_TOKEN"), replica_id,
                   host=os.environ.get("STEADYSERVE_GATEWAY_HOST"))

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    def learn(self, parent: ParentCall) -> None:
        """After a parent request: remember the order of its child calls."""
        if parent.calls:
            with self._lock:
                self.sequences[parent.handler] = list(parent.calls)

    def _observe(self, hop: str, seconds: float) -> None:
        with self._lock:
            old = self.expected.get(hop)
            ewma = seconds if old is None else (1 - EWMA_ALPHA) * old + EWMA_ALPHA * seconds
            self.expected[hop] = max(ewma, seconds) if old is None else ewma
            self.hop_counts[hop] = self.hop_counts.get(hop, 0) + 1

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"expected_ms": {k: round(v * 1000, 3) for k, v in self.expected.items()},
                    "calls": dict(self.hop_counts), "sequences": dict(self.sequences)}

    # the call --------------------------------------------------------------------------------
    async def call(self, deployment: str, handler: str, args: dict[str, Any], *,
                   timeout_s: float | None = None, parent: ParentCall | None = None) -> Any:
        parent = parent if parent is not None else PARENT.get()
        hop = f"{deployment}/{handler}"
        now = self.clock()
        headers = {"content-type": "application/json",
                   "x-steadyserve-caller": self.replica_id}
        if self.host:
            headers["host"] = self.host
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        if parent is not None:
            if parent.cancelled:
                raise ChildCallCancelled("the parent request was cancelled")
            position = len(parent.calls)
            parent.calls.append(hop)
            remaining = parent.deadline - now if parent.deadline is not None \
                else DEFAULT_TIMEOUT_S
            with self._lock:
                sequence = list(self.sequences.get(parent.handler, ()))
                expected = dict(self.expected)
            budget = budget_for(remaining, hop, sequence, position, expected)
            if timeout_s is not None:
                budget = min(budget, timeout_s)
            if budget < MIN_CHILD_BUDGET_S:
                raise DeadlineExceeded(
                    f"no time left for {hop}: {remaining * 1000:.0f} ms remain of the request's "
                    f"budget and the calls after it take about "
                    f"{(remaining - budget) * 1000:.0f} ms")
            headers.update({
                "x-request-id": f"{parent.request_id}.{next(parent.counter)}"[:128],
                "x-priority": parent.priority,
                "x-steadyserve-caller-sync": "1" if parent.sync else "0",
            })
            if parent.grant:
                headers["x-steadyserve-on-behalf-of"] = parent.grant
            if parent.traceparent:
                headers["traceparent"] = parent.traceparent
        else:
            budget = timeout_s if timeout_s is not None else DEFAULT_TIMEOUT_S
        headers["x-request-timeout-ms"] = str(max(1, int(budget * 1000)))
        body = orjson.dumps(args, option=orjson.OPT_SERIALIZE_NUMPY)
        started = self.clock()
        status, raw = await self._post(f"/v1/deployments/{deployment}/{handler}", body,
                                       headers, budget + 1.0)
        self._observe(hop, self.clock() - started)
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            answer = None
        if status == 200:
            return answer
        wire = answer.get("error") if isinstance(answer, dict) else None
        if not isinstance(wire, dict):
            wire = {"code": "child_failed", "message": f"{hop} answered {status}"}
        err = from_wire({**wire, "status": status})
        err.message = f"{hop}: {err.message}"
        raise err

    async def _post(self, path: str, body: bytes, headers: dict[str, str],
                    timeout_s: float) -> tuple[int, bytes]:
        if self.transport is not None:  # in process (tests)
            r = await self.transport.post(path, content=body, headers=headers,
                                          timeout=timeout_s)
            return r.status_code, r.content
        if self.gateway_url is None:
            raise SteadyError("this replica has no gateway to call (STEADYSERVE_GATEWAY_URL)")
        import aiohttp

        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), auto_decompress=True)
        try:
            async with self.session.post(
                    self.gateway_url + path, data=body, headers=headers,
                    timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                return resp.status, await resp.read()
        except TimeoutError:
            raise DeadlineExceeded(f"no answer from the gateway within {timeout_s:.3f}s") \
                from None
        except aiohttp.ClientError as exc:
            raise SteadyError(f"cannot reach the gateway: {exc}") from None

    # from handlers ------------------------------------------------------------------------------
    async def call_async(self, deployment: str, handler: str, args: dict[str, Any],
                         timeout_s: float | None = None) -> Any:
        parent = PARENT.get()
        task = asyncio.ensure_future(self.call(deployment, handler, args,
                                               timeout_s=timeout_s, parent=parent))
        if parent is not None:
            parent.children.add(task)
        try:
            return await task
        finally:
            if parent is not None:
                parent.children.discard(task)

    def call_sync(self, deployment: str, handler: str, args: dict[str, Any],
                  timeout_s: float | None = None) -> Any:
        return self.run_sync(self.call(deployment, handler, args, timeout_s=timeout_s,
                                       parent=PARENT.get()))

    def run_sync(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run a coroutine on the replica's loop from a sync handler's thread, cancellable
        with its parent request."""
        loop = self.loop
        if loop is None:
            raise SteadyError("child calls need a running replica")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            coro.close()
            raise SteadyError("a child call from the event loop must be awaited: use "
                              "`await handle.<handler>.acall(...)` in an async handler")
        parent = PARENT.get()
        fut: concurrent.futures.Future[Any] = asyncio.run_coroutine_threadsafe(coro, loop)
        if parent is not None:
            parent.children.add(fut)
        try:
            return fut.result()
        except concurrent.futures.CancelledError:
            raise ChildCallCancelled("the parent request was cancelled") from None
        finally:
            if parent is not None:
                parent.children.discard(fut)
