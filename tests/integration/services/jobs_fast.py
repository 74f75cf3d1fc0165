"""A fast service for the job tests. `work` waits a few milliseconds and, once it has run to
completion, appends its request id (`job-<id>-<attempt>`) to the file $JOBS_LOG — one
short O_APPEND write per line, so lines of concurrent replicas never interleave — which lets
a test count how often each job ran."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import steadyserve
from steadyserve.observe.logs import REQUEST_ID


class JobsFast(steadyserve.Service):
    @steadyserve.handler
    async def work(self, n: int, ms: float = 10.0) -> dict[str, Any]:
        await asyncio.sleep(ms / 1000)
        path = os.environ.get("JOBS_LOG")
        if path:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{REQUEST_ID.get()} {n}\n".encode())
            finally:
                os.close(fd)
        return {"n": n, "square": n * n, "pid": os.getpid()}
