"""Access control through the gateway (in process): every state-changing route without,
with a wrong, a revoked and an under-scoped key; inference open on loopback until keys
exist; per-key deployments, priority and rate; Host allow-list, cross-site requests, CORS;
the key API with a real SQLite database."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from pathlib import Path

import httpx
import pytest

from steadyserve.auth.keyring import KeyRing
from steadyserve.auth.keys import ApiKey
from steadyserve.auth.tokens import digest, key_id_of, new_token
from steadyserve.gateway.app import ROUTES
from steadyserve.store import Database
from steadyserve.store.keys import KeyStore

from .conftest import admin_headers
from .services import Echo

pytestmark = pytest.mark.asyncio

ADMIN_ROUTES = [r for r in ROUTES if r.access == "admin"]
JSON = {"content-type": "application/json"}


def concrete(pattern: str) -> str:
    return re.sub(r"\{[^}]+\}", lambda m: "echo" if m.group(0) == "{deployment}" else "x1",
                  pattern)


def make_key(ring: KeyRing, *scopes: str, **kw) -> tuple[ApiKey, str]:
    _, token = new_token()
    key_id = key_id_of(token)
    assert key_id is not None
    key = ApiKey(id=key_id, name=f"k-{key_id[:4]}", digest=digest(token),
                 scopes=frozenset(scopes), **kw)
    ring.put(key)
    return key, token


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.mark.parametrize("route", ADMIN_ROUTES, ids=lambda r: f"{r.method} {r.pattern}")
async def test_every_admin_route_refuses_missing_wrong_revoked_and_underscoped_keys(
        make_gateway, route):
    gw, client, _ = await make_gateway({"echo": (Echo, 1)})
    path = concrete(route.pattern)

    async def send(headers: dict[str, str]) -> httpx.Response:
        return await client.request(route.method, path, json={} if route.json_body else None,
                                    headers=headers)

    missing = await send({})
    assert missing.status_code == 401, missing.text
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert "admin key" in missing.json()["error"]["message"]
    _, unknown = new_token()
    assert (await send(bearer(unknown))).status_code == 401
    assert (await send({"authorization": "Basic YWRtaW46YWRtaW4="})).status_code == 401
    _key, token = make_key(gw.keys, "infer")
    under = await send(bearer(token))
    assert under.status_code == 403 and "'admin' scope" in under.json()["error"]["message"]
    admin, admin_token = make_key(gw.keys, "admin")
    gw.keys.put(dataclasses.replace(admin, revoked_at=1.0))
    revoked = await send(bearer(admin_token))
    assert revoked.status_code == 401 and "revoked" in revoked.json()["error"]["message"]
    allowed = await send(admin_headers(gw))
    assert allowed.status_code not in (401, 403, 415, 421), allowed.text


async def test_admin_routes_need_a_key_even_on_loopback_with_no_keys(make_gateway):
    gw, client, _ = await make_gateway({"echo": (Echo, 1)})
    assert not gw.keys.user_keys_exist()
    r = await client.post("/v1/cache/invalidate", json={"tags": ["a"]})
    assert r.status_code == 401
    r = await client.post("/v1/cache/invalidate", json={"tags": ["a"]}, headers=admin_headers(gw))
    assert r.status_code == 200, r.text


async def test_inference_is_open_on_loopback_until_a_user_key_exists(make_gateway):
    gw, client, _ = await make_gateway({"echo": (Echo, 1)})
    url = "/v1/deployments/echo/echo"
    assert (await client.post(url, json={"text": "a"})).status_code == 200
    # the OpenAI client insists on some api_key: a token that is not ours is ignored while open
    r = await client.post(url, json={"text": "a"}, headers=bearer("unused"))
    assert r.status_code == 200
    _, wrong = new_token()  # but one that looks like ours must be right
    assert (await client.post(url, json={"text": "a"}, headers=bearer(wrong))).status_code == 401
    _, token = make_key(gw.keys, "infer")
    closed = await client.post(url, json={"text": "a"})
    assert closed.status_code == 401 and "API key" in closed.json()["error"]["message"]
    assert (await client.post(url, json={"text": "a"}, headers=bearer("unused"))).status_code == 401
    assert (await client.post(url, json={"text": "a"}, headers=bearer(token))).status_code == 200
    assert (await client.get("/v1/deployments")).status_code == 401  # read routes close too
    assert (await client.get("/v1/deployments", headers=bearer(token))).status_code == 200
    assert (await client.get("/metrics")).status_code == 401
    assert (await client.get("/healthz")).status_code == 200  # probes never
    assert (await client.get("/readyz")).status_code == 200


async def test_required_mode_needs_a_key_on_loopback_too(make_gateway):
    from steadyserve.config import AuthConfig

    gw, client, _ = await make_gateway({"echo": (Echo, 1)}, auth=AuthConfig(inference="required"))
    assert (await client.post("/v1/deployments/echo/echo", json={"text": "a"})).status_code == 401
    r = await client.post("/v1/deployments/echo/echo", json={"text": "a"},
                          headers=admin_headers(gw))
    assert r.status_code == 200


async def test_feedback_and_admin_scopes_and_deployment_lists(make_gateway):
    gw, client, _ = await make_gateway({"echo": (Echo, 1), "other": (Echo, 1)})
    _, feedback = make_key(gw.keys, "feedback")
    _, only_echo = make_key(gw.keys, "infer", deployments=("echo",))
    body = {"text": "a"}
    r = await client.post("/v1/deployments/echo/echo", json=body, headers=bearer(feedback))
    assert r.status_code == 403 and "'infer' scope" in r.json()["error"]["message"]
    assert (await client.get("/v1/deployments", headers=bearer(feedback))).status_code == 200
    ok = await client.post("/v1/deployments/echo/echo", json=body, headers=bearer(only_echo))
    assert ok.status_code == 200
    no = await client.post("/v1/deployments/other/echo", json=body, headers=bearer(only_echo))
    assert no.status_code == 403 and "'other'" in no.json()["error"]["message"]
    admin = await client.post("/v1/deployments/other/echo", json=body, headers=admin_headers(gw))
    assert admin.status_code == 200


async def test_a_batch_key_is_admitted_as_batch_whatever_it_asks(make_gateway):
    gw, client, _ = await make_gateway({"echo": (Echo, 1)})
    _, batch = make_key(gw.keys, "infer", priority="batch")
    _, interactive = make_key(gw.keys, "infer")
    d = gw.membership.get("echo")
    assert d is not None
    gw.dispatcher.state(d).admission.shed_batch_until = float("inf")  # batch traffic is shed
    url, body = "/v1/deployments/echo/echo", {"text": "a"}
    shed = await client.post(url, json=body, headers={**bearer(batch), "x-priority": "interactive"})
    assert shed.status_code == 503 and "batch" in shed.json()["error"]["message"]
    assert (await client.post(url, json=body, headers=bearer(interactive))).status_code == 200
    r = await client.post(url, json=body, headers={**bearer(interactive), "x-priority": "batch"})
    assert r.status_code == 503


async def test_rate_limited_key_gets_429_with_retry_after(make_gateway):
    gw, client, _ = await make_gateway({"echo": (Echo, 1)})
    _, token = make_key(gw.keys, "infer", rate_limit_per_s=1.0, burst=3)
    codes = [(await client.post("/v1/deployments/echo/echo", json={"text": "a"},
                                headers=bearer(token))).status_code for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]
    r = await client.post("/v1/deployments/echo/echo", json={"text": "a"}, headers=bearer(token))
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "rate_limited"


async def test_cross_site_requests_are_refused(make_gateway):
    _, client, _ = await make_gateway({"echo": (Echo, 1)})
    url = "/v1/deployments/echo/echo"
    # a form or fetch with no preflight: text/plain carrying JSON
    r = await client.post(url, content=b'{"text": "a"}', headers={"content-type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["param"] == "content-type"
    r = await client.post(url, content=b'{"text": "a"}')
    assert r.status_code == 415
    evil = await client.post(url, json={"text": "a"}, headers={"origin": "https://evil.example"})
    assert evil.status_code == 403 and "cors_origins" in evil.json()["error"]["message"]
    null = await client.post(url, json={"text": "a"}, headers={"origin": "null"})
    assert null.status_code == 403
    same = await client.post(url, json={"text": "a"}, headers={"origin": "http://gw"})
    assert same.status_code == 200
    # reading is not a state change: no Origin check, and no CORS header either
    read = await client.get("/v1/deployments", headers={"origin": "https://evil.example"})
    assert read.status_code == 200 and "access-control-allow-origin" not in read.headers
    pre = await client.options(url, headers={"origin": "https://evil.example",
                                             "access-control-request-method": "POST"})
    assert pre.status_code == 405 and "access-control-allow-origin" not in pre.headers


async def test_foreign_host_is_refused_but_probes_answer(make_gateway):
    _, client, _ = await make_gateway({"echo": (Echo, 1)})
    for path, method in (("/v1/deployments/echo/echo", "POST"), ("/nope", "GET"),
                         ("/metrics", "GET")):
        r = await client.request(method, path, json={"text": "a"},
                                 headers={"host": "rebind.evil.example"})
        assert r.status_code == 421, path
        assert r.json()["error"]["code"] == "host_not_allowed"
    assert (await client.get("/healthz", headers={"host": "10.0.0.7:8000"})).status_code == 200
    assert (await client.get("/readyz", headers={"host": "10.0.0.7:8000"})).status_code == 200


async def test_cors_only_for_configured_origins(make_gateway):
    _, client, _ = await make_gateway({"echo": (Echo, 1)},
                                      cors_origins=("https://dash.example.com",))
    url = "/v1/deployments/echo/echo"
    pre = await client.options(url, headers={"origin": "https://dash.example.com",
                                             "access-control-request-method": "POST"})
    assert pre.status_code == 204
    assert pre.headers["access-control-allow-origin"] == "https://dash.example.com"
    assert "authorization" in pre.headers["access-control-allow-headers"]
    r = await client.post(url, json={"text": "a"}, headers={"origin": "https://dash.example.com"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://dash.example.com"
    other = await client.post(url, json={"text": "a"}, headers={"origin": "https://else.example"})
    assert other.status_code == 403 and "access-control-allow-origin" not in other.headers


async def test_openai_route_errors_keep_openai_shape_for_auth(make_gateway):
    from .services import FakeEmbedder

    gw, client, _ = await make_gateway({"emb": (FakeEmbedder, 1)})
    make_key(gw.keys, "infer")
    r = await client.post("/v1/embeddings", json={"model": "emb", "input": "hi"})
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "invalid_request_error"


# the key API with a real database ----------------------------------------------------------

@pytest.fixture
def db_ring(tmp_path: Path):
    db = Database(f"sqlite:///{tmp_path}/keys.db")
    ring = KeyRing(KeyStore(db), admin_key_path=tmp_path / "admin.key", refresh_s=0.1)
    ring.bootstrap()
    yield ring, db
    db.close()


async def test_key_api_create_list_rotate_revoke(make_gateway, db_ring):
    ring, _db = db_ring
    gw, client, _ = await make_gateway({"echo": (Echo, 1)}, keys=ring)
    admin = admin_headers(gw)
    url = "/v1/deployments/echo/echo"
    bad = await client.post("/v1/admin/keys", json={"name": "web", "scopes": ["root"]},
                            headers=admin)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "scopes"
    created = await client.post("/v1/admin/keys", headers=admin, json={
        "name": "web", "scopes": ["infer"], "rate_limit_per_s": 100})
    assert created.status_code == 201, created.text
    body = created.json()
    token = body["key"]
    assert key_id_of(token) == body["id"] and body["burst"] == 100
    assert (await client.post(url, json={"text": "a"}, headers=bearer(token))).status_code == 200
    assert (await client.post(url, json={"text": "a"})).status_code == 401  # closed now

    listing = await client.get("/v1/admin/keys", headers=admin)
    assert listing.status_code == 200
    assert token not in listing.text and "digest" not in listing.text
    names = {k["name"]: k for k in listing.json()["keys"]}
    assert names["web"]["prefix"] == f"ss_{body['id']}_" and "local-admin" in names

    rotated = await client.post(f"/v1/admin/keys/{body['id']}/rotate", headers=admin,
                                json={"grace_s": 60})
    assert rotated.status_code == 200
    new_token_ = rotated.json()["key"]
    assert new_token_ != token and key_id_of(new_token_) == body["id"]
    for t in (token, new_token_):  # the old one during its grace
        assert (await client.post(url, json={"text": "a"}, headers=bearer(t))).status_code == 200
    now_bad = await client.post(f"/v1/admin/keys/{body['id']}/rotate", headers=admin,
                                json={"grace_s": -1})
    assert now_bad.status_code == 400

    revoked = await client.delete("/v1/admin/keys/web", headers=admin)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    for t in (token, new_token_):
        r = await client.post(url, json={"text": "a"}, headers=bearer(t))
        assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
    again = await client.delete("/v1/admin/keys/web", headers=admin)
    assert again.status_code == 404  # a revoked name no longer names a key
    assert (await client.delete(f"/v1/admin/keys/{body['id']}", headers=admin)).status_code == 409


async def test_a_revocation_elsewhere_reaches_this_gateway_within_a_second(make_gateway, db_ring,
                                                                          tmp_path):
    ring, _db = db_ring
    _gw, client, _ = await make_gateway({"echo": (Echo, 1)}, keys=ring)
    await ring.start()
    try:
        other = KeyStore(Database(f"sqlite:///{tmp_path}/keys.db"))  # "another gateway"
        from steadyserve.auth import manage
        from steadyserve.auth.keys import parse_spec

        key, token = await asyncio.to_thread(manage.create, other, parse_spec({"name": "x"}),
                                             created_by="test")
        url = "/v1/deployments/echo/echo"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0
        while (await client.post(url, json={"text": "a"}, headers=bearer(token))).status_code != 200:
            assert loop.time() < deadline, "a new key did not arrive within 1 s"
            await asyncio.sleep(0.02)
        await asyncio.to_thread(manage.revoke, other, key.id)
        started = loop.time()
        while (await client.post(url, json={"text": "a"}, headers=bearer(token))).status_code != 401:
            assert loop.time() - started < 1.0, "revocation did not arrive within 1 s"
            await asyncio.sleep(0.02)
        other.db.close()
    finally:
        await ring.stop()
