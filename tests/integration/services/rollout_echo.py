"""An echo service whose new version can be told to break partway through a rollout.

With BREAK_AFTER_FIRST=1 in its environment (a key the test's deployment lists in
`rollout_env`), every replica but the first of a revision (ids ending in "-0") hangs in
`setup()` and never becomes ready: a rollout that fails at step 1, after one old replica
was already replaced.
"""

from __future__ import annotations

import os
import time
from typing import Any

import steadyserve


class Echo(steadyserve.Service):
    def setup(self) -> None:
        replica = os.environ.get("STEADYSERVE_REPLICA_ID", "")
        if os.environ.get("BREAK_AFTER_FIRST") == "1" and not replica.endswith("-0"):
            time.sleep(3600)  # never ready; the gateway gives up and kills it

    @steadyserve.handler
    def slow(self, seconds: float) -> dict[str, Any]:
        time.sleep(seconds)
        return {"slept": seconds, "pid": os.getpid(),
                "broken_build": os.environ.get("BREAK_AFTER_FIRST", "")}
