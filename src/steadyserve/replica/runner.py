"""Runs model code off the event loop: one worker thread per replica, so batches never overlap
and torch gets the cores it was given. Async handlers run on the loop itself."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class Runner:
    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="steadyserve-model")

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if inspect.iscoroutinefunction(fn):
            return await fn(*args, **kwargs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    async def run_timed(self, fn: Callable[..., Any], **kwargs: Any) -> tuple[Any, float, float]:
        """Run and return (result, started, finished) on the monotonic clock: the wait for the
        model thread is queueing, the rest is service time (the admission limit's signal)."""
        if inspect.iscoroutinefunction(fn):
            started = time.monotonic()
            return await fn(**kwargs), started, time.monotonic()

        def timed() -> tuple[Any, float, float]:
            started = time.monotonic()
            result = fn(**kwargs)
            return result, started, time.monotonic()

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, timed)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
