"""`GET /openapi.json`: generated from the route table and the handlers' type hints, and its
schemas agree with what the gateway accepts (the same bodies checked both ways)."""

from __future__ import annotations

import jsonschema_rs
import pytest

from steadyserve.auth.keyring import KeyRing
from steadyserve.config import DeploymentConfig
from steadyserve.errors import ClientError
from steadyserve.gateway.app import ROUTES
from steadyserve.policies.rollout import apply_changes, changes_schema
from steadyserve.store import Database
from steadyserve.store.keys import KeyStore

from .conftest import admin_headers
from .services import Echo, FakeEmbedder


async def doc_for(make_gateway, keys: KeyRing | None = None):
    gw, client, _ = await make_gateway({"echo": (Echo, 1), "emb": (FakeEmbedder, 1)}, keys=keys)
    r = await client.get("/openapi.json")
    assert r.status_code == 200
    return gw, client, r.json()


async def test_every_route_and_handler_is_documented_with_its_security(make_gateway):
    _, _, doc = await doc_for(make_gateway)
    assert doc["openapi"] == "3.1.0"
    paths = doc["paths"]
    for route in ROUTES:
        if "{deployment}" in route.pattern and route.pattern.endswith(("rollout", "{handler}")):
            continue  # concrete per deployment / handler
        op = paths[route.pattern][route.method.lower()]
        expected = {"public": [], "admin": [{"apiKey": []}]}.get(route.access,
                                                                  [{"apiKey": []}, {}])
        assert op["security"] == expected, route.pattern
        assert "default" in op["responses"]
    for handler in ("echo", "upper", "fail", "charge", "short"):
        assert f"/v1/deployments/echo/{handler}" in paths
    assert "/v1/admin/deployments/echo/rollout" in paths
    ids = [op["operationId"] for p in paths.values() for op in p.values()]
    assert len(ids) == len(set(ids))
    # the query parameters the routes read (each refuses other values with 400)
    listed = {q["name"] for q in paths["/v1/jobs"]["get"]["parameters"] if q["in"] == "query"}
    assert listed == {"state", "limit"}


@pytest.mark.parametrize(("handler", "body"), [
    ("echo", {"text": "a"}), ("echo", {"text": "a", "n": 2}), ("echo", {}),
    ("echo", {"text": 1}), ("echo", {"text": "a", "extra": 1}), ("echo", {"text": "a", "n": 1.5}),
    ("echo", {"text": "a", "n": True}), ("upper", {"texts": ["a"]}), ("upper", {"texts": []}),
    ("upper", {"texts": ["a"] * 17}), ("upper", {"texts": ["a", 2]}), ("upper", []),
    ("charge", {"amount": 1}), ("charge", {"amount": 1.5}), ("charge", {"amount": "1"}),
])
async def test_handler_schemas_agree_with_the_gateways_validation(make_gateway, handler, body):
    _, client, doc = await doc_for(make_gateway)
    op = doc["paths"][f"/v1/deployments/echo/{handler}"]["post"]
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    valid = jsonschema_rs.validator_for(schema).is_valid(body)
    r = await client.post(f"/v1/deployments/echo/{handler}", json=body)
    accepted = r.status_code not in (400, 413, 422)
    assert accepted == valid, (body, r.status_code, r.text)


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/cache/invalidate", {"tags": ["a"]}), ("/v1/cache/invalidate", {"tags": []}),
    ("/v1/cache/invalidate", {"tags": ["*"]}), ("/v1/cache/invalidate", {"all": True}),
    ("/v1/cache/invalidate", {"all": True, "tags": ["a"]}), ("/v1/cache/invalidate", {}),
    ("/v1/cache/invalidate", {"tags": ["x" * 257]}),
    ("/v1/admin/keys", {"name": "web"}), ("/v1/admin/keys", {"name": "web", "scopes": ["x"]}),
    ("/v1/admin/keys", {"name": "a b"}), ("/v1/admin/keys", {"name": "w", "burst": 0}),
    ("/v1/embeddings", {"model": "emb", "input": "hi"}),
    ("/v1/embeddings", {"model": "emb", "input": []}),
    ("/v1/embeddings", {"model": "emb", "input": [""]}),
    ("/v1/embeddings", {"model": "emb", "input": "hi", "encoding_format": "hex"}),
    ("/v1/embeddings", {"model": "emb", "input": "hi", "dimensions": 0}),
])
async def test_admin_and_openai_schemas_agree_with_the_routes(make_gateway, tmp_path, path, body):
    db = Database(f"sqlite:///{tmp_path}/keys.db")
    ring = KeyRing(KeyStore(db), admin_key_path=tmp_path / "admin.key")
    ring.bootstrap()
    gw, client, doc = await doc_for(make_gateway, ring)
    op = doc["paths"][path]["post"]
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    valid = jsonschema_rs.validator_for(schema).is_valid(body)
    r = await client.post(path, json=body, headers=admin_headers(gw))
    assert r.status_code not in (401, 403, 415, 421, 500), r.text
    db.close()
    if valid:
        assert r.status_code < 400, r.text
    else:  # refused for what is wrong with it, not for anything else
        assert r.status_code in (400, 413), (body, r.status_code, r.text)


BASE = DeploymentConfig(name="d", service="pkg.mod:A", services=("pkg.mod:B",),
                        rollout_env=("MODEL_DIR",), replicas=2)


@pytest.mark.parametrize("changes", [
    {}, {"replicas": 0}, {"replicas": 4}, {"replicas": 5}, {"replicas": 1.5}, {"replicas": True},
    {"replicas": "2"}, {"service": "pkg.mod:B"}, {"service": "/tmp/x.py:C"}, {"service": 1},
    {"env": {"MODEL_DIR": "/m"}}, {"env": {"MODEL_DIR": None}}, {"env": {"BROWSER": "sh"}},
    {"env": {"MODEL_DIR": "a\0b"}}, {"env": {"MODEL_DIR": 1}}, {"env": []},
    {"balancer": "round_robin"}, {"balancer": "random"}, {"torch_threads": None},
    {"torch_threads": 0}, {"torch_threads": 2}, {"max_connections_per_replica": 0},
    {"max_connections_per_replica": 64}, {"wat": 1},
])
def test_rollout_schema_agrees_with_apply_changes(changes):
    valid = jsonschema_rs.validator_for(changes_schema(BASE, 4)).is_valid(changes)
    try:
        apply_changes(BASE, BASE, changes, 4)
        accepted = True
    except ClientError:
        accepted = False
    assert accepted == valid, changes


async def test_a_bodiless_rotation_is_documented_as_such(make_gateway):
    _, _, doc = await doc_for(make_gateway)
    assert doc["paths"]["/v1/admin/keys/{key}/rotate"]["post"]["requestBody"]["required"] is False
    assert doc["paths"]["/v1/admin/keys"]["post"]["requestBody"]["required"] is True
