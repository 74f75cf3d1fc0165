"""Whether this gateway leads, pure: from the outcomes of its lease calls and the time.

A gateway leads from a successful acquire or renew until `started + ttl × LEAD_SHARE` by
its own monotonic clock, where `started` is when that call began: the database stamped the
lease's expiry later than that, by its own clock, so the gateway stops acting on the lease
before anyone else may take it (and fenced writes catch what a paused process still tries).

    call outcome                      state after
    held by us (token t)              leading until started + ttl × LEAD_SHARE, token t
    held by another                   not leading; the leader's id and URL remembered
    the store did not answer          leading as before (until the same deadline); whether
                                      we led last is kept (`led_last`): the alert duty stays
                                      with the gateway that led, so an outage of the store
                                      (DatabaseDown) is still told, by exactly one gateway
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Protocol

Fence = tuple[str, str, int]  # (lease name, holder, token), as store.database checks it

LEAD_SHARE = 0.8  # of the TTL a leader acts on one successful call


def gateway_of(holder: str) -> str:
    """The gateway id of a lease holder ("<gateway_id>#<incarnation>"; "" for nobody)."""
    return holder.rpartition("#")[0] or holder


@dataclass(frozen=True, slots=True)
class Seen:
    """What one lease call returned (None fields: the store did not answer)."""

    holder: str
    token: int
    url: str
    mine: bool


@dataclass(frozen=True, slots=True)
class LeaseState:
    leading_until: float = -math.inf  # monotonic seconds
    token: int = 0  # the fencing token of our lease (0: never held)
    holder: str = ""  # the last holder seen ("" unknown)
    url: str = ""
    led_last: bool = False  # we held the lease at the last answer the store gave
    store_down: bool = False  # the last call failed

    def leading(self, now: float) -> bool:
        return now < self.leading_until

    def after(self, seen: Seen | None, started: float, ttl_s: float) -> LeaseState:
        if seen is None:
            return replace(self, store_down=True)
        if seen.mine:
            return LeaseState(started + ttl_s * LEAD_SHARE, seen.token, seen.holder, seen.url,
                              led_last=True)
        return LeaseState(holder=seen.holder, url=seen.url)

    def alerting(self, now: float) -> bool:
        """Whether this gateway evaluates alerts and notifies: while it leads, and while the
        store is unreachable if it was the last to lead."""
        return self.leading(now) or (self.store_down and self.led_last)


class Lead(Protocol):
    """What the singleton duties ask."""

    clustered: bool  # several gateways share the database (followers report and follow)

    def leading(self) -> bool: ...
    def alerting(self) -> bool: ...
    def fence(self) -> Fence | None: ...
    def require(self, what: str) -> None: ...
    def status(self) -> dict[str, Any]: ...


class Alone:
    """[cluster] off: this gateway does every duty, unfenced."""

    clustered = False

    def leading(self) -> bool:
        return True

    def alerting(self) -> bool:
        return True

    def fence(self) -> Fence | None:
        return None

    def require(self, what: str) -> None:
        return None

    def status(self) -> dict[str, Any]:
        return {"enabled": False, "leading": True}

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None
