"""Child calls as the gateway sees them (the replica's side: replica.children).

A replica's call to another deployment arrives on the usual routes with its deployment's
child-call token and the grant that came with its parent request (auth.childcalls): only to
a deployment its own lists in `calls` (403), acting for the parent request's key, checked
like a client's (scope, deployment allow-list; no second rate charge — the parent paid),
refused past [gateway] max_call_depth (508 loop_detected), admitted on its parent's
admission slot (no waiting for a slot its own parents hold), and never sent back to the
replica that made it (which waits for it; a sync caller with no other replica to go to is
refused at once).
Each child call's gateway span is a child of the parent attempt's span (traceparent), and
`HopStats` keeps its timings for the deployment's status (`child_calls`).
"""

from __future__ import annotations

from typing import Any

from ..policies.latency import LatencyWindow


class HopStats:
    """Child calls one handler served: count, errors, depth seen, latency quantiles."""

    def __init__(self) -> None:
        self.window = LatencyWindow()
        self.count = 0
        self.errors = 0
        self.max_depth = 0

    def add(self, seconds: float, status: int, depth: int) -> None:
        self.count += 1
        self.errors += status >= 500
        self.max_depth = max(self.max_depth, depth)
        self.window.add(seconds)

    def to_json(self) -> dict[str, Any]:
        p50, p95 = self.window.quantile(0.5), self.window.quantile(0.95)
        return {"calls": self.count, "errors": self.errors, "max_depth": self.max_depth,
                "p50_ms": None if p50 is None else round(p50 * 1000, 3),
                "p95_ms": None if p95 is None else round(p95 * 1000, 3)}
