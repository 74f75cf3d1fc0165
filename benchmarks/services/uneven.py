"""A model whose replicas differ: each request computes for BASE_MS × (1 + chars / 2000) on
the replica's one model thread (so queued requests wait, as on a GPU), and the replica named
`*-0` takes UNEVEN_SLOW_FACTOR times as long (a throttled node, a CPU replica beside GPU ones).
The "compute" is a sleep: the replicas stand for hardware of their own, and the 2-core
machine's CPU stays with the gateway and the load generator, whose cost is what differs
between balancers.

    UNEVEN_SLOW_FACTOR=3 .venv/bin/steadyserve run benchmarks/services/uneven.py:Uneven \\
        --replicas 3 --balancer least_squares
"""

from __future__ import annotations

import os
import time

import steadyserve

BASE_MS = float(os.environ.get("UNEVEN_BASE_MS", "8"))


def service_time_s(chars: int, slow_factor: float = 1.0) -> float:
    return BASE_MS / 1000 * (1 + chars / 2000) * slow_factor


class Uneven(steadyserve.Service):
    def setup(self) -> None:
        self.replica = os.environ.get("STEADYSERVE_REPLICA_ID", "")
        slow = self.replica.endswith("-0")
        self.factor = float(os.environ.get("UNEVEN_SLOW_FACTOR", "3")) if slow else 1.0

    @steadyserve.handler
    def work(self, text: str) -> dict:
        time.sleep(service_time_s(len(text), self.factor))
        return {"chars": len(text), "replica": self.replica}  # the load generator counts it
