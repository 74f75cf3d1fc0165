"""`GET /v1/logs`: the recent lines of the gateway's, its workers' and its replicas' log files,
filtered (admin: lines name keys, replicas and failures). `steadyserve logs --follow` polls it
with `since` set to the newest time stamp it has shown."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ClientError, NotFound
from ..observe import logfiles
from .http import Request, Response, json_response

if TYPE_CHECKING:
    from .app import Gateway

PARAMS = (("deployment", "only this deployment's lines (its replicas' and the gateway's)"),
          ("replica", "only lines naming this replica, e.g. echo-1"),
          ("level", "lowest level shown: debug, info, warning or error"),
          ("request_id", "only lines of this request (the X-Request-ID of its answer)"),
          ("since", "only lines at or after this Unix time (seconds)"),
          ("limit", "the most lines returned, newest kept: 1 to [observability] "
                    "log_query_max_lines (default 200)"))


def parse_query(req: Request, max_lines: int) -> logfiles.LogQuery:
    """The filters of a /v1/logs request; ClientError (400) naming a bad one."""
    level = req.query("level", 16)
    if level is not None and level.lower() not in logfiles.LEVELS:
        raise ClientError(f"'level' must be one of {list(logfiles.LEVELS)}", param="level")
    raw_since = req.query("since", 32)
    since = None
    if raw_since is not None:
        try:
            since = float(raw_since)
        except ValueError:
            since = math.nan
        if not math.isfinite(since) or since < 0:
            raise ClientError("'since' must be a Unix time in seconds, e.g. 1764690000.25",
                              param="since")
    text = logfiles.MAX_FILTER_CHARS
    return logfiles.LogQuery(
        deployment=req.query("deployment", text), replica=req.query("replica", text),
        level=level.lower() if level is not None else None,
        request_id=req.query("request_id", text), since=since,
        limit=req.query_int("limit", 1, max_lines, default=min(200, max_lines)))


async def logs(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    config = gw.full_config
    obs = config.observability
    query = parse_query(req, obs.log_query_max_lines)
    if config.log_dir is None:
        raise NotFound("this gateway writes no log files ([observability] log_files = false)")
    if query.deployment is not None and query.deployment not in gw.membership.deployments:
        raise NotFound(f"no deployment {query.deployment!r}", param="deployment")
    lines = await asyncio.to_thread(logfiles.read, Path(config.log_dir), query,
                                    obs.log_scan_bytes)
    return json_response({"lines": lines, "dir": config.log_dir})
