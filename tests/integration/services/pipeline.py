"""Services for the composition tests: a stand-in for MiniLM (deterministic bag-of-words
vectors, batched like the real one, so the pipeline runs without torch) and a parent/child
pair that records when child work starts, ends or is cancelled."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from typing import Any

import numpy as np

import steadyserve

DIM = 384


def word_vector(word: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(word.lower().encode()).digest()[:4], "little")
    return np.random.default_rng(seed).standard_normal(DIM)


class FakeMiniLM(steadyserve.Service):
    @steadyserve.handler(batch=True, max_batch_size=64, openai="embeddings")
    def embed(self, texts: list[str]) -> list[dict[str, Any]]:
        out = []
        for text in texts:
            v = sum((word_vector(w) for w in text.split()), np.zeros(DIM))
            v = v / (np.linalg.norm(v) or 1.0)
            out.append({"embedding": v.astype(np.float32), "tokens": len(text.split())})
        return out


class Child(steadyserve.Service):
    def setup(self) -> None:
        self.events: dict[str, dict[str, float]] = {}

    @steadyserve.handler(timeout_s=30)
    async def work(self, tag: str, seconds: float) -> str:
        self.events[tag] = {"started": time.time()}
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.events[tag]["cancelled"] = time.time()
            raise
        self.events[tag]["finished"] = time.time()
        return "done"

    @steadyserve.handler
    def seen(self, tag: str) -> dict[str, float]:
        return self.events.get(tag, {})


class Parent(steadyserve.Service):
    @steadyserve.handler(timeout_s=30)
    async def wait(self, tag: str, seconds: float) -> str:
        return str(await self.deployment("child").work.acall(tag=tag, seconds=seconds))

    @steadyserve.handler(timeout_s=30)
    def wait_sync(self, tag: str, seconds: float) -> str:
        return str(self.deployment("child").work(tag=tag, seconds=seconds))

    @steadyserve.handler
    async def pid(self) -> int:
        return os.getpid()
