"""OpenAI-compatible text generation: `POST /v1/completions` and `POST /v1/chat/completions`,
streamed (`"stream": true`: server-sent events of `text_completion` / `chat.completion.chunk`
objects, then `data: [DONE]`) or not.

The deployment named by `model` needs a streaming handler (a generator) declared with
`openai="completions"` (parameters `prompt`, and any of `max_tokens`, `temperature`, `seed`)
or `openai="chat"` (`messages`, and the same options). Each item it yields is one piece of
text (a token): a string, or `{"text": str}`. The gateway passes only the options the handler
declares, applies `stop` sequences itself (the generator is stopped when one appears), and
counts usage: completion tokens are the items; prompt tokens are the prompt's
whitespace-separated words (an estimate: the handler's tokenizer is its own).

Usage (`stream_options.include_usage`) comes as a last chunk with empty `choices` — also
after a failure mid-stream (an error chunk first) and when `stop` ends the stream early. A
client that disconnects gets nothing more, but what was generated until then is counted
(`steadyserve_generated_tokens_total`). Refused with a 400 naming the field: `n` other than 1,
`logprobs`, `tools`, `functions`, `response_format`, `best_of`, `echo`, `suffix`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson

from ..errors import ClientError, HandlerFailed, SteadyError
from .http import Request, Response, json_response
from .openai import handler_of, model_of
from .routes import request_timeout_s
from .streaming import SSE, counted, error_body, open_items

if TYPE_CHECKING:
    from .dispatch import Streamed
    from .membership import Deployment, Handler
    from .plane import DataPlane

MAX_TOKENS_LIMIT = 100_000
MAX_STOPS = 4
MAX_STOP_CHARS = 256
MAX_MESSAGES = 1024
UNSUPPORTED = ("logprobs", "top_logprobs", "tools", "tool_choice", "functions",
               "function_call", "response_format", "best_of", "echo", "suffix", "logit_bias")


def _int(body: dict[str, Any], name: str, low: int, high: int, default: int | None
         ) -> int | None:
    value = body.get(name, default)
    if value is None:
        return None
    if type(value) is not int or not low <= value <= high:
        raise ClientError(f"'{name}' must be an integer in [{low}, {high}]", param=name)
    return value


def _options(body: dict[str, Any], h: Handler) -> tuple[dict[str, Any], list[str], bool, bool]:
    """(handler options, stop sequences, stream, include_usage) from an OpenAI body."""
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, 0):
            raise ClientError(f"'{name}' is not supported by steadyserve", param=name)
    if body.get("n", 1) != 1:
        raise ClientError("'n' must be 1 (one choice per request)", param="n")
    params = {p["name"] for p in h.spec.params}
    options: dict[str, Any] = {}
    max_tokens = _int(body, "max_completion_tokens", 1, MAX_TOKENS_LIMIT, None)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1, MAX_TOKENS_LIMIT, None)
    if max_tokens is not None and "max_tokens" in params:
        options["max_tokens"] = max_tokens
    temperature = body.get("temperature")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) \
                or not 0 <= temperature <= 2:
            raise ClientError("'temperature' must be a number in [0, 2]", param="temperature")
        if "temperature" in params:
            options["temperature"] = float(temperature)
    seed = _int(body, "seed", -(2 ** 63), 2 ** 63 - 1, None)
    if seed is not None and "seed" in params:
        options["seed"] = seed
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise ClientError(f"'stop' must be a string or a list of at most {MAX_STOPS} non-empty "
                          f"strings of at most {MAX_STOP_CHARS} characters", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ClientError("'stream' must be a boolean", param="stream")
    so = body.get("stream_options")
    if so is not None and (not isinstance(so, dict) or not isinstance(
            so.get("include_usage", False), bool)):
        raise ClientError("'stream_options' must be an object with a boolean 'include_usage'",
                          param="stream_options")
    if so is not None and not stream:
        raise ClientError("'stream_options' is only allowed with 'stream': true",
                          param="stream_options")
    return options, stops, stream, bool(so and so.get("include_usage"))


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or len(messages) > MAX_MESSAGES:
        raise ClientError(f"'messages' must be a non-empty list of at most {MAX_MESSAGES} "
                          "messages", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant",
                                                             "developer"):
            raise ClientError(f"'messages[{i}]' needs a 'role' of system, developer, user or "
                              "assistant", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise ClientError(f"'messages[{i}].content' parts must all be text",
                                  param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ClientError(f"'messages[{i}].content' must be a string", param="messages")
        out.append({"role": str(m["role"]), "content": content})
    return out


def _piece(item: Any) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        return str(item["text"])
    raise HandlerFailed("the generation handler yielded an item that is not text (a string "
                        "or {'text': str})")


class _Run:
    """One generation: pieces with `stop` applied, counted."""

    def __init__(self, streamed: Streamed, stops: list[str], max_tokens: int | None) -> None:
        self.streamed = streamed
        self.stops = stops
        self.max_tokens = max_tokens
        self.tokens = 0
        self.text = ""
        self.finish = "stop"

    async def pieces(self) -> AsyncIterator[str]:
        async for item in self.streamed.items():
            piece = _piece(item)
            self.tokens += 1
            if self.stops:
                joined = self.text + piece
                cut = min((i for i in (joined.find(s) for s in self.stops) if i >= 0),
                          default=-1)
                if cut >= 0:
                    piece = joined[len(self.text):cut] if cut > len(self.text) else ""
                    self.text = joined[:cut]
                    if piece:
                        yield piece
                    self.finish = "stop"
                    return
            self.text += piece
            yield piece
        if self.max_tokens is not None and self.tokens >= self.max_tokens:
            self.finish = "length"


async def completions(gw: DataPlane, req: Request, params: dict[str, str]) -> Response:
    return await _generate(gw, req, chat=False)


async def chat_completions(gw: DataPlane, req: Request, params: dict[str, str]) -> Response:
    return await _generate(gw, req, chat=True)


async def _generate(gw: DataPlane, req: Request, *, chat: bool) -> Response:
    body, model, d = await model_of(gw, req)
    h = await handler_of(gw, req, d, "chat" if chat else "completions",
                         "chat completions" if chat else "completions")
    options, stops, stream, include_usage = _options(body, h)
    if chat:
        messages = _messages(body)
        args = {"messages": messages, **options}
        prompt_words = sum(len(m["content"].split()) for m in messages)
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise ClientError("'prompt' must be a string (token arrays and lists of prompts "
                              "are not supported)", param="prompt")
        args = {"prompt": prompt, **options}
        prompt_words = len(prompt.split())
    args = h.validate(args)
    streamed = await open_items(gw, req, d, h, args, request_timeout_s(gw, req))
    run = _Run(streamed, stops, options.get("max_tokens"))
    ident = ("chatcmpl-" if chat else "cmpl-") + req.request_id
    created = int(time.time())
    if not stream:
        try:
            async for _ in run.pieces():
                pass
        finally:
            await streamed.close()
            gw.metrics.generated_tokens.labels(d.name).inc(run.tokens)
        usage = _usage(prompt_words, run.tokens)
        choice: dict[str, Any] = {"index": 0, "finish_reason": run.finish}
        if chat:
            choice["message"] = {"role": "assistant", "content": run.text}
        else:
            choice.update(text=run.text, logprobs=None)
        return json_response({"id": ident, "object": "chat.completion" if chat else
                              "text_completion", "created": created, "model": model,
                              "choices": [choice], "usage": usage})
    return Response(200, b"", SSE, headers=[(b"cache-control", b"no-store")],
                    stream=_events(gw, d, run, ident, created, model, chat, include_usage,
                                   prompt_words))


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _event(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


async def _events(gw: DataPlane, d: Deployment, run: _Run, ident: str, created: int, model: str,
                  chat: bool, include_usage: bool, prompt_words: int) -> AsyncIterator[bytes]:
    obj = "chat.completion.chunk" if chat else "text_completion"
    items = gw.metrics.stream_items.labels(d.name)

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return _event({"id": ident, "object": obj, "created": created, "model": model,
                       "choices": choices, **extra})

    def choice(piece: str | None, finish: str | None) -> dict[str, Any]:
        if chat:
            delta = {} if piece is None else {"content": piece}
            return {"index": 0, "delta": delta, "finish_reason": finish}
        return {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}

    async with counted(gw, d.name, run.streamed) as outcome:
        try:
            if chat:
                yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                              "finish_reason": None}])
            try:
                async for piece in run.pieces():
                    items.inc()
                    yield chunk([choice(piece, None)])
            except SteadyError as exc:
                outcome.value = "error"
                yield _event(error_body(exc))
            else:
                outcome.value = "complete"
                yield chunk([choice(None, run.finish)])
            if include_usage:
                yield chunk([], usage=_usage(prompt_words, run.tokens))
            yield b"data: [DONE]\n\n"
        finally:
            gw.metrics.generated_tokens.labels(d.name).inc(run.tokens)
