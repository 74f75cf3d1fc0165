"""Background tasks owned by a component: stopping one is cancel, then wait for it to end."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


def consume_outcome(future: asyncio.Future[Any]) -> None:
    """A done-callback for a call nobody may await any more (it timed out): retrieve its
    outcome, so an exception it ends with is not reported as never retrieved."""
    if not future.cancelled():
        future.exception()


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task and wait until it has finished (its `finally` blocks run)."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
