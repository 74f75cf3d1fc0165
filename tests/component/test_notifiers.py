"""observe/notifiers.py against real HTTP receivers on 127.0.0.1 (aiohttp servers on port 0):
exact payloads, retries with backoff, isolation of a dead receiver, the queue bound, the shape a
real Alertmanager accepts, and a delivery loop that survives bugs."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from steadyserve.observe.notifiers import (
    AlertmanagerNotifier,
    DeliveryQueue,
    LogNotifier,
    NotifierError,
    WebhookNotifier,
    webhook_payload,
)

T0 = 1_714_564_800.0
EXTERNAL = "http://gw.test:8000"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Serve = Callable[[str, Handler], Awaitable[str]]


def notification(key: str = "g1", status: str = "firing", **alert_overrides: Any) -> dict[str, Any]:
    alert: dict[str, Any] = {
        "labels": {"alertname": "ReplicaDown", "deployment": "embed"},
        "annotations": {"summary": "a replica stopped answering"},
        "status": status,
        "starts_at": T0,
        "ends_at": T0 + 30 if status == "resolved" else None,
        "fingerprint": "0123abcd",
        "value": 1.0,
        **alert_overrides,
    }
    return {"group_key": key, "group_labels": {"alertname": "ReplicaDown"}, "status": status,
            "alerts": [alert]}


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start an aiohttp app with one POST route on 127.0.0.1:<free port>; returns its base URL."""
    runners: list[web.AppRunner] = []

    async def start(path: str, handler: Handler) -> str:
        app = web.Application()
        app.router.add_post(path, handler)
        runner = web.AppRunner(app, shutdown_timeout=0.5)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


class FastSleep:
    """Records the backoff delays and yields to the loop instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay_s: float) -> None:
        self.delays.append(delay_s)
        await asyncio.sleep(0)


async def wait_until(cond: Callable[[], bool], timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def alert_log() -> tuple[logging.Logger, ListHandler]:
    logger = logging.getLogger(f"test.alerts.{id(object())}")
    handler = ListHandler()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger, handler


async def test_webhook_receives_exactly_the_payload(serve: Serve) -> None:
    received: list[tuple[Any, dict[str, str]]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append((await request.json(), dict(request.headers)))
        return web.Response(text="ok")

    base = await serve("/hook/secret-token", hook)
    notifier = WebhookNotifier(f"{base}/hook/secret-token", timeout_s=2,
                               headers={"Authorization": "Bearer abc"}, external_url=EXTERNAL)
    queue = DeliveryQueue([notifier])
    task = asyncio.create_task(queue.run())
    n = notification()
    queue.submit(n)
    await wait_until(lambda: queue.stats()["webhook"]["delivered"] == 1)
    assert await queue.close(timeout_s=1) == 0
    await task

    (body, headers), = received
    assert body == webhook_payload(n, EXTERNAL)
    assert headers["Content-Type"] == "application/json"
    assert headers["Authorization"] == "Bearer abc"
    assert queue.stats()["webhook"] == {"queued": 0, "delivered": 1, "failed": 0, "dropped": 0,
                                        "retries": 0}
    assert "secret-token" not in repr(notifier)  # the path may be a credential


async def test_fails_twice_then_delivered_on_third_attempt(serve: Serve) -> None:
    attempts: list[Any] = []

    async def flaky(request: web.Request) -> web.Response:
        attempts.append(await request.json())
        if len(attempts) <= 2:
            return web.Response(status=500, text="boom")
        return web.Response(text="ok")

    base = await serve("/hook", flaky)
    sleep = FastSleep()
    queue = DeliveryQueue([WebhookNotifier(f"{base}/hook", external_url=EXTERNAL)],
                          sleep=sleep, rand=lambda: 0.0, backoff_base_s=0.5, backoff_cap_s=60)
    started = time.monotonic()
    task = asyncio.create_task(queue.run())
    queue.submit(notification())
    await wait_until(lambda: queue.stats()["webhook"]["delivered"] == 1)
    elapsed_s = time.monotonic() - started
    await queue.close(timeout_s=1)
    await task

    assert len(attempts) == 3
    assert attempts[0] == attempts[1] == attempts[2]  # the same notification each time
    assert queue.stats()["webhook"] == {"queued": 0, "delivered": 1, "failed": 0, "dropped": 0,
                                        "retries": 2}
    assert sleep.delays == [0.25, 0.5]  # half-jittered exponential: ceiling/2 at rand=0
    assert "500" in (queue.last_errors()["webhook"] or "")
    assert elapsed_s < 1.0


async def test_retry_after_is_honoured(serve: Serve) -> None:
    calls = 0

    async def busy(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return web.Response(status=429, headers={"Retry-After": "7"})
        return web.Response(text="ok")

    base = await serve("/hook", busy)
    sleep = FastSleep()
    queue = DeliveryQueue([WebhookNotifier(f"{base}/hook")], sleep=sleep, rand=lambda: 0.0)
    task = asyncio.create_task(queue.run())
    queue.submit(notification())
    await wait_until(lambda: queue.stats()["webhook"]["delivered"] == 1)
    await queue.close(timeout_s=1)
    await task
    assert sleep.delays == [7.0]


async def test_a_dead_receiver_blocks_neither_submit_nor_the_log(
    serve: Serve, alert_log: tuple[logging.Logger, ListHandler]
) -> None:
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="late")

    base = await serve("/hook", hang)
    logger, records = alert_log
    sleep = FastSleep()
    queue = DeliveryQueue(
        [
            WebhookNotifier(f"{base}/hook", timeout_s=30, name="hanging"),
            WebhookNotifier(f"http://127.0.0.1:{closed_port()}/hook", timeout_s=30, name="refused"),
            LogNotifier(logger),
        ],
        max_attempts=3, sleep=sleep,
    )
    task = asyncio.create_task(queue.run())
    await asyncio.sleep(0)

    started = time.monotonic()
    for i in range(50):
        queue.submit(notification(f"g{i}"))
    assert time.monotonic() - started < 0.05  # submit only appends

    await wait_until(lambda: queue.stats()["log"]["delivered"] == 50, timeout_s=1.0)
    assert time.monotonic() - started < 1.0  # not held up by 30 s timeouts or retries
    assert len(records.records) == 50
    first = records.records[0]
    assert first.levelno == logging.WARNING
    assert first.__dict__["alert_group"] == "g0" and first.__dict__["alert_status"] == "firing"
    assert first.__dict__["alerts"][0]["fingerprint"] == "0123abcd"

    # the refused receiver gives up on each notification after max_attempts
    await wait_until(lambda: queue.stats()["refused"]["failed"] == 50, timeout_s=2.0)
    assert queue.stats()["refused"]["retries"] == 100
    # the hanging one is still stuck on its first notification
    assert queue.stats()["hanging"]["delivered"] == 0
    assert queue.stats()["hanging"]["queued"] == 50

    close_started = time.monotonic()
    abandoned = await queue.close(timeout_s=0.2)
    assert time.monotonic() - close_started < 1.0
    await task
    release.set()
    assert abandoned == 50
    assert queue.stats()["hanging"]["dropped"] == 50
    assert queue.stats()["hanging"]["queued"] == 0


async def test_queue_bound_drops_the_oldest_and_counts(serve: Serve) -> None:
    keys: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        keys.append((await request.json())["groupKey"])
        return web.Response(text="ok")

    base = await serve("/hook", hook)
    queue = DeliveryQueue([WebhookNotifier(f"{base}/hook")], max_queue=3)
    for i in range(5):  # run() not started yet: everything waits in the queue
        queue.submit(notification(f"g{i}"))
    assert queue.stats()["webhook"]["dropped"] == 2
    assert queue.stats()["webhook"]["queued"] == 3

    task = asyncio.create_task(queue.run())
    await wait_until(lambda: queue.stats()["webhook"]["delivered"] == 3)
    assert await queue.close(timeout_s=1) == 0
    await task
    assert keys == ["g2", "g3", "g4"]  # oldest dropped, order kept


_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def _rfc3339(value: Any) -> datetime:
    if not isinstance(value, str) or not value.endswith("Z"):
        raise ValueError(f"not an RFC 3339 UTC time: {value!r}")
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def validate_postable_alerts(body: Any) -> None:
    """What Alertmanager's /api/v2/alerts checks of a postableAlerts body."""
    if not isinstance(body, list):
        raise ValueError("body must be a list")
    for alert in body:
        if not isinstance(alert, dict):
            raise ValueError("alert must be an object")
        unknown = set(alert) - {"labels", "annotations", "startsAt", "endsAt", "generatorURL"}
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}")
        labels = alert.get("labels")
        if not isinstance(labels, dict) or not labels:
            raise ValueError("labels: required, non-empty")
        for mapping in (labels, alert.get("annotations", {})):
            for k, v in mapping.items():
                if not _LABEL_NAME.match(k) or not isinstance(v, str):
                    raise ValueError(f"invalid label or annotation {k!r}: {v!r}")
        starts = _rfc3339(alert["startsAt"]) if "startsAt" in alert else None
        ends = _rfc3339(alert["endsAt"]) if "endsAt" in alert else None
        if starts and ends and ends < starts:
            raise ValueError("endsAt before startsAt")
        if not isinstance(alert.get("generatorURL", ""), str):
            raise ValueError("generatorURL must be a string")


async def test_alertmanager_payload_is_accepted_by_a_fake_alertmanager(serve: Serve) -> None:
    accepted: list[list[dict[str, Any]]] = []

    async def api_v2_alerts(request: web.Request) -> web.Response:
        if request.content_type != "application/json":
            return web.json_response({"message": "need JSON"}, status=415)
        body = await request.json()
        try:
            validate_postable_alerts(body)
        except (ValueError, KeyError) as exc:
            return web.json_response({"code": 400, "message": str(exc)}, status=400)
        accepted.append(body)
        return web.Response(status=200)

    base = await serve("/api/v2/alerts", api_v2_alerts)
    sleep = FastSleep()
    queue = DeliveryQueue(
        [AlertmanagerNotifier(base + "/", generator_url=EXTERNAL + "/alerts"),
         AlertmanagerNotifier(base, name="broken-labels")],
        sleep=sleep,
    )
    task = asyncio.create_task(queue.run())
    queue.submit(notification("g1", "firing"))
    queue.submit(notification("g1", "resolved"))
    await wait_until(lambda: queue.stats()["alertmanager"]["delivered"] == 2)

    assert len(accepted) == 4  # both notifiers' alerts are valid (lanes run concurrently)
    alerts = [body[0] for body in accepted]
    firing = [a for a in alerts if "endsAt" not in a]
    resolved = [a for a in alerts if "endsAt" in a]
    assert len(firing) == len(resolved) == 2
    assert {a["endsAt"] for a in resolved} == {"2024-05-01T12:00:30.000Z"}
    assert {a["generatorURL"] for a in alerts} == {EXTERNAL + "/alerts", ""}

    # the validator is real: a label name Alertmanager refuses gets a 400, which is not retried
    queue.submit(notification("g2", labels={"bad-name": "x"}))
    await wait_until(lambda: queue.stats()["broken-labels"]["failed"] == 1)
    assert queue.stats()["broken-labels"]["retries"] == 0
    assert "400" in (queue.last_errors()["broken-labels"] or "")
    await queue.close(timeout_s=1)
    await task


class Exploding:
    """A notifier with a bug: raises something that is not a NotifierError."""

    name = "exploding"

    def __init__(self) -> None:
        self.calls = 0

    async def send(self, notification: Any, session: aiohttp.ClientSession) -> None:
        self.calls += 1
        if notification["group_key"] == "bad":
            raise RuntimeError("bug")


async def test_the_loop_survives_bugs_and_garbage(serve: Serve) -> None:
    exploding = Exploding()
    queue = DeliveryQueue([exploding, exploding], sleep=FastSleep())  # same name twice
    assert set(queue.stats()) == {"exploding", "exploding#2"}
    task = asyncio.create_task(queue.run())
    queue.submit(notification("bad"))
    queue.submit(None)  # type: ignore[arg-type]  # garbage: fails alone, never raises
    queue.submit(notification("good"))
    await wait_until(lambda: queue.stats()["exploding"]["delivered"] == 1)
    assert queue.stats()["exploding"]["failed"] == 2
    assert queue.stats()["exploding"]["retries"] == 0  # a bug is not retried
    assert not task.done()
    await queue.close(timeout_s=1)
    await task


async def test_close_drains_what_is_queued(serve: Serve) -> None:
    got: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        await asyncio.sleep(0.01)
        got.append((await request.json())["groupKey"])
        return web.Response(text="ok")

    base = await serve("/hook", hook)
    queue = DeliveryQueue([WebhookNotifier(f"{base}/hook")])
    task = asyncio.create_task(queue.run())
    for i in range(5):
        queue.submit(notification(f"g{i}"))
    assert await queue.close(timeout_s=5) == 0
    await task
    assert got == [f"g{i}" for i in range(5)]
    queue.submit(notification("late"))  # after close: counted, not raised
    assert queue.stats()["webhook"]["dropped"] == 1


async def test_cancelling_run_closes_cleanly() -> None:
    queue = DeliveryQueue([LogNotifier(logging.getLogger("test.alerts.cancel"))])
    task = asyncio.create_task(queue.run())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await queue.close(timeout_s=0.1) == 0


def test_notifier_error_says_whether_to_retry() -> None:
    assert NotifierError("x").retryable
    assert not NotifierError("x", retryable=False).retryable
    assert NotifierError("x").status == 502
