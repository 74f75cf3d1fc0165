"""Shadow traffic: a share of a deployment's requests sent again to another deployment (a
candidate: `[deployments.X] shadow = "X-next"`, `shadow_share`), its answer compared with
the one the client got (policies.shadow) and discarded.

The client never waits for it: the mirror starts after the client's answer is known, as a
background task at batch priority (admission sheds it before any interactive request), at
most `shadow_max_inflight` at once per deployment (beyond, it is skipped and counted), and
with its own timeout. Outcomes are counted in `steadyserve_shadow_requests_total{outcome}`
(match, mismatch, error, skipped), numeric differences in `steadyserve_shadow_distance`,
and the deployment's status keeps the counts and the last mismatching request ids.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import SteadyError
from ..policies.shadow import compare
from .dispatch import CallInfo

if TYPE_CHECKING:
    from .membership import Deployment, Handler
    from .plane import DataPlane

log = logging.getLogger("steadyserve.shadow")

OUTCOMES = ("match", "mismatch", "error", "skipped")
MISMATCHES_KEPT = 5


class Shadows:
    def __init__(self, gw: DataPlane, rng: Callable[[], float] = random.random) -> None:
        self.gw = gw
        self.rng = rng
        self.inflight: dict[str, int] = {}
        self.counts: dict[str, dict[str, int]] = {}
        self.mismatches: dict[str, deque[dict[str, Any]]] = {}

    def mirror(self, d: Deployment, h: Handler, args: dict[str, Any], answer: Any,
               request_id: str, principal: str | None = None, hops: int = 0) -> None:
        """Maybe send this request to `d`'s shadow too (called with the client's answer);
        its child calls act for the client's key (`principal`) at the request's depth
        (`hops`: a mirrored child call's subtree still ends at max_call_depth)."""
        cfg = d.config
        if cfg.shadow is None or self.rng() >= cfg.shadow_share:
            return
        if self.inflight.get(d.name, 0) >= cfg.shadow_max_inflight or self.gw.draining:
            self._count(d.name, cfg.shadow, "skipped")
            return
        self.inflight[d.name] = self.inflight.get(d.name, 0) + 1
        self.gw.spawn(self._run(d, h, args, answer, request_id, CallInfo(principal=principal,
                                                                         hops=hops)),
                      f"shadow-{d.name}")

    async def _run(self, d: Deployment, h: Handler, args: dict[str, Any], answer: Any,
                   request_id: str, call: CallInfo) -> None:
        cfg = d.config
        shadow = str(cfg.shadow)
        try:
            target = self.gw.membership.get(shadow)
            handler = target.handlers.get(h.name) if target is not None else None
            if target is None or handler is None:
                self._count(d.name, shadow, "error")
                return
            try:
                got = await self.gw.dispatcher.invoke(
                    target, handler, args, request_id=f"{request_id}-shadow",
                    timeout_s=cfg.shadow_timeout_s, priority="batch", call=call)
            except SteadyError:  # refused, shed, failed, late: the candidate's, not the client's
                self._count(d.name, shadow, "error")
                return
            result = compare(answer, got, cfg.shadow_tolerance)
            if result.distance is not None:
                self.gw.metrics.shadow_distance.labels(d.name, shadow).observe(result.distance)
            if result.same:
                self._count(d.name, shadow, "match")
            else:
                self._count(d.name, shadow, "mismatch")
                self.mismatches.setdefault(d.name, deque(maxlen=MISMATCHES_KEPT)).append(
                    {"request_id": request_id, "distance": result.distance})
        finally:
            self.inflight[d.name] -= 1

    def _count(self, deployment: str, shadow: str, outcome: str) -> None:
        by = self.counts.setdefault(deployment, dict.fromkeys(OUTCOMES, 0))
        by[outcome] += 1
        self.gw.metrics.shadow_requests.labels(deployment, shadow, outcome).inc()

    def status(self, deployment: Deployment) -> dict[str, Any] | None:
        cfg = deployment.config
        if cfg.shadow is None:
            return None
        return {"to": cfg.shadow, "share": cfg.shadow_share,
                "counts": self.counts.get(deployment.name, dict.fromkeys(OUTCOMES, 0)),
                "inflight": self.inflight.get(deployment.name, 0),
                "last_mismatches": list(self.mismatches.get(deployment.name, ()))}
