"""The dashboard's routes in process: the page with its CSP, only the listed assets, and
/v1/dashboard's data, refusing a bad `history` with a 400 that names it."""

from __future__ import annotations

import pytest

from .services import Echo


async def test_the_page_and_only_its_assets(make_gateway):
    _, client, _ = await make_gateway({"echo": (Echo, 1)})
    page = await client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    js = await client.get("/dashboard/app.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    for hostile in ("/dashboard/secret.txt", "/dashboard/..%2Fdata.py", "/dashboard/%00"):
        r = await client.get(hostile)
        assert r.status_code == 404, (hostile, r.text)
        assert r.json()["error"]["code"] == "not_found"


async def test_the_data_and_its_history_bound(make_gateway):
    _, client, _ = await make_gateway({"echo": (Echo, 1)})
    assert (await client.post("/v1/deployments/echo/echo", json={"text": "a"})).status_code == 200
    data = (await client.get("/v1/dashboard?history=60")).json()
    [echo] = data["deployments"]
    assert echo["name"] == "echo" and echo["ready"] == 1
    assert echo["metrics"]["requests"]["2xx"] == 1
    assert data["cluster"] == {"enabled": False, "leading": True}


@pytest.mark.parametrize("query", ["history=", "history=abc", "history=0", "history=4321",
                                   "history=99999999999", "history=%C2%B2", "history=-5"])
async def test_a_bad_history_is_a_400_naming_it(make_gateway, query):
    _, client, _ = await make_gateway({"echo": (Echo, 1)})
    r = await client.get(f"/v1/dashboard?{query}")
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "history"
