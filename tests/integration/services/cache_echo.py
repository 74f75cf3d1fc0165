"""Cached test services for tests/integration/test_cache_processes.py.

`CacheEcho.echo` is cached by the gateway (tag `text:<text>`); `calls` says how often this
replica actually ran `echo`, so a test can tell a cache hit from an upstream call.

When the file named by CACHE_ECHO_BLOCK_FILE exists, `setup` sleeps 60 s: a replica
restarted by the supervisor then stays out of rotation for the rest of a test.

`CacheEchoSlowInvalidate` and `CacheKV` reproduce two cache bugs (the xfail tests).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import steadyserve


class CacheEcho(steadyserve.Service):
    def setup(self) -> None:
        marker = os.environ.get("CACHE_ECHO_BLOCK_FILE")
        if marker and os.path.exists(marker):
            time.sleep(60)
        self._lock = threading.Lock()
        self._calls = 0

    def _count(self) -> int:
        with self._lock:
            self._calls += 1
            return self._calls

    @steadyserve.handler(cache=True, cache_ttl_s=60, cache_tags=("text:{text}",))
    def echo(self, text: str) -> dict[str, Any]:
        return {"text": text, "pid": os.getpid(), "call": self._count()}

    @steadyserve.handler
    def calls(self) -> dict[str, Any]:
        with self._lock:
            return {"calls": self._calls, "pid": os.getpid()}


class CacheEchoShortTtl(CacheEcho):
    """The same, fresh for one second only (for stale-if-error)."""

    @steadyserve.handler(cache=True, cache_ttl_s=1, cache_tags=("text:{text}",))
    def echo(self, text: str) -> dict[str, Any]:
        return {"text": text, "pid": os.getpid(), "call": self._count()}


class CacheEchoSlowInvalidate(CacheEcho):
    """Takes half a second to drop its caches: the gateway that hears of an invalidation over
    pub/sub drops its L1 only after its replicas answered, so its window is visible."""

    def invalidate(self, tags: list[str]) -> None:
        time.sleep(0.5)


class CacheKV(steadyserve.Service):
    """A tiny key-value store in files under CACHE_KV_DIR: `get` is cached (tag `k:<key>`) and
    slow after its read (`GET_DELAY_S`), `put` invalidates the key's tag."""

    GET_DELAY_S = 1.0

    def setup(self) -> None:
        self.root = os.environ["CACHE_KV_DIR"]

    def _path(self, key: str) -> str:
        return os.path.join(self.root, f"{key}.txt")

    @steadyserve.handler(cache=True, cache_ttl_s=60, cache_tags=("k:{key}",))
    def get(self, key: str) -> dict[str, Any]:
        try:
            with open(self._path(key)) as f:
                value = f.read()
        except FileNotFoundError:
            value = ""
        time.sleep(self.GET_DELAY_S)  # the answer is computed from what was read above
        return {"key": key, "value": value}

    @steadyserve.handler(idempotent=False, invalidates=("k:{key}",))
    def put(self, key: str, value: str) -> dict[str, Any]:
        with open(self._path(key), "w") as f:
            f.write(value)
        return {"key": key, "value": value}
