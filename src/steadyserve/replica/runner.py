"""Runs model code off the event loop: one worker thread per replica, so batches never overlap
and torch gets the cores it was given. Async handlers run on the loop itself."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .blackbox import FlightRecorder


class Runner:
    def __init__(self, recorder: FlightRecorder | None = None) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="steadyserve-model")
        self._recorder = recorder or FlightRecorder(None)

    async def run(self, fn: Callable[..., Any], *args: Any, keys: list[str] | None = None) -> Any:
        """Run model code on the model thread; `keys` go to the flight recorder meanwhile."""
        if inspect.iscoroutinefunction(fn):
            return await fn(*args)
        recorder = self._recorder

        def recorded() -> Any:
            if keys:
                recorder.record(keys)
            try:
                return fn(*args)
            finally:
                if keys:
                    recorder.clear()

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, recorded)

    async def run_timed(
        self, fn: Callable[..., Any], kwargs: dict[str, Any], keys: list[str] | None = None
    ) -> tuple[Any, float, float]:
        """Run and return (result, started, finished) on the monotonic clock: the wait for the
        model thread is queueing, the rest is service time (the admission limit's signal)."""
        if inspect.iscoroutinefunction(fn):
            started = time.monotonic()
            return await fn(**kwargs), started, time.monotonic()
        recorder = self._recorder

        def timed() -> tuple[Any, float, float]:
            started = time.monotonic()
            if keys:
                recorder.record(keys)
            try:
                result = fn(**kwargs)
            finally:
                if keys:
                    recorder.clear()
            return result, started, time.monotonic()

        loop = asyncio.get_running_loop()
        # the caller's context (the request id its log lines carry) in the model thread too
        return await loop.run_in_executor(self._pool, contextvars.copy_context().run, timed)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
