"""Peer for the embeddings benchmark: the same model behind a plain FastAPI app.

One uvicorn worker, one forward pass per request (no batching across requests), torch using
all cores (BENCH_TORCH_THREADS, default: the usable cores). Same body and response shape as
steadyserve's `POST /v1/embeddings`, serialised with orjson (the fastest thing FastAPI can do).

    BENCH_TORCH_THREADS=2 .venv/bin/python -m uvicorn --app-dir benchmarks/peers \
        fastapi_embed:app --port 8001 --workers 1

BENCH_PEER_MODE picks how the forward runs:
  async       (default) in the event loop: one forward at a time, the loop waits for it
  threadpool  a plain `def` endpoint, FastAPI runs it in its thread pool (forwards overlap)
"""

from __future__ import annotations

import os

# thread counts must be set before torch / tokenizers are imported
_THREADS = int(os.environ.get("BENCH_TORCH_THREADS") or len(os.sched_getaffinity(0)))
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
    os.environ.setdefault(_var, str(_THREADS))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import orjson  # noqa: E402
import torch  # noqa: E402
from fastapi import FastAPI, Response  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from steadyserve.examples.embedding import Embedder  # noqa: E402

torch.set_num_threads(_THREADS)
embedder = Embedder()
embedder.setup()
MODE = os.environ.get("BENCH_PEER_MODE", "async")

app = FastAPI()


class EmbeddingsIn(BaseModel):
    model: str
    input: str | list[str]


def _respond(body: EmbeddingsIn) -> Response:
    texts = [body.input] if isinstance(body.input, str) else body.input
    results = embedder.embed(texts)
    tokens = sum(r["tokens"] for r in results)
    payload = {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": r["embedding"]}
                 for i, r in enumerate(results)],
        "model": body.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY),
                    media_type="application/json")


if MODE == "threadpool":
    @app.post("/v1/embeddings")
    def embeddings_sync(body: EmbeddingsIn) -> Response:
        return _respond(body)
else:
    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingsIn) -> Response:
        return _respond(body)


@app.get("/readyz")
async def readyz() -> dict:
    return {"status": "ready"}
