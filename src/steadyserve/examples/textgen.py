"""Text generation that runs offline on a laptop CPU: a word-level trigram language model,
trained at start (about a second) on the English prose that ships with CPython itself —
`pydoc_data.topics`, the reference manual's topics (~465 KB) — and sampled token by token.

    steadyserve run steadyserve.examples.textgen:TextGenerator --name textgen
    curl -N localhost:8000/v1/deployments/textgen/generate -d '{"prompt": "The default"}'
    # or with the official client:
    openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-").chat.completions.create(
        model="textgen", messages=[{"role": "user", "content": "A class"}], stream=True)

Sampling: the next word's probability is its trigram count (falling back to the bigram, then
to a sentence start) raised to 1/temperature; temperature 0 takes the most frequent. `seed`
makes a generation repeatable. Each item is one word with its leading space, so the pieces
join into the text. `TEXTGEN_TOKEN_DELAY_MS` (default 0) spaces the words out, to watch a
stream arrive.

It is a small statistical model, not a neural one: it writes locally fluent, globally
aimless reference-manual English — enough to exercise streaming, cancellation and the OpenAI
routes with real text, with nothing to download.
"""

from __future__ import annotations

import bisect
import os
import random
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import TypedDict

import steadyserve

_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*[.,;:!?]?$")
_ENDS = (".", "!", "?")
MAX_TOKENS = 1024


class ChatMessage(TypedDict):
    role: str
    content: str


def corpus_words() -> list[str]:
    from pydoc_data.topics import topics

    words: list[str] = []
    for text in topics.values():
        for raw in text.split():
            if _WORD.fullmatch(raw):
                words.append(raw)
    return words


class TrigramModel:
    def __init__(self, words: list[str]) -> None:
        tri: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
        bi: dict[str, Counter[str]] = defaultdict(Counter)
        starts: Counter[str] = Counter()
        for a, b, c in zip(words, words[1:], words[2:], strict=False):
            tri[(a, b)][c] += 1
            bi[a][b] += 1
            if a.endswith(_ENDS) and b[0].isupper():
                starts[b] += 1
        self.tri = {k: (list(v), list(v.values())) for k, v in tri.items()}
        self.bi = {k: (list(v), list(v.values())) for k, v in bi.items()}
        self.starts = (list(starts), list(starts.values()))
        self.lower = {w.lower(): w for w in bi}  # a prompt's word in the corpus's case

    @staticmethod
    def _sample(choices: tuple[list[str], list[int]], temperature: float,
                rng: random.Random) -> str:
        words, counts = choices
        if temperature <= 0:
            return words[max(range(len(words)), key=counts.__getitem__)]
        weights = [c ** (1.0 / temperature) for c in counts]
        cumulative = []
        total = 0.0
        for w in weights:
            total += w
            cumulative.append(total)
        return words[bisect.bisect_right(cumulative, rng.random() * total)]

    def next_word(self, a: str | None, b: str | None, temperature: float,
                  rng: random.Random) -> str:
        if a is not None and b is not None and (a, b) in self.tri:
            return self._sample(self.tri[(a, b)], temperature, rng)
        if b is not None and b in self.bi:
            return self._sample(self.bi[b], temperature, rng)
        return self._sample(self.starts, temperature, rng)

    def context(self, prompt: str) -> tuple[str | None, str | None]:
        known = [self.lower.get(w.lower(), w) for w in prompt.split()]
        a = known[-2] if len(known) >= 2 else None
        b = known[-1] if known else None
        return a, b


class TextGenerator(steadyserve.Service):
    version = "trigram-pydoc-1"

    def setup(self) -> None:
        started = time.monotonic()
        self.model = TrigramModel(corpus_words())
        self.trained_s = time.monotonic() - started
        self.delay_s = float(os.environ.get("TEXTGEN_TOKEN_DELAY_MS", "0")) / 1000

    def _words(self, prompt: str, max_tokens: int, temperature: float,
               seed: int | None) -> Iterator[str]:
        if not 1 <= max_tokens <= MAX_TOKENS:
            raise steadyserve.ClientError(f"max_tokens must be in [1, {MAX_TOKENS}]",
                                          param="max_tokens")
        if not 0 <= temperature <= 2:
            raise steadyserve.ClientError("temperature must be in [0, 2]", param="temperature")
        rng = random.Random(seed)
        a, b = self.model.context(prompt)
        for _ in range(max_tokens):
            word = self.model.next_word(a, b, temperature, rng)
            if self.delay_s:
                time.sleep(self.delay_s)
            yield " " + word
            a, b = b, word

    @steadyserve.handler(openai="completions", timeout_s=120)
    def generate(self, prompt: str, max_tokens: int = 64, temperature: float = 0.8,
                 seed: int | None = None) -> Iterator[str]:
        yield from self._words(prompt, max_tokens, temperature, seed)

    @steadyserve.handler(openai="chat", timeout_s=120)
    def chat(self, messages: list[ChatMessage], max_tokens: int = 64, temperature: float = 0.8,
             seed: int | None = None) -> Iterator[str]:
        user = [m["content"] for m in messages if m["role"] == "user"]
        yield from self._words(user[-1] if user else "", max_tokens, temperature, seed)
