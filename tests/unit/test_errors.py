"""errors.py: the exception tree, to_http, and the replica → gateway wire form."""

from __future__ import annotations

import pytest

from steadyserve.errors import (
    ClientError,
    ConfigError,
    HandlerFailed,
    MethodNotAllowed,
    NoReadyReplica,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    ReplicaError,
    ReplicaTimeout,
    ReplicaUnavailable,
    SteadyError,
    UnsupportedMediaType,
    from_wire,
    to_http,
    to_wire,
)

# (class, status, code): the documented mapping
TABLE = [
    (SteadyError, 500, "internal_error"),
    (ClientError, 400, "invalid_request"),
    (NotFound, 404, "not_found"),
    (MethodNotAllowed, 405, "method_not_allowed"),
    (PayloadTooLarge, 413, "payload_too_large"),
    (UnsupportedMediaType, 415, "unsupported_media_type"),
    (Overloaded, 503, "overloaded"),
    (NoReadyReplica, 503, "no_ready_replica"),
    (ReplicaError, 502, "replica_error"),
    (ReplicaUnavailable, 502, "replica_unavailable"),
    (ReplicaTimeout, 504, "timeout"),
    (HandlerFailed, 500, "handler_failed"),
    (ConfigError, 500, "config_error"),
]
IDS = [cls.__name__ for cls, _, _ in TABLE]
OVERLOADED = (Overloaded, NoReadyReplica)


def make(cls: type[SteadyError], message: str = "boom", param: str | None = "field") -> SteadyError:
    if issubclass(cls, Overloaded):
        return cls(message)
    return cls(message, param=param)


@pytest.mark.parametrize(("cls", "status", "code"), TABLE, ids=IDS)
def test_to_http_status_code_message(cls, status, code):
    err = to_http(make(cls))
    assert err.status == status
    assert err.code == code
    assert err.message == "boom"
    assert err.param == (None if cls in OVERLOADED else "field")


@pytest.mark.parametrize(("cls", "status", "code"), TABLE, ids=IDS)
def test_retry_after_header_only_for_overloaded(cls, status, code):
    headers = dict(to_http(make(cls)).headers)
    if cls in OVERLOADED:
        assert headers == {b"retry-after": b"1"}
    else:
        assert headers == {}


@pytest.mark.parametrize(
    ("cls", "base"),
    [
        (ClientError, SteadyError), (NotFound, ClientError), (MethodNotAllowed, ClientError),
        (PayloadTooLarge, ClientError), (UnsupportedMediaType, ClientError), (Overloaded, SteadyError),
        (NoReadyReplica, Overloaded), (ReplicaError, SteadyError), (ReplicaUnavailable, ReplicaError),
        (ReplicaTimeout, ReplicaError), (HandlerFailed, ReplicaError), (ConfigError, SteadyError),
    ],
    ids=lambda c: c.__name__,
)
def test_exception_tree(cls, base):
    assert issubclass(cls, base)


@pytest.mark.parametrize(
    ("retry_after_s", "header"),
    [
        pytest.param(0.0, b"1", id="zero-becomes-1"),
        pytest.param(0.2, b"1", id="fraction-becomes-1"),
        pytest.param(-5.0, b"1", id="negative-becomes-1"),
        pytest.param(1.0, b"1", id="one"),
        pytest.param(3.0, b"3", id="whole-seconds-kept"),
        pytest.param(30, b"30", id="int"),
    ],
)
def test_retry_after_at_least_one(retry_after_s, header):
    err = to_http(Overloaded("busy", retry_after_s=retry_after_s))
    assert err.headers == ((b"retry-after", header),)


@pytest.mark.parametrize(
    ("retry_after_s", "header"),
    [
        pytest.param(1.4, b"2", id="1.4-up-to-2"),
        pytest.param(2.2, b"3", id="2.2-up-to-3"),
        pytest.param(2.5, b"3", id="2.5-up-to-3"),
    ],
)
def test_retry_after_is_rounded_up(retry_after_s, header):
    err = to_http(Overloaded("busy", retry_after_s=retry_after_s))
    assert err.headers == ((b"retry-after", header),)


def test_overloaded_may_be_429():
    err = to_http(Overloaded("slow down", status=429, retry_after_s=2))
    assert (err.status, err.code) == (429, "overloaded")
    assert err.headers == ((b"retry-after", b"2"),)


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(ValueError("secret db password=hunter2"), id="ValueError"),
        pytest.param(KeyError("secret-key"), id="KeyError"),
        pytest.param(RuntimeError("/home/user/secret/path"), id="RuntimeError"),
    ],
)
def test_non_steady_error_is_500_without_leaking_message(exc):
    err = to_http(exc)
    assert (err.status, err.code, err.param, err.headers) == (500, "internal_error", None, ())
    assert err.message == f"internal error: {type(exc).__name__}"
    assert "secret" not in err.message


# --- wire form --------------------------------------------------------------------------------

WIRE = [row for row in TABLE if row[0] is not ConfigError]


@pytest.mark.parametrize(("cls", "status", "code"), WIRE, ids=[c.__name__ for c, _, _ in WIRE])
def test_wire_round_trip_keeps_class_status_message(cls, status, code):
    original = make(cls, "went wrong")
    wire = to_wire(original)
    assert wire["code"] == code
    assert wire["status"] == status
    back = from_wire(wire)
    assert type(back) is cls
    assert back.status == status
    assert back.code == code
    assert back.message == "went wrong"


@pytest.mark.parametrize(
    "cls",
    [ClientError, NotFound, PayloadTooLarge, HandlerFailed, ReplicaTimeout],
    ids=lambda c: c.__name__,
)
def test_wire_round_trip_keeps_param(cls):
    assert from_wire(to_wire(cls("bad", param="texts[3]"))).param == "texts[3]"


def test_wire_round_trip_keeps_overloaded_429():
    back = from_wire(to_wire(Overloaded("slow down", status=429)))
    assert type(back) is Overloaded
    assert back.status == 429


@pytest.mark.parametrize(
    ("body", "cls", "status", "message"),
    [
        pytest.param({"code": "teapot", "message": "short and stout", "status": 418}, SteadyError, 418,
                     "short and stout", id="unknown-code-keeps-status"),
        pytest.param({"code": "teapot", "message": "m"}, SteadyError, 500, "m",
                     id="unknown-code-no-status"),
        pytest.param({}, SteadyError, 500, "replica error", id="empty-body"),
        pytest.param({"code": "not_found", "message": "x", "status": 200}, NotFound, 404, "x",
                     id="status-below-400-ignored"),
        pytest.param({"code": "not_found", "message": "x", "status": 600}, NotFound, 404, "x",
                     id="status-above-599-ignored"),
        pytest.param({"code": "not_found", "message": "x", "status": "410"}, NotFound, 404, "x",
                     id="string-status-ignored"),
        pytest.param({"code": "invalid_request", "message": "x", "status": 422}, ClientError, 422, "x",
                     id="known-code-status-overridden"),
        pytest.param({"code": None, "message": 42, "status": 503}, SteadyError, 503, "42",
                     id="junk-values-stringified"),
    ],
)
def test_from_wire_tolerates_odd_bodies(body, cls, status, message):
    exc = from_wire(body)
    assert type(exc) is cls
    assert exc.status == status
    assert exc.message == message


def test_from_wire_does_not_change_class_attribute_status():
    from_wire({"code": "not_found", "message": "x", "status": 410})
    assert NotFound.status == 404
    assert NotFound("y").status == 404


def test_a_service_own_code_travels_to_the_edge_with_its_status():
    err = to_http(from_wire({"code": "mystery", "message": "m", "status": 503}))
    assert (err.status, err.code, err.message, err.headers) == (503, "mystery", "m", ())


def test_a_service_error_with_retry_after_keeps_it():
    err = to_http(from_wire({"code": "database_unavailable", "message": "db down", "status": 503,
                             "retry_after_s": 2.0}))
    assert (err.status, err.code, err.headers) == (503, "database_unavailable",
                                                   ((b"retry-after", b"2"),))


def test_wire_round_trip_keeps_retry_after():
    back = from_wire(to_wire(Overloaded("gpu busy", retry_after_s=30)))
    assert back.retry_after_s == 30  # type: ignore[attr-defined]
    assert to_http(back).headers == ((b"retry-after", b"30"),)
