"""Streaming with real processes: a client that hangs up stops the generator (how long
after, in items and milliseconds, is printed); a replica killed mid-stream ends the stream
with an explicit error line and no chunk twice; the official `openai` client streams chat and
completions from the text-generation example unchanged."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from .conftest import HERE, Running

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

STREAMER = str(HERE / "services" / "streamer.py") + ":Streamer"


def produced(gw: Running, tag: str) -> dict:
    r = httpx.post(f"{gw.url}/v1/deployments/streamer/produced_by", json={"tag": tag},
                   timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_client_that_hangs_up_stops_the_generator(serve, tmp_path: Path) -> None:
    gw = serve([STREAMER, "--name", "streamer", "--replicas", "1"])
    results = []
    for attempt in range(5):
        tag = f"leave-{attempt}"
        got = 0
        with httpx.stream("POST", f"{gw.url}/v1/deployments/streamer/count",
                          json={"tag": tag, "delay_s": 0.02}, timeout=30) as r:
            assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
            for line in r.iter_lines():
                assert json.loads(line)["i"] == got
                got += 1
                if got == 10:
                    break
        left_at = time.time()
        deadline = time.monotonic() + 5
        state = produced(gw, tag)
        while state["closed_at"] is None and time.monotonic() < deadline:
            time.sleep(0.05)
            state = produced(gw, tag)
        assert state["closed_at"] is not None, "the generator was never closed"
        after_items = state["produced"] - got
        after_ms = max(0.0, (state["last_at"] - left_at) * 1000)
        results.append((after_items, after_ms, (state["closed_at"] - left_at) * 1000))
        # what the client never read: the ones in its buffers and in flight, plus at most the
        # item in progress; nothing produced 250 ms after it left
        assert after_ms <= 250, results
    print("\n  client hang-up → generator: items produced after (incl. in flight), ms to the "
          "last item, ms to closed: " + "; ".join(f"{i}, {a:.0f}, {c:.0f}" for i, a, c in results))
    metrics = httpx.get(f"{gw.url}/metrics", timeout=10).text
    assert 'steadyserve_streams_open{deployment="streamer"} 0.0' in metrics


def test_a_replica_killed_mid_stream_ends_it_with_an_error_and_no_chunk_twice(
        serve, tmp_path: Path) -> None:
    gw = serve([STREAMER, "--name", "streamer", "--replicas", "2"])
    items = []
    with httpx.stream("POST", f"{gw.url}/v1/deployments/streamer/count",
                      json={"tag": "kill", "n": 200, "delay_s": 0.02}, timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            items.append(json.loads(line))
            if len(items) == 5:
                os.kill(items[0]["pid"], signal.SIGKILL)
    numbered = [x for x in items if "i" in x]
    assert [x["i"] for x in numbered] == list(range(len(numbered)))  # in order, none twice
    assert len({x["pid"] for x in numbered}) == 1  # never continued on another replica
    assert "error" in items[-1] and len(numbered) < 200, items[-3:]
    # the next request is served (by the other replica, then the replacement)
    r = httpx.post(f"{gw.url}/v1/deployments/streamer/count", json={"tag": "after", "n": 3},
                   headers={"accept": "application/json"}, timeout=30)
    assert r.status_code == 200 and [x["i"] for x in r.json()] == [0, 1, 2]


def test_the_openai_client_streams_chat_and_completions(serve, tmp_path: Path) -> None:
    import openai
    gw = serve(["steadyserve.examples.textgen:TextGenerator", "--name", "textgen",
                "--replicas", "1"])
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(
        model="textgen", messages=[{"role": "user", "content": "A class definition"}],
        max_tokens=20, seed=1, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 20, text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20
    assert chunks[-2].choices[0].finish_reason == "length"
    whole = client.chat.completions.create(
        model="textgen", messages=[{"role": "user", "content": "A class definition"}],
        max_tokens=20, seed=1)
    assert whole.choices[0].message.content == text  # the same seed, the same words
    pieces = [c.choices[0].text for c in client.completions.create(
        model="textgen", prompt="The default", max_tokens=10, stream=True)]
    assert len("".join(pieces).split()) == 10
    with pytest.raises(openai.BadRequestError, match="'n' must be 1"):
        client.chat.completions.create(model="textgen", n=2,
                                       messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    print(f"\n  openai client: streamed {len(chunks)} chunks: {text.strip()[:80]}…")
