"""A service whose replicas each do a fixed amount of work per second, like a replica that
owns one accelerator: a request holds the replica's one model thread for PACED_SERVICE_S
(default 50 ms) of sleep, so capacity grows with replicas, not with the machine's cores.
Loading takes PACED_LOAD_S (default 2 s). The autoscaling benchmark's load steps use it.
"""

from __future__ import annotations

import os
import time

import steadyserve

SERVICE_S = float(os.environ.get("PACED_SERVICE_S", "0.05"))


class Paced(steadyserve.Service):
    def setup(self) -> None:
        time.sleep(float(os.environ.get("PACED_LOAD_S", "2")))

    @steadyserve.handler
    def work(self, x: int = 0) -> dict:
        time.sleep(SERVICE_S)
        return {"x": x, "replica": os.environ.get("STEADYSERVE_REPLICA_ID", "")}
