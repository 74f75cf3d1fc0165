"""A streaming service for the integration tests: numbered items at a steady pace, each
saying which process made it; it keeps what it produced and when, for counting after a
client left."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import steadyserve


class Streamer(steadyserve.Service):
    def setup(self) -> None:
        self.lock = threading.Lock()
        self.produced: dict[str, int] = {}
        self.last_at: dict[str, float] = {}
        self.closed: dict[str, float] = {}

    @steadyserve.handler(timeout_s=60)
    def count(self, tag: str, n: int = 1000, delay_s: float = 0.02) -> Iterator[dict[str, Any]]:
        try:
            for i in range(n):
                time.sleep(delay_s)
                with self.lock:
                    self.produced[tag] = self.produced.get(tag, 0) + 1
                    self.last_at[tag] = time.time()
                yield {"i": i, "pid": os.getpid()}
        finally:
            with self.lock:
                self.closed[tag] = time.time()

    @steadyserve.handler
    def produced_by(self, tag: str) -> dict[str, Any]:
        with self.lock:
            return {"produced": self.produced.get(tag, 0), "last_at": self.last_at.get(tag),
                    "closed_at": self.closed.get(tag), "pid": os.getpid()}
