"""Who may send this request: checked once per request, before any route runs.

    Host allow-list (DNS rebinding) ─► cross-site Origin on a state change ─► credential for
    the route's access class (gateway.router) ─► the key's rate ─► Content-Type of JSON routes

Probes (`public` routes) skip all of it. A valid key is remembered on the request
(`req.principal`): routes then check its deployments (`allow_deployment`) and admission uses
its priority (`priority_for`). CORS is off unless `[gateway] cors_origins` lists origins.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..auth.childcalls import GrantUses
from ..auth.exposure import inference_open
from ..auth.keyring import CHILD_TOKEN_PREFIX, KeyRing
from ..auth.keys import ApiKey
from ..auth.tokens import key_id_of
from ..config import Config
from ..errors import (
    CallDepthExceeded,
    Forbidden,
    HostNotAllowed,
    TooManyChildCalls,
    Unauthorized,
    UnsupportedMediaType,
)
from .http import Request, Response
from .router import Route

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CORS_HEADERS = b"authorization, content-type, content-encoding, x-request-id, x-priority, " \
               b"x-request-timeout-ms, traceparent, tracestate, cache-control"


def host_of(value: str | None) -> str | None:
    """The host part of a Host header (no port, no brackets, lowercased); None if absent."""
    if not value:
        return None
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else None
    host, sep, port = value.rpartition(":")
    if sep and port.isdigit():
        return host
    return value


def _has_body(req: Request) -> bool:
    """A body is coming (a declared length or chunked): bodiless POSTs need no Content-Type."""
    length = req.header(b"content-length")
    return (length is not None and length.strip() != "0") \
        or req.header(b"transfer-encoding") is not None


class Access:
    def __init__(self, config: Config, keys: KeyRing, *,
                 wall: Callable[[], float] = time.time) -> None:
        self.config = config
        self.gateway = config.gateway
        self.keys = keys
        self.wall = wall
        self.cors = frozenset(self.gateway.cors_origins)
        self._callees = {d.name: frozenset(d.calls) for d in config.deployments}
        self.grant_uses = GrantUses(self.gateway.max_child_calls_per_request)

    @property
    def inference_open(self) -> bool:
        return inference_open(self.config, self.keys.user_keys_exist())

    def check_host(self, req: Request) -> None:
        host = host_of(req.header(b"host"))
        if host is None:
            raise HostNotAllowed("a Host header is required")
        if not self.gateway.host_allowed(host):
            raise HostNotAllowed(f"host {host[:100]!r} is not served here; add it to "
                                 "[gateway] allowed_hosts if it should be")

    def check(self, req: Request, route: Route) -> None:
        """Raise the 4xx this request deserves, or return with `req.principal` set."""
        if route.access == "public":
            return
        if req.method not in SAFE_METHODS:
            self._check_origin(req)
        key = self._credential(req, lenient=route.access != "admin")
        req.principal = key
        if req.child:
            self._check_child(req, route)
        if route.access == "admin":
            if key is None:
                raise Unauthorized("admin routes need an admin key, on loopback too: send "
                                   "'Authorization: Bearer <key>' (the local CLI reads it from "
                                   f"{self.config.data_dir}/{self.config.auth.admin_key_file})")
            if not key.allows("admin"):
                raise Forbidden(f"API key ss_{key.id}_… lacks the 'admin' scope")
        elif key is None:
            if not self.inference_open:
                raise Unauthorized("this gateway needs an API key: send 'Authorization: Bearer "
                                   "<key>' (create one with `steadyserve keys create NAME`)")
        elif route.access in ("infer", "feedback") and not key.allows(route.access):
            raise Forbidden(f"API key ss_{key.id}_… lacks the '{route.access}' scope")
        if key is not None and not req.child:  # the parent request paid for its children
            self.keys.rate(key, time.monotonic())
        if route.json_body and _has_body(req):
            ctype = (req.header(b"content-type") or "").split(";", 1)[0].strip().lower()
            if ctype != "application/json":
                raise UnsupportedMediaType(
                    f"send the body as JSON with 'Content-Type: application/json' (got "
                    f"{ctype[:60] or 'none'!r})", param="content-type")

    def _credential(self, req: Request, *, lenient: bool) -> ApiKey | None:
        """The key the request carries. `lenient` (inference and read routes while they are
        open): a bearer token that is not a steadyserve key at all — the OpenAI client insists
        on sending one, e.g. `api_key="unused"` — is ignored; one that looks like ours but is
        wrong, revoked or expired is always refused, so a bad key never passes silently."""
        raw = req.header(b"authorization")
        if raw is None:
            return None
        scheme, _, token = raw.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("send the API key as 'Authorization: Bearer <key>'")
        if token.startswith(CHILD_TOKEN_PREFIX):
            req.child = True
            raw_grant = req.header(b"x-steadyserve-on-behalf-of")
            now = self.wall()
            req.caller, key, grant = self.keys.authenticate_child(token, raw_grant, now)
            req.hops = 1 if grant is None else grant.hops + 1
            if grant is not None and not self.grant_uses.take(str(raw_grant), grant.expires_at,
                                                              now):
                limit = self.gateway.max_child_calls_per_request
                raise TooManyChildCalls(
                    f"this request's handler already made {limit} child calls: over [gateway] "
                    "max_child_calls_per_request")
            return key
        if lenient and key_id_of(token) is None and self.inference_open:
            return None
        return self.keys.authenticate(token, self.wall())

    def _check_child(self, req: Request, route: Route) -> None:
        """A child call (gateway.compose): inference only, from a deployment that declares
        calls, and at most max_call_depth deep (the depth is its grant's, never a header's)."""
        if route.access != "infer":
            raise Forbidden("a child-call credential may call inference routes only")
        caller = req.caller or ""
        req.callees = self._callees.get(caller, frozenset())
        if not req.callees:
            raise Forbidden(f"deployment {caller!r} declares no calls: list the deployments "
                            f"its handlers call in [deployments.{caller}] calls")
        limit = self.gateway.max_call_depth
        if req.hops > limit:
            raise CallDepthExceeded(
                f"this call is {req.hops} calls deep: over [gateway] max_call_depth ({limit}); "
                "a deployment that calls itself, or a chain A → B → A, loops", param="hops")

    def _check_origin(self, req: Request) -> None:
        """A browser page from another site may not change state here (CSRF, DNS rebinding);
        non-browser clients send no Origin and are unaffected."""
        origin = req.header(b"origin")
        if origin is None or self.cors_allows(origin):
            return
        _scheme, sep, rest = origin.partition("://")
        if sep and host_of(rest) == host_of(req.header(b"host")):
            return  # same origin: a page served by this gateway
        raise Forbidden(f"cross-site request from Origin {origin[:100]!r} refused; add it to "
                        "[gateway] cors_origins if it should be allowed")

    # CORS ----------------------------------------------------------------------------------
    def cors_allows(self, origin: str) -> bool:
        return bool(self.cors) and ("*" in self.cors or origin in self.cors)

    def preflight(self, req: Request) -> Response | None:
        """Answer a CORS preflight for an allowed origin; None when this is not one."""
        if not self.cors or req.method != "OPTIONS":
            return None
        origin = req.header(b"origin")
        if req.method != "OPTIONS" or origin is None or req.header(b"access-control-request-method") \
                is None or not self.cors_allows(origin):
            return None
        resp = Response(204, b"")
        resp.headers.extend([
            (b"access-control-allow-methods", b"GET, POST, DELETE"),
            (b"access-control-allow-headers", CORS_HEADERS),
            (b"access-control-max-age", b"600"),
        ])
        return resp  # the allow-origin header is added with every response's (add_cors)

    def add_cors(self, req: Request, resp: Response) -> None:
        if not self.cors:
            return
        origin = req.header(b"origin")
        if origin is not None and self.cors_allows(origin):
            resp.headers.append((b"access-control-allow-origin", origin.encode("latin-1")))
            resp.headers.append((b"vary", b"origin"))

    # used by routes --------------------------------------------------------------------------
    @staticmethod
    def allow_deployment(req: Request, deployment: str) -> None:
        """The route's deployment: one the key may call, and for a child call one its
        calling deployment declares."""
        if req.child and deployment not in req.callees:
            raise Forbidden(f"deployment {req.caller!r} may not call deployment "
                            f"{deployment!r}: add it to [deployments.{req.caller}] calls",
                            param="model" if req.openai else None)
        key = req.principal
        if key is not None and not key.allows("admin") and not key.may_call(deployment):
            raise Forbidden(f"API key ss_{key.id}_… may not call deployment {deployment!r}",
                            param="model" if req.openai else None)

    @staticmethod
    def priority_for(req: Request, asked: str) -> str:
        """A batch key's requests are batch, whatever X-Priority says."""
        key = req.principal
        return "batch" if key is not None and key.priority == "batch" else asked
