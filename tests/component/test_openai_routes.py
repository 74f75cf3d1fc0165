"""OpenAI-compatible embeddings and models routes, errors in OpenAI's shape, compression."""

from __future__ import annotations

import base64
import gzip

import numpy as np
import orjson
import pytest
import zstandard

from .services import Echo, FakeEmbedder, fake_vector

pytestmark = pytest.mark.asyncio


async def test_embeddings_returns_openai_shape(make_gateway):
    _, client, _ = await make_gateway({"emb": (FakeEmbedder, 2)})
    r = await client.post("/v1/embeddings", json={"model": "emb", "input": ["hello world", "b"]})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert body["model"] == "emb"
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(d["object"] == "embedding" for d in body["data"])
    np.testing.assert_allclose(body["data"][0]["embedding"], fake_vector("hello world"), rtol=1e-6)
    assert body["usage"] == {"prompt_tokens": 4 + 3, "total_tokens": 7}


async def test_a_single_string_input_and_base64_encoding(make_gateway):
    _, client, _ = await make_gateway({"emb": (FakeEmbedder, 1)})
    r = await client.post("/v1/embeddings",
                          json={"model": "emb", "input": "hi there", "encoding_format": "base64"})
    assert r.status_code == 200
    data = r.json()["data"]
    assert len(data) == 1
    decoded = np.frombuffer(base64.b64decode(data[0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(decoded, fake_vector("hi there"))


async def test_models_lists_deployments(make_gateway):
    _, client, _ = await make_gateway({"emb": (FakeEmbedder, 1), "echo": (Echo, 1)})
    body = (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    assert sorted(m["id"] for m in body["data"]) == ["echo", "emb"]
    assert all(m["object"] == "model" for m in body["data"])


@pytest.mark.parametrize(
    ("body", "status", "param", "code", "fragment"),
    [
        (b"{oops", 400, None, "invalid_request", "invalid JSON"),
        (b'"just a string"', 400, None, "invalid_request", "JSON object"),
        (b'{"input": "x"}', 400, "model", "invalid_request", "'model' is required"),
        (b'{"model": 3, "input": "x"}', 400, "model", "invalid_request", "'model' is required"),
        (b'{"model": "nope", "input": "x"}', 404, "model", "model_not_found", "no deployment"),
        (b'{"model": "echo", "input": "x"}', 404, "model", "model_not_found",
         "does not serve embeddings"),
        (b'{"model": "emb"}', 400, "input", "invalid_request", "'input' must be"),
        (b'{"model": "emb", "input": []}', 400, "input", "invalid_request", "empty list"),
        (b'{"model": "emb", "input": 42}', 400, "input", "invalid_request", "'input' must be"),
        (b'{"model": "emb", "input": [1, 2, 3]}', 400, "input", "invalid_request",
         "token arrays are not supported"),
        (b'{"model": "emb", "input": ["a", ""]}', 400, "input", "invalid_request",
         "must not be an empty string"),
        (b'{"model": "emb", "input": "a", "encoding_format": "hex"}', 400, "encoding_format",
         "invalid_request", "'float' or 'base64'"),
        (b'{"model": "emb", "input": "a", "dimensions": 3}', 400, "dimensions",
         "invalid_request", "has 8 dimensions"),
        (b'{"model": "emb", "input": "a", "dimensions": -1}', 400, "dimensions",
         "invalid_request", "positive integer"),
        (b'{"model": "emb", "input": ["a","a","a","a","a","a","a","a","a","a","a"]}', 413,
         "texts", "payload_too_large", "at most 10"),
    ],
    ids=["bad-json", "not-object", "no-model", "model-not-str", "unknown-model",
         "not-an-embedding-model", "no-input", "empty-list", "int-input", "token-arrays",
         "empty-string", "bad-format", "dimensions-mismatch", "negative-dimensions",
         "too-many-inputs"],
)
async def test_bad_input_gets_openai_shaped_4xx(make_gateway, body, status, param, code, fragment):
    _, client, _ = await make_gateway({"emb": (FakeEmbedder, 1), "echo": (Echo, 1)})
    r = await client.post("/v1/embeddings", content=body,
                          headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["code"] == code
    assert fragment in error["message"]


@pytest.mark.parametrize("encoding", ["gzip", "zstd"])
async def test_large_responses_are_compressed_when_the_client_accepts_it(make_gateway, encoding):
    _, client, _ = await make_gateway({"emb": (FakeEmbedder, 1)}, compress_min_bytes=200)
    payload = {"model": "emb", "input": [f"text {i}" for i in range(8)]}
    plain = await client.post("/v1/embeddings", json=payload, headers={"accept-encoding": "identity"})
    assert "content-encoding" not in plain.headers
    raw = await client.send(
        client.build_request("POST", "/v1/embeddings", json=payload,
                             headers={"accept-encoding": encoding}),
        stream=True,
    )
    compressed = b"".join([chunk async for chunk in raw.aiter_raw()])
    await raw.aclose()
    assert raw.headers["content-encoding"] == encoding
    assert int(raw.headers["content-length"]) == len(compressed) < len(plain.content)
    inflated = gzip.decompress(compressed) if encoding == "gzip" else \
        zstandard.ZstdDecompressor().decompress(compressed)
    assert orjson.loads(inflated) == plain.json()


async def test_small_responses_are_not_compressed(make_gateway):
    _, client, _ = await make_gateway({"emb": (FakeEmbedder, 1)})  # default threshold 1 KiB
    r = await client.get("/v1/models", headers={"accept-encoding": "gzip"})
    assert "content-encoding" not in r.headers
