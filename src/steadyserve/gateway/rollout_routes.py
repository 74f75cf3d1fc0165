"""Admin routes of rollouts: start one (a new stored target), read its progress, cancel it.

The supervisor's reconcile loop does the work; these routes only validate and store a target,
so POST answers 202 at once and the rollout goes on whether or not the client stays:

    POST   /v1/admin/deployments/{name}/rollout   202 {revision, state: rolling, …};
                                                  400 (nothing changed), 409 (one is running)
    GET    /v1/admin/deployments/{name}/rollout   target, good revision, state, progress
    DELETE /v1/admin/deployments/{name}/rollout   cancel: back to the last good target; 409
                                                  when none is running

Canaries (control.canary): a progressive rollout to the candidate deployment the
configuration names, judged on the evidence:

    POST   /v1/admin/deployments/{name}/canary    200 the plan's first step; 404 no canary
                                                  declared, 409 one is running
    GET    /v1/admin/deployments/{name}/canary    step, share, verdict, evidence, history
    DELETE /v1/admin/deployments/{name}/canary    roll back now; 409 when none runs
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ClientError, NotFound
from .http import Request, Response, json_response
from .routes import find_deployment

if TYPE_CHECKING:
    from ..control.canary import CanaryController
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


def _canaries(gw: Gateway, deployment: str) -> CanaryController:
    if gw.canaries is None or deployment not in gw.canaries.plans:
        raise NotFound(f"deployment {deployment!r} declares no canary: add "
                       f"[deployments.{deployment}.canary] naming the candidate deployment")
    return gw.canaries


async def canary_start(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    d = find_deployment(gw, params["deployment"])
    return json_response(_canaries(gw, d.name).begin(d.name))


async def canary_status(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    d = find_deployment(gw, params["deployment"])
    return json_response(_canaries(gw, d.name).status(d.name))


async def canary_abort(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    d = find_deployment(gw, params["deployment"])
    by = f"key {req.principal.id}" if req.principal is not None else "the API"
    return json_response(_canaries(gw, d.name).abort(d.name, by=by))
