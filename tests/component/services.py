"""Small services used by the component tests."""

from __future__ import annotations

import hashlib
import threading
from typing import Any

import numpy as np

import steadyserve


class Echo(steadyserve.Service):
    def setup(self) -> None:
        self.calls = 0
        self.batches: list[int] = []

    @steadyserve.handler
    def echo(self, text: str, n: int = 1) -> dict[str, Any]:
        self.calls += 1
        return {"text": text * n}

    @steadyserve.handler
    def fail(self, kind: str) -> None:
        if kind == "client":
            raise steadyserve.ClientError("the kind you sent is not allowed")
        raise ValueError("boom")

    @steadyserve.handler(batch=True, max_batch_size=8, max_inputs=16)
    def upper(self, texts: list[str]) -> list[str]:
        self.batches.append(len(texts))
        return [t.upper() for t in texts]

    @steadyserve.handler(batch=True, max_batch_size=8)
    def short(self, texts: list[str]) -> list[str]:
        return [t for t in texts[:-1]]  # breaks the contract: one result too few

    @steadyserve.handler(idempotent=False)
    def charge(self, amount: float) -> dict[str, float]:
        return {"charged": amount}


def fake_vector(text: str, dim: int = 8) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


class FakeEmbedder(steadyserve.Service):
    version = "fake-1"

    @steadyserve.handler(batch=True, max_batch_size=16, max_inputs=10, openai="embeddings")
    def embed(self, texts: list[str]) -> list[dict[str, Any]]:
        return [{"embedding": fake_vector(t), "tokens": len(t.split()) + 2} for t in texts]


class Gate(steadyserve.Service):
    """A batched handler that blocks until the test opens the gate."""

    def setup(self) -> None:
        self.gate = threading.Event()
        self.batches: list[list[int]] = []

    @steadyserve.handler(batch=True, max_batch_size=64)
    def work(self, items: list[int]) -> list[int]:
        self.gate.wait(5)
        self.batches.append(list(items))
        return [i * 10 for i in items]
