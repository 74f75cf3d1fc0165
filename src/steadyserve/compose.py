"""Composition: a handler calling other deployments' handlers (replica.children).

    class Risk(steadyserve.Service):
        @steadyserve.handler
        def score(self, memo: str) -> dict:
            vector = self.deployment("minilm").embed(texts=[memo])[0]        # sync handler
            ...

        @steadyserve.handler
        async def explain(self, memo: str) -> dict:
            minilm = self.deployment("minilm")
            got = await steadyserve.gather({                                   # fan-out
                "vector": minilm.embed.prepare(texts=[memo]),
                "similar": self.deployment("search").nearest.prepare(text=memo),
            }, branch_timeout_s=0.2, partial=True)
            if isinstance(got["similar"], steadyserve.Failed): ...              # explicit

A handle call goes through the gateway like a client request (balancing, retries, ejection,
the response cache) with the parent's remaining deadline, priority, request id, trace and
credential; a 4xx or 5xx answer raises the matching steadyserve error, its message prefixed
with "deployment/handler: ". In a sync handler call the handle (it blocks the model thread,
and the gateway then never routes the child back to this replica); in an async handler
`await handle.<handler>.acall(...)`. A deployment that calls itself from a sync handler needs
another replica to go to (else 508 at once, not a wait for itself).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import SteadyError
from .replica.children import ChildCaller


@dataclass(frozen=True, slots=True)
class Call:
    """A child call not made yet (`handle.<handler>.prepare(...)`), for `gather`."""

    caller: ChildCaller
    deployment: str
    handler: str
    args: dict[str, Any]

    async def run(self, timeout_s: float | None = None) -> Any:
        return await self.caller.call_async(self.deployment, self.handler, self.args,
                                            timeout_s=timeout_s)


@dataclass(frozen=True, slots=True)
class Failed:
    """A branch of `gather(..., partial=True)` that failed: its error."""

    error: SteadyError


class HandlerHandle:
    def __init__(self, caller: ChildCaller, deployment: str, handler: str) -> None:
        self._caller = caller
        self.deployment = deployment
        self.handler = handler

    def __call__(self, **kwargs: Any) -> Any:
        """Call it from a sync handler (blocks until the answer)."""
        return self._caller.call_sync(self.deployment, self.handler, kwargs)

    async def acall(self, **kwargs: Any) -> Any:
        """Call it from an async handler."""
        return await self._caller.call_async(self.deployment, self.handler, kwargs)

    def prepare(self, **kwargs: Any) -> Call:
        return Call(self._caller, self.deployment, self.handler, kwargs)


class DeploymentHandle:
    """`service.deployment(name)`: each attribute is a handler of that deployment."""

    def __init__(self, caller: ChildCaller, name: str) -> None:
        self._caller = caller
        self.name = name

    def __getattr__(self, handler: str) -> HandlerHandle:
        if handler.startswith("_"):
            raise AttributeError(handler)
        return HandlerHandle(self._caller, self.name, handler)


async def gather(calls: Mapping[str, Call], *, branch_timeout_s: float | None = None,
                 partial: bool = False) -> dict[str, Any]:
    """Run child calls at once; each branch within `branch_timeout_s` (and the parent's
    deadline). `partial=False`: the first failure cancels the others and raises.
    `partial=True`: a failed branch's value is `Failed(error)`, the others' their answers."""
    names = list(calls)
    tasks = [asyncio.ensure_future(calls[n].run(branch_timeout_s)) for n in names]
    if not partial:
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            raise
        return dict(zip(names, results, strict=True))
    done = await asyncio.gather(*tasks, return_exceptions=True)
    out: dict[str, Any] = {}
    for name, value in zip(names, done, strict=True):
        if isinstance(value, SteadyError):
            out[name] = Failed(value)
        elif isinstance(value, BaseException):
            raise value
        else:
            out[name] = value
    return out


def gather_sync(caller: ChildCaller, calls: Mapping[str, Call], *,
                branch_timeout_s: float | None = None, partial: bool = False) -> dict[str, Any]:
    """`gather` from a sync handler (`self.gather(...)`)."""
    result: dict[str, Any] = caller.run_sync(
        gather(calls, branch_timeout_s=branch_timeout_s, partial=partial))
    return result
