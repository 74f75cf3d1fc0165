"""Singleflight for the event loop: N concurrent identical misses → one upstream call.

The first caller of a key becomes its leader and computes it; later callers wait for the
leader's result. A leader that fails or is cancelled (its client hung up, its deadline passed)
does not fail the waiters: they are woken with `LeaderGone` and try again, one of them becoming
the next leader. The caller bounds the rounds (then it answers with the last leader's error,
so a failing upstream sees a few calls per key, not one per waiter) and each waiter keeps its
own deadline, since waiting is shielded from the shared future.

Keys are claimed in groups (`claim`) because a batched request's items are looked up and sent
upstream together: the leader of several keys resolves each one (`resolve` / `abandon`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Iterable
from typing import Any


class LeaderGone(Exception):
    """The leader of a key failed or went away before resolving it; try again.

    `error` is what the leader got (None: it was cancelled); `attributable` says the error
    belongs to this key alone (the leader asked for nothing else), so a client error (the
    same input is refused the same way) can be handed to the waiters as it is."""

    def __init__(self, reason: str, error: Exception | None = None, attributable: bool = False) -> None:
        super().__init__(reason)
        self.error = error
        self.attributable = attributable


class Singleflight:
    def __init__(self) -> None:
        self._flights: dict[Hashable, asyncio.Future[Any]] = {}
        self.coalesced = 0  # callers that waited instead of calling upstream

    def __len__(self) -> int:
        return len(self._flights)

    def claim(self, keys: Iterable[Hashable]) -> tuple[list[Hashable], dict[Hashable, asyncio.Future[Any]]]:
        """(keys this caller now leads, {key: future} of keys others are already computing)."""
        led: list[Hashable] = []
        joined: dict[Hashable, asyncio.Future[Any]] = {}
        loop = asyncio.get_running_loop()
        for key in keys:
            flight = self._flights.get(key)
            if flight is None or flight.done():
                self._flights[key] = loop.create_future()
                led.append(key)
            else:
                joined[key] = flight
                self.coalesced += 1
        return led, joined

    def resolve(self, key: Hashable, value: Any) -> None:
        flight = self._flights.pop(key, None)
        if flight is not None and not flight.done():
            flight.set_result(value)

    def abandon(self, keys: Iterable[Hashable], reason: str = "leader failed", *,
                error: Exception | None = None, attributable: bool = False) -> None:
        """The leader could not compute these: wake their waiters to try again."""
        for key in keys:
            flight = self._flights.pop(key, None)
            if flight is not None and not flight.done():
                flight.set_exception(LeaderGone(reason, error, attributable))
                flight.exception()  # retrieved: no "never retrieved" warning without waiters

    @staticmethod
    async def wait(flight: asyncio.Future[Any]) -> Any:
        """A waiter's view: its own cancellation never cancels the shared flight."""
        return await asyncio.shield(flight)
