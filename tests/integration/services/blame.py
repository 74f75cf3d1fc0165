"""A service whose handler fails for some inputs, for the blame tests in test_hostile.py.

`work(x)` appends one line "<replica id> <x>" to the file named by BLAME_LOG for every
execution (a test counts how often an input ran, across replicas), then:

- x starting with "bad": raises ValueError, the request's own fault (500 handler_failed);
- x starting with "retry" on a replica whose id ends in "-0": raises RetryableError ("not
  here, not now"), which the gateway retries on another replica;
- anything else: answers with the replica that ran it.
"""

from __future__ import annotations

import os
from typing import Any

import steadyserve


class Blame(steadyserve.Service):
    @steadyserve.handler
    def work(self, x: str) -> dict[str, Any]:
        replica = os.environ.get("STEADYSERVE_REPLICA_ID", "")
        # one short O_APPEND write per execution: lines from both replicas never interleave
        fd = os.open(os.environ["BLAME_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{replica} {x}\n".encode())
        finally:
            os.close(fd)
        if x.startswith("bad"):
            raise ValueError(f"cannot work on {x!r}")
        if x.startswith("retry") and replica.endswith("-0"):
            raise steadyserve.RetryableError("this replica cannot take it now")
        return {"x": x, "replica": replica}
