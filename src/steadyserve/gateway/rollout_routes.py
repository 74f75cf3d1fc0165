"""Admin routes of rollouts: start one (a new stored target), read its progress, cancel it.

The supervisor's reconcile loop does the work; these routes only validate and store a target,
so POST answers 202 at once and the rollout goes on whether or not the client stays:

    POST   /v1/admin/deployments/{name}/rollout   202 {revision, state: rolling, …};
                                                  400 (nothing changed), 409 (one is running)
    GET    /v1/admin/deployments/{name}/rollout   target, good revision, state, progress
    DELETE /v1/admin/deployments/{name}/rollout   cancel: back to the last good target; 409
                                                  when none is running
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ClientError, NotFound
from .http import Request, Response, json_response
from .routes import find_deployment

if TYPE_CHECKING:
    from .app import ControlPlane, Gateway


def _control(gw: Gateway) -> ControlPlane:
    if gw.control is None:
        raise NotFound("this gateway runs no control plane: nothing here rolls out replicas")
    return gw.control


async def start(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    d = find_deployment(gw, params["deployment"])
    control = _control(gw)
    body = await req.json(gw.config.max_body_bytes)
    if not isinstance(body, dict):
        raise ClientError("request body must be a JSON object of deployment settings to change")
    return json_response(await control.rollout(d.name, body), status=202)


async def status(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    d = find_deployment(gw, params["deployment"])
    return json_response(_control(gw).rollout_status(d.name))


async def cancel(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    d = find_deployment(gw, params["deployment"])
    return json_response(await _control(gw).cancel_rollout(d.name))
