"""The Open Inference Protocol (KServe v2) with the real `tritonclient[http]`: server and
model metadata, readiness, inference on the embedding model (BYTES in, FP32 out) and on the
risk model (named tensors) with and without the binary data extension, answers equal to the
native API's, and bad requests refused in the protocol's error shape."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from .conftest import Running

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TEXTS = ["The quick brown fox jumps over the lazy dog.", "hello world", "ünïcödé ✓ text"]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Running:
    from .conftest import start

    tmp = tmp_path_factory.mktemp("oip")
    (tmp / "steadyserve.toml").write_text(f"""
data_dir = "{tmp / 'state'}"
[alerting]
enabled = false
[deployments.minilm]
service = "steadyserve.examples.embedding:Embedder"
replicas = 1
[deployments.risk]
service = "steadyserve.examples.risk.service:RiskScorer"
replicas = 1
""")
    running = start([], Path(tmp))
    try:
        running.wait_ready(180)
        yield running
    finally:
        assert running.stop() == []


def client(gw: Running) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=gw.url.removeprefix("http://"), network_timeout=60)


def test_metadata_and_readiness(gw: Running) -> None:
    c = client(gw)
    assert c.is_server_live() and c.is_server_ready()
    assert c.get_server_metadata()["name"] == "steadyserve"
    assert c.is_model_ready("minilm") and c.is_model_ready("risk")
    meta = c.get_model_metadata("minilm")
    assert meta["inputs"] == [{"name": "texts", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"] for o in meta["outputs"]} == {"embedding", "tokens"}
    risk = c.get_model_metadata("risk")
    assert {i["name"]: i["datatype"] for i in risk["inputs"]} == {
        "account_id": "INT64", "amount": "FP32", "merchant_category": "BYTES", "hour": "INT64"}
    with pytest.raises(InferenceServerException) as missing:
        c.get_model_metadata("nope")
    assert missing.value.status() == "404" and "no deployment named 'nope'" in \
        missing.value.message()


@pytest.mark.parametrize("binary", [True, False])
def test_embeddings_equal_the_native_answer(gw: Running, binary: bool) -> None:
    c = client(gw)
    texts = triton.InferInput("texts", [len(TEXTS)], "BYTES")
    texts.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object),
                              binary_data=binary)
    outputs = [triton.InferRequestedOutput("embedding", binary_data=binary),
               triton.InferRequestedOutput("tokens", binary_data=binary)]
    result = c.infer("minilm", [texts], outputs=outputs, request_id="req-1")
    got = result.as_numpy("embedding")
    assert got.dtype == np.float32 and got.shape == (3, 384)
    assert result.get_response()["id"] == "req-1"
    native = httpx.post(f"{gw.url}/v1/deployments/minilm/embed", json={"texts": TEXTS},
                        timeout=30).json()
    want = np.asarray([r["embedding"] for r in native], dtype=np.float32)
    assert np.allclose(got, want, atol=1e-6)
    assert result.as_numpy("tokens").tolist() == [r["tokens"] for r in native]


def test_all_outputs_binary_by_default(gw: Running) -> None:
    texts = triton.InferInput("texts", [1], "BYTES")
    texts.set_data_from_numpy(np.array([b"one"], dtype=object))  # binary, outputs unnamed
    result = client(gw).infer("minilm", [texts])
    assert result.as_numpy("embedding").shape == (1, 384)


@pytest.mark.parametrize("binary", [True, False])
def test_the_risk_model_takes_named_tensors(gw: Running, binary: bool) -> None:
    columns = {"account_id": (np.array([1, 2], dtype=np.int64), "INT64"),
               "amount": (np.array([10.0, 2500.0], dtype=np.float32), "FP32"),
               "merchant_category": (np.array([b"grocery", b"electronics"], dtype=object),
                                     "BYTES"),
               "hour": (np.array([12, 3], dtype=np.int64), "INT64")}
    inputs = []
    for name, (array, datatype) in columns.items():
        tensor = triton.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    result = client(gw).infer("risk", inputs)
    scores = result.as_numpy("score")
    assert scores.shape == (2,)
    native = httpx.post(f"{gw.url}/v1/deployments/risk/score", json={"transactions": [
        {"account_id": 1, "amount": 10.0, "merchant_category": "grocery", "hour": 12},
        {"account_id": 2, "amount": 2500.0, "merchant_category": "electronics", "hour": 3}]},
        timeout=30).json()
    assert np.allclose(scores, [r["score"] for r in native])
    assert [d.decode() for d in result.as_numpy("decision")] == [r["decision"] for r in native]


@pytest.mark.parametrize(("body", "status", "says"), [
    ({"inputs": [{"name": "txt", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}, 400,
     "unknown input 'txt'"),
    ({"inputs": [{"name": "texts", "shape": [2], "datatype": "BYTES", "data": ["x"]}]}, 400,
     "has 1 elements; its shape [2] holds 2"),
    ({"inputs": [{"name": "texts", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, 400,
     "expected BYTES"),
    ({"inputs": [{"name": "texts", "shape": [1], "datatype": "COMPLEX", "data": [1]}]}, 400,
     "unknown datatype"),
    ({"inputs": []}, 400, "non-empty list"),
    ({"inputs": [{"name": "texts", "shape": [1], "datatype": "BYTES", "data": ["x"]}],
      "outputs": [{"name": "nope"}]}, 400, "unknown output 'nope'"),
])
def test_bad_requests_are_refused_in_the_protocols_shape(gw: Running, body: dict, status: int,
                                                         says: str) -> None:
    r = httpx.post(f"{gw.url}/v2/models/minilm/infer", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and says in r.json()["error"], r.text


def test_a_bad_request_through_tritonclient(gw: Running) -> None:
    wrong = triton.InferInput("amount", [1], "BYTES")
    wrong.set_data_from_numpy(np.array([b"ten"], dtype=object))
    with pytest.raises(InferenceServerException) as refused:
        client(gw).infer("risk", [wrong])
    assert refused.value.status() == "400"
    assert "'account_id' is required" in refused.value.message()


def test_a_truncated_binary_body_is_a_400(gw: Running) -> None:
    head = b'{"inputs":[{"name":"texts","shape":[1],"datatype":"BYTES",' \
           b'"parameters":{"binary_data_size":9}}]}'
    r = httpx.post(f"{gw.url}/v2/models/minilm/infer", content=head + b"\x05\x00\x00\x00ab",
                   headers={"Inference-Header-Content-Length": str(len(head))}, timeout=30)
    assert r.status_code == 400 and "binary_data_size" in r.json()["error"], r.text
