"""`GET /openapi.json`: an OpenAPI 3.1 document of this gateway, generated, never written.

Two sources, each declared once elsewhere:
  * the route table (`gateway.app.ROUTES`): method, path, access class (→ security),
    summary, request body schema, success statuses;
  * every deployment's handlers, from their type hints (`schema.describe_params`, the same
    description the gateway validates requests with): one concrete path per handler,
    `/v1/deployments/<deployment>/<handler>`, whose body schema is exactly what the
    validator accepts (no unknown fields, required ones required, item counts bounded).

Errors share one schema (`{"error": {"code", "message", …}}`) under `default`, since any
route can answer 401/413/415/429/503 and more from the edge.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import __version__
from ..cache.invalidation import request_schema
from ..config import DeploymentConfig
from ..control.launcher import max_replicas, usable_cores, usable_memory_bytes
from ..dashboard.routes import ASSETS
from ..policies.alert_lifecycle import silence_schema
from ..policies.rollout import changes_schema
from .http import Request, Response, json_response
from .log_routes import PARAMS

if TYPE_CHECKING:
    from .app import Gateway
    from .membership import Handler
    from .router import Route

ERROR = {"$ref": "#/components/schemas/Error"}
PAGE_MEDIA = {"/": ["text/html"],
              "/dashboard/{asset}": ["text/html", "text/javascript", "text/css"]}
OIP_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
JSON_ANY: dict[str, Any] = {}
# query parameters per route (read with Request.query_int, which answers 400 to others)
QUERY_PARAMS: dict[str, tuple[tuple[str, str], ...]] = {
    "/v1/cache": (("top", "how many of the hottest keys to list: 1 to 1000"),),
    "/v1/dashboard": (("history", "minutes of history to add, 1 to 4320 (steps of a second "
                                  "up to 10 minutes, else of a minute or more: at most 720)"),),
    "/v1/logs": PARAMS,
    "/v1/feedback/summary": (("days", "days back: 1 to 366 (default 7)"),
                             ("deployment", "only this deployment")),
    "/v1/admin/keys/usage": (("days", "UTC days back, today included: 1 to 366 (default 7)"),
                             ("limit", "the most rows: 1 to 1000 (default 100)")),
    "/v1/jobs": (("state", "only jobs in this state: queued, running, succeeded, failed, dead, "
                           "cancelled or expired"),
                 ("limit", "the most jobs, newest first: 1 to [jobs] max_list (default 100 or "
                           "max_list if smaller)")),
}


def json_schema(desc: dict[str, Any]) -> dict[str, Any]:
    """A `schema.TypeDesc` as JSON Schema (2020-12, which OpenAPI 3.1 uses)."""
    kind = desc["kind"]
    if kind == "str":
        return {"type": "string"}
    if kind == "int":
        # the gateway parses JSON with orjson: integers beyond 64 bits are refused as invalid
        return {"type": "integer", "minimum": -(2**63), "maximum": 2**64 - 1}
    if kind == "float":
        return {"type": "number"}
    if kind == "bool":
        return {"type": "boolean"}
    if kind == "dict":
        return {"type": "object"}
    if kind == "list":
        return {"type": "array", "items": json_schema(desc["item"])}
    if kind == "optional":
        inner = json_schema(desc["item"])
        return {"anyOf": [inner, {"type": "null"}]}
    if kind == "object":
        return {
            "type": "object", "title": desc["name"],
            "properties": {k: json_schema(v) for k, v in desc["fields"].items()},
            "required": list(desc["required"]), "additionalProperties": False,
        }
    return {}  # any, bytes


def handler_body(h: Handler) -> dict[str, Any]:
    props: dict[str, Any] = {}
    for p in h.spec.params:
        props[p["name"]] = json_schema(p["type"])
    if h.item_param:  # batched: a non-empty list of at most max_inputs items
        props[h.item_param] = {**props[h.item_param], "minItems": 1,
                               "maxItems": h.spec.options.max_inputs}
    return {"type": "object", "properties": props,
            "required": [p["name"] for p in h.spec.params if p["required"]],
            "additionalProperties": False}


def _security(access: str) -> list[dict[str, list[str]]]:
    if access == "public":
        return []
    if access == "admin":
        return [{"apiKey": []}]
    return [{"apiKey": []}, {}]  # open while inference is open (README, "Access control")


# Header and query values are declared as plain strings: the gateway answers 400 to values
# it does not take (the description says which), a rule JSON Schema cannot state exactly
# (headers are case-insensitive and trimmed).
INFER_HEADERS: list[dict[str, Any]] = [
    {"name": "X-Priority", "in": "header", "required": False, "schema": {"type": "string"},
     "description": "interactive (default) or batch: batch is shed first under overload"},
    {"name": "X-Request-Timeout-Ms", "in": "header", "required": False,
     "schema": {"type": "string"},
     "description": "whole milliseconds > 0: the deadline of the whole request, all attempts "
                    "(at most [gateway] request_timeout_s). One shorter than the handler "
                    "normally needs answers 504 deadline_exceeded, held against no replica"},
]


def _operation(route: Route, *, path_params: list[str], body: dict[str, Any] | None,
               summary: str, op_id: str, deployments: list[str] | None = None) -> dict[str, Any]:
    media = "text/plain" if route.pattern == "/metrics" else "application/json"
    ok_schema = {"type": "string"} if media == "text/plain" else JSON_ANY
    ok_content: dict[str, Any] = {media: {"schema": ok_schema}}
    if route.pattern in PAGE_MEDIA:  # the dashboard's page and assets
        ok_content = {m: {"schema": {"type": "string"}} for m in PAGE_MEDIA[route.pattern]}
    if route.tag == "oip" and route.access == "infer":  # the binary data extension
        ok_content["application/octet-stream"] = {"schema": {"type": "string"}}
    op: dict[str, Any] = {
        "operationId": op_id, "summary": summary, "tags": [route.tag or "gateway"],
        "security": _security(route.access),
        "responses": {
            **{str(status): {"description": "success", "content": ok_content}
               for status in (route.responses or (200,))},
            "default": {"description": "an error: what was wrong, in one sentence",
                        "content": {"application/json": {
                            "schema": OIP_ERROR if route.tag == "oip" else ERROR}}},
        },
    }
    params: list[dict[str, Any]] = [{"name": name, "in": "path", "required": True,
               "schema": {"enum": deployments} if name in ("deployment", "model") and deployments
               else {"enum": sorted(ASSETS)} if name == "asset"
               else {"type": "string", "pattern": "^[A-Za-z0-9._:+=-]{1,128}$"}
               if name == "request_id"
               else {"type": "string", "pattern": "^[A-Za-z0-9_.:@-]{1,128}$"}}
              for name in path_params]
    if route.access == "infer":
        params += INFER_HEADERS
    params += [{"name": name, "in": "query", "required": False, "schema": {"type": "string"},
                "description": description}
               for name, description in QUERY_PARAMS.get(route.pattern, ())]
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {"required": not route.body_optional,
                             "content": {"application/json": {"schema": body}}}
    return op


ROLLOUT = "/v1/admin/deployments/{deployment}/rollout"
INVOKE = "/v1/deployments/{deployment}/{handler}"


def _request_schemas(gw: Gateway) -> dict[str, dict[str, Any]]:
    """Bodies whose schema depends on this gateway's configuration and deployments; each is
    declared beside the code that validates it."""
    cache = gw.full_config.cache
    embedders = [d.name for d in gw.membership.deployments.values()
                 if d.openai_handler("embeddings") is not None]
    schemas: dict[str, dict[str, Any]] = {
        "/v1/cache/invalidate": request_schema(max_tags=cache.max_invalidation_tags,
                                               max_tag_bytes=cache.max_tag_bytes),
        "/v1/embeddings": embeddings_schema(embedders),
    }
    if gw.alerting is not None:  # silences answer 404 without the alerting engine
        schemas["/v1/silences"] = silence_schema(gw.alerting.silence_limits)
    return schemas


def _max_replicas(gw: Gateway, name: str) -> int:
    known = getattr(gw.control, "max_replicas", None)
    if isinstance(known, dict) and name in known:
        return int(known[name])
    d = gw.membership.deployments[name].config
    return max_replicas(d, usable_cores(), usable_memory_bytes())


def document(gw: Gateway, routes: tuple[Route, ...]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    names = sorted(gw.membership.deployments)
    dynamic = _request_schemas(gw)
    for route in routes:
        if route.pattern in (INVOKE, ROLLOUT):
            continue  # one concrete path per handler / deployment below, with its own schema
        path_params = [s[1:-1] for s in route.segments if s.startswith("{")]
        body = dynamic.get(route.pattern, route.request_schema) \
            if route.json_body or route.request_schema is not None else None
        if route.json_body and body is None:
            body = {"type": "object"}
        # one function may serve a path with and without a version (the v2 model routes)
        op_id = f"{route.method.lower()}_{route.fn.__name__}" + \
            ("_at_version" if "{version}" in route.pattern else "")
        paths.setdefault(route.pattern, {})[route.method.lower()] = _operation(
            route, path_params=path_params, body=body, summary=route.summary, op_id=op_id,
            deployments=names)
    for route in routes:
        if route.pattern != ROLLOUT:
            continue
        for name in names:
            base = gw.membership.deployments[name].config
            body = changes_schema(_base_config(gw, name, base), _max_replicas(gw, name)) \
                if route.json_body else None
            paths.setdefault(f"/v1/admin/deployments/{name}/rollout", {})[route.method.lower()] = \
                _operation(route, path_params=[], body=body, summary=f"{route.summary} ({name})",
                           op_id=f"{route.method.lower()}_rollout_{_ident(name)}")
    invoke = next(r for r in routes if r.pattern == INVOKE)
    for d in gw.membership.deployments.values():
        for name, h in sorted(d.handlers.items()):
            kind = "batched" if h.spec.options.batch else "one call per request"
            paths[f"/v1/deployments/{d.name}/{name}"] = {"post": _operation(
                invoke, path_params=[], body=handler_body(h),
                summary=f"{d.name}.{name} ({kind}, version {d.version or '-'})",
                op_id=f"invoke_{_ident(d.name)}_{name}")}
    return {
        "openapi": "3.1.0",
        "info": {"title": "steadyserve gateway", "version": __version__,
                 "description": "Generated from the route table and the handlers' type hints."},
        "paths": paths,
        "components": {
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer",
                                           "description": "an API key, ss_…"}},
            "schemas": {"Error": {
                "type": "object", "required": ["error"],
                "properties": {"error": {
                    "type": "object", "required": ["message", "code"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                                   "param": {"type": ["string", "null"]},
                                   "type": {"type": "string"},
                                   "request_id": {"type": "string"}},
                }},
            }},
        },
    }


def _ident(name: str) -> str:
    return name.replace("-", "_").replace(".", "_")


def _base_config(gw: Gateway, name: str, current: DeploymentConfig) -> DeploymentConfig:
    """The deployment as the configuration file declares it (its allow-lists)."""
    for d in gw.full_config.deployments:
        if d.name == name:
            return d
    return current


def embeddings_schema(models: list[str]) -> dict[str, Any]:
    """What `openai.embeddings` accepts: other fields of OpenAI's API are ignored."""
    text = {"type": "string", "minLength": 1}
    return {
        "type": "object", "required": ["model", "input"],
        "properties": {
            "model": {"enum": models} if models else {"type": "string"},
            "input": {"anyOf": [text, {"type": "array", "minItems": 1, "items": text}]},
            "encoding_format": {"enum": ["float", "base64", None]},
            "dimensions": {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "null"}]},
        },
    }


async def openapi_json(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    return json_response(document(gw, gw.router.routes))
