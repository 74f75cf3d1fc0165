"""gateway/http.py: request_id_from (and the small pure response helper)."""

from __future__ import annotations

import re

import numpy as np
import orjson
import pytest

from steadyserve.gateway import http
from steadyserve.gateway.http import json_response, request_id_from

FIXED = bytes(range(12))
FIXED_HEX = FIXED.hex()  # 000102030405060708090a0b


@pytest.fixture
def fixed_urandom(monkeypatch):
    calls: list[int] = []

    def urandom(n: int) -> bytes:
        calls.append(n)
        return FIXED[:n]

    monkeypatch.setattr(http.os, "urandom", urandom)
    return calls


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(b"abc123", id="alnum"),
        pytest.param(b"req-1.2_3:4/5+6=7", id="all-safe-punctuation"),
        pytest.param(b"A" * 128, id="128-chars"),
        pytest.param(b"x", id="one-char"),
        pytest.param(b"3f2b0c1e-8d7a-4c55-9b1f-0e6a7c2d9e10", id="uuid"),
    ],
)
def test_valid_client_id_is_kept(value, fixed_urandom):
    assert request_id_from([(b"host", b"h"), (b"x-request-id", value)]) == value.decode()
    assert fixed_urandom == []


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([], id="no-headers"),
        pytest.param([(b"host", b"h")], id="missing"),
        pytest.param([(b"x-request-id", b"")], id="empty"),
        pytest.param([(b"x-request-id", b"A" * 129)], id="129-chars"),
        pytest.param([(b"x-request-id", b"has space")], id="space"),
        pytest.param([(b"x-request-id", b"semi;colon")], id="semicolon"),
        pytest.param([(b"x-request-id", b"<script>")], id="angle-brackets"),
        pytest.param([(b"x-request-id", "caf\u00e9".encode())], id="non-ascii"),
        pytest.param([(b"x-request-id", b"a\tb")], id="tab"),
        pytest.param([(b"x-request-id", b"bad id"), (b"x-request-id", b"good")], id="first-header-decides"),
        pytest.param([(b"X-Request-ID", b"upper")], id="header-names-are-lowercase-in-asgi"),
    ],
)
def test_bad_or_missing_id_gets_a_fresh_one(headers, fixed_urandom):
    assert request_id_from(headers) == FIXED_HEX
    assert fixed_urandom == [12]


def test_fresh_ids_are_24_hex_and_differ():
    ids = {request_id_from([]) for _ in range(20)}
    assert len(ids) == 20
    assert all(re.fullmatch(r"[0-9a-f]{24}", i) for i in ids)


def test_trailing_newline_is_not_a_valid_id(fixed_urandom):
    assert request_id_from([(b"x-request-id", b"abc\n")]) == FIXED_HEX


@pytest.mark.parametrize(
    ("obj", "status", "body"),
    [
        pytest.param({"ok": True}, 200, b'{"ok":true}', id="dict"),
        pytest.param([1, 2], 201, b"[1,2]", id="list-status"),
        pytest.param({"e": np.array([0.5, 1.0], dtype=np.float32)}, 200, b'{"e":[0.5,1.0]}', id="numpy"),
    ],
)
def test_json_response(obj, status, body):
    r = json_response(obj, status)
    assert (r.status, r.body, r.content_type, r.headers) == (status, body, b"application/json", [])
    assert orjson.loads(r.body) is not None
