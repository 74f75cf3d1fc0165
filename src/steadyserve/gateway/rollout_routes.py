"""Admin routes of rollouts: start one (a new stored target), read its progress, cancel it.

The supervisor's reconcile loop does the work; these routes only validate and store a target.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ClientError, NotFound
from .http import Request, Response, json_response
from .routes import find_deployment

if TYPE_CHECKING:
    from .app import Gateway


async def start(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    d = find_deployment(gw, params["deployment"])
    body = await req.json(gw.config.max_body_bytes)
    if not isinstance(body, dict):
        raise ClientError("request body must be a JSON object of deployment settings to change")
    if gw.control is None:
        raise ClientError("this gateway has no control plane to roll out with")
    return json_response(await gw.control.rollout(d.name, body))


async def status(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    raise NotFound("rollout status is being rebuilt")  # replaced by the reconcile-loop rollout


async def cancel(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    raise NotFound("rollout cancel is being rebuilt")  # replaced by the reconcile-loop rollout
