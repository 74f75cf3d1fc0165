"""OpenAI completions and chat completions over a streaming handler, in process: the
non-streamed and streamed shapes, usage (also after a failure), `stop`, and the refusals."""

from __future__ import annotations

import json
from typing import Any

import pytest

import steadyserve
from steadyserve.examples.textgen import TextGenerator


class Flaky(steadyserve.Service):
    @steadyserve.handler(openai="chat")
    def chat(self, messages: list[dict], max_tokens: int = 8) -> Any:
        for i in range(max_tokens):
            if i == 3:
                raise RuntimeError("the model fell over")
            yield {"text": f" t{i}"}


def events(text: str) -> list[Any]:
    out = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def test_completions_and_chat_whole_and_streamed(make_gateway: Any) -> None:
    _, client, _ = await make_gateway({"textgen": (TextGenerator, 1)})
    r = await client.post("/v1/completions", json={"model": "textgen", "prompt": "A class",
                                                   "max_tokens": 12, "seed": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["choices"][0]["finish_reason"] == "length"
    assert len(body["choices"][0]["text"].split()) == 12
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 12, "total_tokens": 14}
    again = await client.post("/v1/completions", json={"model": "textgen", "prompt": "A class",
                                                       "max_tokens": 12, "seed": 7})
    assert again.json()["choices"][0]["text"] == body["choices"][0]["text"]  # seeded
    r = await client.post("/v1/chat/completions", json={
        "model": "textgen", "messages": [{"role": "user", "content": "The default"}],
        "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream", r.text
    got = events(r.text)
    assert got[-1] == "[DONE]"
    assert got[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [c["choices"][0]["delta"]["content"] for c in got[1:-3]]
    assert len(pieces) == 6 and all(p.startswith(" ") for p in pieces)
    assert got[-3]["choices"][0]["finish_reason"] == "length"
    assert got[-2]["choices"] == [] and got[-2]["usage"]["completion_tokens"] == 6
    assert all(c["object"] == "chat.completion.chunk" for c in got[:-1])
    metrics = (await client.get("/metrics")).text  # one stream, complete, its tokens counted
    assert 'steadyserve_streams_total{deployment="textgen",outcome="complete"} 1.0' in metrics
    assert 'steadyserve_streams_open{deployment="textgen"} 0.0' in metrics
    # 12 + 12 answered whole, 6 streamed
    assert 'steadyserve_generated_tokens_total{deployment="textgen"} 30.0' in metrics


async def test_stop_ends_the_generation(make_gateway: Any) -> None:
    _, client, _ = await make_gateway({"textgen": (TextGenerator, 1)})
    whole = (await client.post("/v1/completions", json={
        "model": "textgen", "prompt": "A class", "max_tokens": 30, "seed": 3})).json()
    text = whole["choices"][0]["text"]
    stop = text.split()[5]
    r = await client.post("/v1/completions", json={
        "model": "textgen", "prompt": "A class", "max_tokens": 30, "seed": 3, "stop": stop})
    cut = r.json()["choices"][0]
    assert cut["text"] == text[:text.find(stop)] and cut["finish_reason"] == "stop"


async def test_a_failure_mid_stream_still_sends_usage_and_done(make_gateway: Any) -> None:
    _, client, _ = await make_gateway({"flaky": (Flaky, 1)})
    r = await client.post("/v1/chat/completions", json={
        "model": "flaky", "messages": [{"role": "user", "content": "hi"}], "stream": True,
        "stream_options": {"include_usage": True}})
    got = events(r.text)
    assert [c["choices"][0]["delta"].get("content") for c in got[1:4]] == [" t0", " t1", " t2"]
    assert got[4]["error"]["code"] == "handler_failed"
    assert got[5]["usage"]["completion_tokens"] == 3 and got[6] == "[DONE]"
    metrics = (await client.get("/metrics")).text
    assert 'steadyserve_streams_total{deployment="flaky",outcome="error"} 1.0' in metrics
    assert 'steadyserve_generated_tokens_total{deployment="flaky"} 3.0' in metrics


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x"}, "model"),
    ({"model": "nope", "prompt": "x"}, "model"),
    ({"model": "textgen", "prompt": ["a", "b"]}, "prompt"),
    ({"model": "textgen", "prompt": "x", "n": 2}, "n"),
    ({"model": "textgen", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "textgen", "prompt": "x", "temperature": 9}, "temperature"),
    ({"model": "textgen", "prompt": "x", "stop": ["a"] * 5}, "stop"),
    ({"model": "textgen", "prompt": "x", "logprobs": 2}, "logprobs"),
    ({"model": "textgen", "prompt": "x", "stream": "yes"}, "stream"),
    ({"model": "textgen", "prompt": "x", "stream_options": {"include_usage": True}},
     "stream_options"),
])
async def test_bad_completions_are_400s_in_openais_shape(make_gateway: Any, body: dict,
                                                         param: str) -> None:
    _, client, _ = await make_gateway({"textgen": (TextGenerator, 1)})
    r = await client.post("/v1/completions", json=body)
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err


@pytest.mark.parametrize("messages", [[], "hi", [{"role": "robot", "content": "x"}],
                                      [{"role": "user", "content": 3}]])
async def test_bad_chat_messages_are_400s(make_gateway: Any, messages: Any) -> None:
    _, client, _ = await make_gateway({"textgen": (TextGenerator, 1)})
    r = await client.post("/v1/chat/completions", json={"model": "textgen",
                                                        "messages": messages})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
