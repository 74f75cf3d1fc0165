"""ASGI helpers shared by the gateway and the replica."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .errors import ClientGone

T = TypeVar("T")
Receive = Callable[[], Awaitable[dict[str, Any]]]


async def cancel_on_disconnect(receive: Receive, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, cancelling it if the peer disconnects first (call after the body
    has been read). Queued work of a client that went away is then dropped, not computed."""
    task = asyncio.current_task()
    assert task is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                gone = True
                task.cancel()
                return

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await awaitable
    except asyncio.CancelledError:
        if gone:
            task.uncancel()
            raise ClientGone("client disconnected") from None
        raise
    finally:
        watcher.cancel()
