"""The gateway's route table: method + path pattern → route function, with what each needs.

Every route declares its access class once, here, and everything that cares reads it from
the table: the access check (`gateway.access`), the OpenAPI document, the SLO (only `infer`
routes count), the docs.

    public   probes (/healthz, /readyz): always open, never Host-checked
    read     status, metrics, models: open while inference is open, else any valid key
    infer    model calls: open on loopback while no keys exist, else a key with `infer`
    admin    anything that changes the platform's state: an `admin` key, always, even on
             loopback (the local CLI reads one from the data directory)

Patterns are literal segments and `{name}` segments; a `{name}` matches one non-empty
segment. Matching is a dict lookup for literal paths and a scan of the few patterned ones.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import MethodNotAllowed, NotFound

if TYPE_CHECKING:
    from .app import Gateway
    from .http import Request, Response

RouteFn = Callable[["Gateway", "Request", dict[str, str]], Awaitable["Response"]]
ACCESS = ("public", "read", "infer", "feedback", "admin")


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    pattern: str
    fn: RouteFn
    access: str
    json_body: bool = False  # the body must be Content-Type: application/json
    body_optional: bool = False  # …when there is one: it may be left out
    summary: str = ""
    tag: str = ""  # OpenAPI grouping
    request_schema: dict[str, Any] | None = None  # OpenAPI schema of the JSON body
    responses: tuple[int, ...] = ()  # statuses it may answer besides the common ones

    def __post_init__(self) -> None:
        if self.access not in ACCESS:
            raise ValueError(f"route {self.pattern}: access must be one of {ACCESS}")

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.pattern.strip("/").split("/"))


class Router:
    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = tuple(routes)
        self._exact: dict[tuple[str, str], Route] = {}
        # by segment count, each with its segments split once: a path scans few
        self._patterned: dict[int, list[tuple[tuple[str, ...], Route]]] = {}
        self._exact_methods: dict[str, list[str]] = {}
        for r in self.routes:
            if "{" in r.pattern:
                segments = r.segments
                self._patterned.setdefault(len(segments), []).append((segments, r))
            else:
                self._exact[(r.method, r.pattern)] = r
                self._exact_methods.setdefault(r.pattern, []).append(r.method)

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        """The route and its path parameters; NotFound or MethodNotAllowed (naming the
        allowed methods) otherwise."""
        route = self._exact.get((method, path))
        if route is not None:
            return route, {}
        allowed: list[str] = list(self._exact_methods.get(path, ()))
        if not allowed:
            parts = path.strip("/").split("/") if path.startswith("/") else None
            if parts is not None:
                for segments, r in self._patterned.get(len(parts), ()):
                    params = _bind(segments, parts)
                    if params is None:
                        continue
                    if r.method == method:
                        return r, params
                    allowed.append(r.method)
        if allowed:
            methods = ", ".join(sorted(set(allowed)))
            raise MethodNotAllowed(f"method {method} not allowed on {path}; use {methods}")
        raise NotFound(f"no route {method} {path}")


def _bind(pattern: tuple[str, ...], parts: list[str]) -> dict[str, str] | None:
    if len(pattern) != len(parts):
        return None
    params: dict[str, str] = {}
    for want, got in zip(pattern, parts, strict=True):
        if want.startswith("{"):
            if not got:
                return None
            params[want[1:-1]] = got
        elif want != got:
            return None
    return params
