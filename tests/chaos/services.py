"""The chaos test service. Deployed as `tests/chaos/services.py:Work`.

`work(x)` holds the replica's single model thread for 20 ms (time.sleep), so one replica
serves about 50 requests/s, and answers `{"x": x, "replica": <replica id>}`.

Faults, per replica, from `<CHAOS_CONTROL_DIR>/service-<replica_id>.json` (re-read only when
the file changes; missing = no faults):
    fail_500   true: raise RuntimeError            → the replica answers 500 (handler_failed)
    fail_503   true: raise ReplicaUnavailable      → the replica answers 503
    delay_s    extra seconds of sleep per request (still holding the model thread)
and `x == "poison"` crashes the replica at once (os._exit(1)).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import steadyserve
from steadyserve.errors import ReplicaUnavailable

WORK_S = 0.020
SERVICE_KEYS = frozenset({"fail_500", "fail_503", "delay_s"})


class ServiceControl:
    """The control file of one replica, re-read only when its (mtime, size, inode) changes."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._key: tuple[int, int, int] | None = None
        self.flags: dict[str, Any] = {}

    @classmethod
    def from_env(cls) -> ServiceControl:
        control_dir = os.environ.get("CHAOS_CONTROL_DIR")
        replica = os.environ.get("STEADYSERVE_REPLICA_ID")
        if not control_dir or not replica:
            return cls(None)
        return cls(Path(control_dir) / f"service-{replica}.json")

    def current(self) -> dict[str, Any]:
        if self.path is None:
            return self.flags
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._key, self.flags = None, {}
            return self.flags
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        if key != self._key:
            try:
                data = json.loads(self.path.read_bytes() or b"{}")
            except (OSError, ValueError):
                return self.flags  # half-written: keep the old flags, retry next time
            self._key = key
            self.flags = data if isinstance(data, dict) else {}
        return self.flags


class Work(steadyserve.Service):
    def setup(self) -> None:
        self.replica_id = os.environ.get("STEADYSERVE_REPLICA_ID", "unknown")
        self.control = ServiceControl.from_env()

    @steadyserve.handler
    def work(self, x: str) -> dict[str, Any]:
        if x == "poison":
            os._exit(1)
        flags = self.control.current()
        if flags.get("fail_500"):
            raise RuntimeError(f"chaos: fail_500 on {self.replica_id}")
        if flags.get("fail_503"):
            exc = ReplicaUnavailable("chaos")
            exc.status = 503  # ReplicaUnavailable is 502 by default; the fault is "answers 503"
            raise exc
        time.sleep(WORK_S + float(flags.get("delay_s", 0.0) or 0.0))
        return {"x": x, "replica": self.replica_id}

    @steadyserve.handler(hedge=True)
    def work_hedged(self, x: str) -> dict[str, Any]:
        """The same work, hedged: after the observed p95 a second replica is asked too."""
        return self.work(x)

    @steadyserve.handler(per_try_timeout_s=1.0)
    def work_guarded(self, x: str) -> dict[str, Any]:
        """The same work with a 1 s per-try timeout: a silent replica costs ≤ 1 s, then a retry."""
        return self.work(x)
