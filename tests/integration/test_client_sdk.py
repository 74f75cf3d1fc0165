"""steadyserve.Client and AsyncClient against a live gateway: embeddings equal to the native
answer, handler calls with their request id, the deadline carried to the gateway (a slow
call ends at the caller's timeout, not the handler's), and API keys."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest

import steadyserve
from steadyserve.client import SteadyserveError

from .conftest import ECHO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TEXTS = ["hello world", "a second, longer sentence about serving models"]


def test_the_client_against_a_live_gateway(serve, tmp_path) -> None:
    (tmp_path / "steadyserve.toml").write_text(f"""
data_dir = "{tmp_path / 'state'}"
[alerting]
enabled = false
[deployments.minilm]
service = "steadyserve.examples.embedding:Embedder"
replicas = 1
[deployments.echo]
service = "{ECHO}"
replicas = 1
""")
    gw = serve([], ready_timeout_s=180)
    with steadyserve.Client(gw.url, timeout_s=30) as c:
        assert c.ready()
        assert {d["name"] for d in c.deployments()} == {"minilm", "echo"}
        got = c.embed(TEXTS, model="minilm")
        native = httpx.post(f"{gw.url}/v1/deployments/minilm/embed", json={"texts": TEXTS},
                            timeout=30).json()
        assert got.vectors.shape == (2, 384)
        assert np.allclose(got.vectors, np.asarray([r["embedding"] for r in native]), atol=1e-6)
        echoed = c.invoke("echo", "echo", text="hi")
        assert echoed.value["text"] == "hi" and len(echoed.request_id) == 24
        assert echoed.request_id in gw.log.read_text()  # the gateway logged the same id

        started = time.monotonic()
        with pytest.raises(SteadyserveError) as late:
            c.invoke("echo", "slow", seconds=3.0, timeout_s=0.4, idempotent=True)
        took = time.monotonic() - started
        assert late.value.status == 504 and late.value.code == "deadline_exceeded", late.value
        assert took < 2.0, took  # the gateway gave up with the caller

        with pytest.raises(SteadyserveError) as bad:
            c.invoke("echo", "echo", texts="oops")
        assert bad.value.status == 400 and bad.value.attempts == 1

    made = httpx.post(f"{gw.url}/v1/admin/keys", headers=gw.admin_headers(), timeout=10,
                      json={"name": "sdk", "scopes": ["infer"]})
    assert made.status_code == 201, made.text
    deadline = time.monotonic() + 10
    with steadyserve.Client(gw.url) as anonymous:
        while True:  # keys reach the data plane within [auth] key_refresh_s
            try:
                anonymous.invoke("echo", "echo", text="x")
            except SteadyserveError as exc:
                assert exc.status == 401, exc
                break
            assert time.monotonic() < deadline
            time.sleep(0.2)

    async def with_key() -> str:
        async with steadyserve.AsyncClient(gw.url, api_key=made.json()["key"]) as c:
            return (await c.invoke("echo", "echo", text="keyed")).value["text"]

    assert asyncio.run(with_key()) == "keyed"
