"""The native JSON route against in-process replicas: results, validation, limits, errors."""

from __future__ import annotations

import asyncio

import pytest

from .services import Echo

pytestmark = pytest.mark.asyncio


async def test_native_call_returns_the_handlers_result(make_gateway):
    _, client, _ = await make_gateway({"echo": (Echo, 2)})
    r = await client.post("/v1/deployments/echo/echo", json={"text": "ab", "n": 3})
    assert r.status_code == 200
    assert r.json() == {"text": "ababab"}
    assert r.headers["x-steadyserve-version"] == "1"


async def test_request_id_is_kept_when_sane_and_generated_otherwise(make_gateway):
    _, client, _ = await make_gateway({"echo": (Echo, 1)})
    r = await client.post("/v1/deployments/echo/echo", json={"text": "a"},
                          headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = await client.post("/v1/deployments/echo/echo", json={"text": "a"},
                          headers={"x-request-id": "bad id with spaces"})
    assert r.headers["x-request-id"] != "bad id with spaces"
    assert len(r.headers["x-request-id"]) == 24
    r = await client.get("/nope")
    assert r.status_code == 404 and len(r.headers["x-request-id"]) == 24


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "fragment"),
    [
        ("/v1/deployments/echo/echo", b"{not json", 400, None, "invalid JSON"),
        ("/v1/deployments/echo/echo", b"", 400, None, "empty"),
        ("/v1/deployments/echo/echo", b"[1, 2]", 400, None, "JSON object"),
        ("/v1/deployments/echo/echo", b'{"text": 5}', 400, "text", "'text' must be str, got int"),
        ("/v1/deployments/echo/echo", b'{"n": 2}', 400, "text", "missing required field 'text'"),
        ("/v1/deployments/echo/echo", b'{"text": "a", "x": 1}', 400, "x", "unknown field 'x'"),
        ("/v1/deployments/echo/echo", b'{"text": "a", "n": true}', 400, "n", "must be int"),
        ("/v1/deployments/echo/upper", b'{"texts": []}', 400, "texts", "must not be empty"),
        ("/v1/deployments/echo/upper", b'{"texts": ["a", 1]}', 400, "texts[1]", "must be str"),
        ("/v1/deployments/echo/upper", b'{"texts": "abc"}', 400, "texts", "must be list[str]"),
        ("/v1/deployments/echo/upper", b'{"texts": ["a"' + b', "a"' * 16 + b"]}", 413, "texts",
         "at most 16"),
        ("/v1/deployments/nope/echo", b'{"text": "a"}', 404, "model", "no deployment named 'nope'"),
        ("/v1/deployments/echo/nope", b'{"text": "a"}', 404, None, "no handler 'nope'"),
    ],
    ids=["bad-json", "empty-body", "not-object", "wrong-type", "missing", "unknown-field",
         "bool-for-int", "empty-list", "bad-item", "str-for-list", "too-many-inputs",
         "unknown-deployment", "unknown-handler"],
)
async def test_bad_input_gets_a_4xx_naming_the_problem(make_gateway, path, body, status, param, fragment):
    _, client, _ = await make_gateway({"echo": (Echo, 1)})
    r = await client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert fragment in error["message"]
    assert error["param"] == param
    assert error["request_id"] == r.headers["x-request-id"]
    # and the replica is still fine afterwards
    ok = await client.post("/v1/deployments/echo/echo", json={"text": "still"})
    assert ok.status_code == 200


JSON = {"content-type": "application/json"}


async def test_body_over_the_limit_is_413_whether_declared_or_streamed(make_gateway):
    _, client, _ = await make_gateway({"echo": (Echo, 1)}, max_body_bytes=2048)
    big = b'{"text": "' + b"a" * 4096 + b'"}'
    r = await client.post("/v1/deployments/echo/echo", content=big, headers=JSON)
    assert r.status_code == 413
    assert "over the limit of 2048 bytes" in r.json()["error"]["message"]

    async def chunks():
        for _ in range(8):
            yield b"a" * 512

    r = await client.post("/v1/deployments/echo/echo", content=chunks(), headers=JSON)
    assert r.status_code == 413


async def test_wrong_method_is_405_and_unknown_route_404(make_gateway):
    _, client, _ = await make_gateway({"echo": (Echo, 1)})
    assert (await client.get("/v1/deployments/echo/echo")).status_code == 405
    assert (await client.post("/v1/models")).status_code == 405
    assert (await client.post("/healthz")).status_code == 405
    r = await client.get("/v2/whatever")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


async def test_service_errors_map_to_4xx_or_500_and_never_break_the_replica(make_gateway):
    _, client, _ = await make_gateway({"echo": (Echo, 1)})
    r = await client.post("/v1/deployments/echo/fail", json={"kind": "client"})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "the kind you sent is not allowed"
    r = await client.post("/v1/deployments/echo/fail", json={"kind": "server"})
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "handler_failed"
    assert "ValueError: boom" in r.json()["error"]["message"]
    assert (await client.post("/v1/deployments/echo/echo", json={"text": "x"})).status_code == 200


async def test_a_batch_that_breaks_the_contract_fails_every_caller(make_gateway):
    _, client, _ = await make_gateway({"echo": (Echo, 1)})
    rs = await asyncio.gather(*(
        client.post("/v1/deployments/echo/short", json={"texts": [f"t{i}"]}) for i in range(5)
    ))
    for r in rs:
        assert r.status_code == 500
        assert "results for" in r.json()["error"]["message"]


async def test_concurrent_requests_are_batched_and_each_gets_its_own_results(make_gateway):
    _, client, deployments = await make_gateway({"echo": (Echo, 1)})
    rs = await asyncio.gather(*(
        client.post("/v1/deployments/echo/upper", json={"texts": [f"a{i}", f"b{i}"]})
        for i in range(20)
    ))
    for i, r in enumerate(rs):
        assert r.json() == [f"A{i}", f"B{i}"]
    service = deployments["echo"].apps["echo-0"].service
    assert sum(service.batches) == 40
    assert max(service.batches) <= 8  # capped by max_batch_size
    assert max(service.batches) > 2  # items of different requests shared a batch


async def test_deployment_status_lists_replicas_and_handler_schemas(make_gateway):
    _, client, _ = await make_gateway({"echo": (Echo, 2)})
    r = await client.get("/v1/deployments/echo")
    body = r.json()
    assert body["ready_replicas"] == 2
    assert body["handlers"]["upper"]["batch"] is True
    assert body["handlers"]["echo"]["params"][0] == {
        "name": "text", "type": {"kind": "str"}, "required": True}
    assert (await client.get("/v1/deployments/zzz")).status_code == 404
    listing = (await client.get("/v1/deployments")).json()
    assert [d["name"] for d in listing["deployments"]] == ["echo"]
