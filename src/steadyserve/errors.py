"""The one exception tree of steadyserve, and its mapping to HTTP.

    SteadyError                       root: everything we raise on purpose
    ├── ClientError (4xx)             the caller sent something wrong
    │   ├── Unauthorized (401)        no credential, or one that is unknown, revoked, expired
    │   ├── Forbidden (403)           a valid credential without the scope or deployment;
    │   │                             a cross-site Origin on a state-changing request
    │   ├── NotFound (404)            unknown deployment / handler / route
    │   ├── MethodNotAllowed (405)
    │   ├── RequestTimeout (408)      headers or body not received in time
    │   ├── Conflict (409)            the state does not allow it now (a rollout already runs)
    │   │   └── NotLeader (409)       a singleton duty (rollouts) asked of a gateway that does
    │   │                             not lead the cluster; the message names the leader
    │   ├── PayloadTooLarge (413)     body or input count over a limit
    │   ├── UriTooLong (414)          request line over its limit
    │   ├── UnsupportedMediaType (415)  not JSON, or a Content-Encoding we do not decode
    │   ├── Quarantined (422)         this input crashed replicas; refused for a while
    │   ├── HostNotAllowed (421)      Host is not on the allow-list (DNS rebinding)
    │   └── HeadersTooLarge (431)     header section or header count over its limit
    ├── Overloaded (503/429)          no capacity now; carries retry_after_s
    │   ├── RateLimited (429)         this API key is over its request rate
    │   ├── NoReadyReplica (503)      the deployment has no replica in rotation
    │   └── DependencyUnavailable (503)  a database or cache a service needs is down
    ├── ReplicaError (5xx)            a replica failed the request
    │   ├── ReplicaUnavailable (502)  could not connect / connection died mid-request
    │   ├── ReplicaTimeout (504)      the per-handler timeout passed
    │   │   └── DeadlineExceeded (504)  the request's own deadline (X-Request-Timeout-Ms)
    │   │                             ran out sooner than the handler normally answers:
    │   │                             the request's, never held against the replica nor
    │   │                             counted as a 5xx in the error budget
    │   ├── HandlerFailed (500)       service code raised, or a batch broke its contract:
    │   │                             the request's fault, never retried nor held against
    │   │                             the replica
    │   ├── RetryableError (503)      service code says "not here, not now": retried on
    │   │                             another replica (idempotent handlers)
    │   └── ResponseTooLarge (502)    the replica's answer is over max_upstream_response_bytes:
    │                                 the handler's output, any replica would send the same;
    │                                 never retried nor held against the replica
    ├── ClientGone (499)              the caller hung up; its queued work is dropped
    └── ConfigError                   bad configuration; raised at start, never per request

Outside systems map their failures at their one wrapper, under this root:
store.DatabaseUnavailable (503, a DependencyUnavailable with Retry-After),
observe.notifiers.NotifierError (502).

`to_http` is the only place that turns an exception into a status code and a JSON body;
routes pick the body shape (native or OpenAI) and nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


class SteadyError(Exception):
    """Root of every error steadyserve raises on purpose."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ClientError(SteadyError):
    """The request was wrong; the message says what to fix. Service code may raise it."""

    status = 400
    code = "invalid_request"


class Unauthorized(ClientError):
    """No API key, or one that is unknown, revoked or expired (401 + WWW-Authenticate)."""

    status = 401
    code = "unauthorized"


class CallDepthExceeded(ClientError):
    """A chain of child calls deeper than [gateway] max_call_depth: a loop, most likely."""

    status = 508
    code = "loop_detected"


class TooManyChildCalls(ClientError):
    """A request's handler made more child calls than [gateway] max_child_calls_per_request."""

    status = 429
    code = "too_many_child_calls"


class Forbidden(ClientError):
    """A valid key without the scope or the deployment this route needs."""

    status = 403
    code = "forbidden"


class NotFound(ClientError):
    status = 404
    code = "not_found"


class MethodNotAllowed(ClientError):
    status = 405
    code = "method_not_allowed"


class RequestTimeout(ClientError):
    status = 408
    code = "request_timeout"


class Conflict(ClientError):
    status = 409
    code = "conflict"


class NotLeader(Conflict):
    code = "not_leader"


class PayloadTooLarge(ClientError):
    status = 413
    code = "payload_too_large"


class UriTooLong(ClientError):
    status = 414
    code = "uri_too_long"


class UnsupportedMediaType(ClientError):
    status = 415
    code = "unsupported_media_type"


class HostNotAllowed(ClientError):
    """The Host header names a host this gateway does not serve: a DNS-rebinding page, or a
    missing `[gateway] allowed_hosts` entry."""

    status = 421
    code = "host_not_allowed"


class HeadersTooLarge(ClientError):
    status = 431
    code = "headers_too_large"


class Overloaded(SteadyError):
    status = 503
    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: float = 1.0, status: int = 503) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.status = status


class RateLimited(Overloaded):
    """This API key sent more than its rate; 429 with Retry-After."""

    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message, retry_after_s=retry_after_s, status=429)


class NoReadyReplica(Overloaded):
    code = "no_ready_replica"


class DependencyUnavailable(Overloaded):
    """Something the service depends on (database, feature store) is down; retry later."""

    code = "dependency_unavailable"


class ReplicaError(SteadyError):
    status = 502
    code = "replica_error"


class ReplicaUnavailable(ReplicaError):
    """Connect failed or the connection died mid-request: safe to retry if idempotent."""

    status = 502
    code = "replica_unavailable"
    refused = False  # True only when nothing listens (connect refused): the process is gone


class ConnectionRefused(ReplicaUnavailable):
    refused = True


class ConnectionLost(ReplicaUnavailable):
    """The connection died while the replica had the request: it may have crashed on it."""


class ReplicaTimeout(ReplicaError):
    status = 504
    code = "timeout"


class DeadlineExceeded(ReplicaTimeout):
    code = "deadline_exceeded"


class HandlerFailed(ReplicaError):
    status = 500
    code = "handler_failed"


class RetryableError(ReplicaError):
    """Raise from service code when another replica may well succeed (a device out of memory,
    a local resource busy): the gateway retries idempotent handlers elsewhere and counts it
    against this replica. Any other exception is the request's: a 500, not retried."""

    status = 503
    code = "retryable"


class ResponseTooLarge(ReplicaError):
    """The replica's answer is larger than the gateway accepts (`max_upstream_response_bytes`).
    It is the handler's output that is too big, so another replica would send the same: the
    gateway closes that connection and answers 502 without retrying or blaming the replica."""

    status = 502
    code = "response_too_large"


class Quarantined(ClientError):
    """This exact input crashed replicas; it is refused for a while instead of crashing more."""

    status = 422
    code = "input_quarantined"


class ClientGone(SteadyError):
    """The peer disconnected before the answer; nginx's 499, never sent to anyone."""

    status = 499
    code = "client_closed_request"


class ConfigError(SteadyError):
    code = "config_error"


@dataclass(frozen=True, slots=True)
class HttpError:
    status: int
    code: str
    message: str
    param: str | None
    headers: tuple[tuple[bytes, bytes], ...]


_BY_CODE: dict[str, type[SteadyError]] = {
    cls.code: cls
    for cls in (
        SteadyError, ClientError, Unauthorized, Forbidden, NotFound, MethodNotAllowed, RequestTimeout,
        Conflict, PayloadTooLarge, UriTooLong, UnsupportedMediaType, HostNotAllowed, HeadersTooLarge,
        Overloaded, NoReadyReplica, DependencyUnavailable, ReplicaError, ReplicaUnavailable,
        ReplicaTimeout, DeadlineExceeded, HandlerFailed, RetryableError, ResponseTooLarge,
        ConfigError, Quarantined,
    )
}


def to_http(exc: BaseException) -> HttpError:
    """Map any exception to status, code, message and headers. Unknown ones become 500."""
    if isinstance(exc, SteadyError):
        headers: tuple[tuple[bytes, bytes], ...] = ()
        if isinstance(exc, Overloaded):
            retry = max(1, math.ceil(exc.retry_after_s))
            headers = ((b"retry-after", str(retry).encode()),)
        elif isinstance(exc, Unauthorized):
            headers = ((b"www-authenticate", b'Bearer realm="steadyserve"'),)
        return HttpError(exc.status, exc.code, exc.message, exc.param, headers)
    return HttpError(500, "internal_error", f"internal error: {type(exc).__name__}", None, ())


def to_wire(exc: SteadyError) -> dict[str, Any]:
    """Serialise an error for the replica → gateway hop."""
    wire: dict[str, Any] = {"code": exc.code, "message": exc.message, "param": exc.param,
                            "status": exc.status}
    if isinstance(exc, Overloaded):
        wire["retry_after_s"] = exc.retry_after_s
    return wire


def from_wire(body: dict[str, Any]) -> SteadyError:
    """Rebuild an error sent by a replica; unknown codes stay generic but keep the status."""
    code = str(body.get("code"))
    cls = _BY_CODE.get(code)
    if cls is None:  # a code of the service's own (e.g. database_unavailable): keep it
        cls = Overloaded if "retry_after_s" in body else SteadyError
    message = str(body.get("message", "replica error"))
    exc: SteadyError
    if issubclass(cls, Overloaded):
        try:
            retry_after_s = float(body.get("retry_after_s", 1.0))
        except (TypeError, ValueError):
            retry_after_s = 1.0
        exc = cls(message, retry_after_s=retry_after_s)
    else:
        exc = cls(message, param=body.get("param"))
    status = body.get("status")
    if isinstance(status, int) and 400 <= status <= 599:
        exc.status = status
    if code != cls.code and code != "None":
        exc.code = code
    return exc
