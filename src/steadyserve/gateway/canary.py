"""Canary traffic split, the data plane's half: which arm serves a request, and what each arm
did (the controller's evidence, control.canary).

A deployment with a running canary has a `Split`: the candidate deployment, its share in
percent, a salt and an epoch (the step). `call` hashes the request's sticky key (the first of
the canary's `sticky_headers` present, else the request id) with the salt
(policies.canary.assign) and sends it to the candidate or the baseline, through the same
dispatch as any request (admission, balancing, retries, response cache: the candidate's own).

The client never pays for a failing candidate: a candidate that fails a request with a
server error (5xx, a lost replica, a timeout) while time is left gets it sent again to the
baseline, once — except for handlers that are not idempotent or change data (`idempotent=
False`, `invalidates=`), which are never sent twice — and the failure still counts against
the candidate. A candidate with no ready replica or no such handler is skipped (counted as
`unavailable`), never an error.

Each arm's outcomes (answered, errors, latency of the dispatch alone: the same span for both
arms) accumulate per epoch in `Observations`, bounded (`max_latencies` per arm); the gateway
process takes them each tick, data-plane workers send theirs with their one-second report.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ClientError, SteadyError
from ..policies.canary import assign

if TYPE_CHECKING:
    from .http import Request
    from .membership import Deployment, Handler
    from .plane import DataPlane

ARMS = ("baseline", "candidate")
MAX_STICKY_KEY_CHARS = 256  # a longer header value is hashed by its first 256 characters


@dataclass(frozen=True, slots=True)
class Split:
    candidate: str
    percent: float
    salt: str
    epoch: int
    sticky_headers: tuple[str, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {"candidate": self.candidate, "percent": self.percent, "salt": self.salt,
                "epoch": self.epoch, "sticky_headers": list(self.sticky_headers)}

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Split:
        return cls(candidate=str(raw["candidate"]), percent=float(raw["percent"]),
                   salt=str(raw["salt"]), epoch=int(raw["epoch"]),
                   sticky_headers=tuple(str(h) for h in raw.get("sticky_headers", ())))


class ArmTally:
    __slots__ = ("errors", "failovers", "latencies", "n", "unavailable")

    def __init__(self) -> None:
        self.n = 0
        self.errors = 0
        self.latencies: list[float] = []
        self.unavailable = 0  # candidate picked but not servable: served by the baseline
        self.failovers = 0  # candidate failed, the baseline answered instead

    def to_wire(self) -> list[Any]:
        return [self.n, self.errors, self.latencies, self.unavailable, self.failovers]


class Observations:
    """Outcomes per deployment, epoch and arm since the last `take` (bounded)."""

    def __init__(self, max_latencies: Callable[[str], int]) -> None:
        self.max_latencies = max_latencies
        self.tallies: dict[tuple[str, int, str], ArmTally] = {}

    def tally(self, deployment: str, epoch: int, arm: str) -> ArmTally:
        key = (deployment, epoch, arm)
        t = self.tallies.get(key)
        if t is None:
            t = self.tallies[key] = ArmTally()
        return t

    def observe(self, deployment: str, epoch: int, arm: str, seconds: float | None,
                error: bool) -> None:
        t = self.tally(deployment, epoch, arm)
        t.n += 1
        if error:
            t.errors += 1
        elif seconds is not None and len(t.latencies) < self.max_latencies(deployment):
            t.latencies.append(seconds)

    def take(self) -> list[list[Any]]:
        """What was observed since the last take, as JSON-able rows (the wire format):
        [deployment, epoch, arm, n, errors, latencies, unavailable, failovers]."""
        rows = [[d, e, a, *t.to_wire()] for (d, e, a), t in self.tallies.items()]
        self.tallies = {}
        return rows


def parse_rows(raw: Any, max_rows: int = 1024) -> list[tuple[str, int, str, ArmTally]]:
    """Rows from a worker's report, checked (a malformed row is dropped, never raised)."""
    out: list[tuple[str, int, str, ArmTally]] = []
    if not isinstance(raw, list):
        return out
    for row in raw[:max_rows]:
        try:
            d, e, a, n, errors, lat, unavailable, failovers = row
            t = ArmTally()
            t.n, t.errors = int(n), int(errors)
            t.unavailable, t.failovers = int(unavailable), int(failovers)
            t.latencies = [float(v) for v in lat][:1_000_000]
            if a in ARMS and t.n >= 0 and t.errors >= 0:
                out.append((str(d), int(e), str(a), t))
        except (TypeError, ValueError):
            continue
    return out


class Splits:
    """The splits this data plane applies (set by the controller, or by the gateway
    process's state message in a worker) and what it observed."""

    def __init__(self) -> None:
        self.splits: dict[str, Split] = {}
        self.max_latencies: dict[str, int] = {}
        self.observations = Observations(lambda d: self.max_latencies.get(d, 20_000))
        self.on_change: Callable[[], None] | None = None

    def set(self, deployment: str, split: Split | None, max_latencies: int = 20_000) -> None:
        if split is None or split.percent <= 0:
            changed = self.splits.pop(deployment, None) is not None
        else:
            changed = self.splits.get(deployment) != split
            self.splits[deployment] = split
            self.max_latencies[deployment] = max_latencies
        if changed and self.on_change is not None:
            self.on_change()

    def get(self, deployment: str) -> Split | None:
        return self.splits.get(deployment)

    def to_wire(self) -> dict[str, Any]:
        return {name: {**s.to_wire(), "max_latencies": self.max_latencies.get(name, 20_000)}
                for name, s in self.splits.items()}

    def apply_wire(self, raw: Any) -> None:
        """A worker's splits become what the gateway process sent (its state message)."""
        if not isinstance(raw, dict):
            return
        for name in [n for n in self.splits if n not in raw]:
            self.set(name, None)
        for name, s in raw.items():
            try:
                self.set(str(name), Split.from_wire(s), int(s.get("max_latencies", 20_000)))
            except (KeyError, TypeError, ValueError):
                continue

    def sticky_key(self, split: Split, req: Request) -> str:
        for name in split.sticky_headers:
            value = req.header(name.encode())
            if value:
                return "h:" + value[:MAX_STICKY_KEY_CHARS]
        return "r:" + req.request_id


Invoke = Callable[["Deployment", "Handler", float], Awaitable[Any]]


async def call(gw: DataPlane, req: Request, d: Deployment, h: Handler, split: Split,
               invoke: Invoke, timeout_s: float) -> Any:
    """Serve the request from the arm its sticky key falls in (the module's docstring)."""
    splits = gw.splits
    obs = splits.observations
    if assign(splits.sticky_key(split, req), split.salt, split.percent):
        cand = gw.membership.get(split.candidate)
        ch = cand.handlers.get(h.name) if cand is not None else None
        if cand is None or ch is None or not cand.endpoints:
            obs.tally(d.name, split.epoch, "candidate").unavailable += 1
        else:
            req.call.arm = "candidate"
            started = time.monotonic()
            try:
                answer = await invoke(cand, ch, timeout_s)
            except ClientError:  # the request's fault (4xx): not the candidate's
                obs.observe(d.name, split.epoch, "candidate", None, False)
                raise
            except SteadyError:
                obs.observe(d.name, split.epoch, "candidate", None, True)
                left = timeout_s - (time.monotonic() - started)
                opts = h.spec.options
                if opts.invalidates or not opts.idempotent or left <= 0.001 or not d.endpoints:
                    raise
                obs.tally(d.name, split.epoch, "candidate").failovers += 1
                req.call.arm = "failover"
                return await invoke(d, h, left)  # the baseline answers; counted for neither
            obs.observe(d.name, split.epoch, "candidate", time.monotonic() - started, False)
            return answer
    req.call.arm = "baseline"
    started = time.monotonic()
    try:
        answer = await invoke(d, h, timeout_s)
    except ClientError:
        obs.observe(d.name, split.epoch, "baseline", None, False)
        raise
    except SteadyError:
        obs.observe(d.name, split.epoch, "baseline", None, True)
        raise
    obs.observe(d.name, split.epoch, "baseline", time.monotonic() - started, False)
    return answer
