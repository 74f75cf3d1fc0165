"""The chaos harness itself works: the fault proxy, the chaos service, the open-loop load
generator, and a real chaos gateway with proxies in front of its replicas."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiohttp import web

from steadyserve.errors import ReplicaUnavailable
from steadyserve.testing.load import (
    LoadResult,
    RequestRecord,
    is_ok,
    is_rejection,
    priority_is,
    run_load,
    sleep_until,
)

from .harness import FAULTPROXY, REPO_ROOT, sum_samples, write_json_atomic
from .proxied import start_proxy, stop_process
from .services import ServiceControl, Work

pytestmark = [pytest.mark.timeout(20)]

APPLY_S = 0.2  # > the proxy's 50 ms control poll, with room for a busy machine


# a tiny echo server and a proxy in front of it ------------------------------------------------
@dataclass
class Echo:
    port: int
    received: list[bytes] = field(default_factory=list)  # one entry per chunk read


@dataclass
class Proxied:
    port: int
    control: Path
    proc: asyncio.subprocess.Process

    async def set(self, **faults: Any) -> None:
        write_json_atomic(self.control, faults)
        await asyncio.sleep(APPLY_S)


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    state = Echo(0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                state.received.append(data)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    yield state
    server.close()


@pytest.fixture
async def proxy(echo: Echo, tmp_path: Path) -> AsyncIterator[Proxied]:
    control = tmp_path / "proxy.json"
    proc, port = await start_proxy(echo.port, control, tmp_path / "proxy.port")
    yield Proxied(port, control, proc)
    await stop_process(proc)
    assert proc.returncode is not None


async def roundtrip(port: int, payload: bytes = b"ping", timeout_s: float = 2.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(payload)), timeout_s)
    finally:
        writer.close()


# the fault proxy ----------------------------------------------------------------------------------
async def test_proxy_forwards_both_ways(proxy: Proxied, echo: Echo) -> None:
    assert await roundtrip(proxy.port, b"hello") == b"hello"
    big = os.urandom(300_000)
    assert await roundtrip(proxy.port, big) == big
    # half-close travels through: the echo server sees EOF and closes, so do we
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"last words")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 2) == b"last words"
    writer.close()


async def test_latency_is_added_each_way(proxy: Proxied) -> None:
    t = time.monotonic()
    await roundtrip(proxy.port)
    base = time.monotonic() - t
    await proxy.set(latency_s=0.15)
    t = time.monotonic()
    await roundtrip(proxy.port)
    slow = time.monotonic() - t
    assert 0.3 <= slow < 0.3 + base + 0.4, (base, slow)
    await proxy.set()
    t = time.monotonic()
    await roundtrip(proxy.port)
    assert time.monotonic() - t < 0.15


async def test_latency_is_a_delay_line_not_a_throughput_cap(proxy: Proxied) -> None:
    await proxy.set(latency_s=0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    t = time.monotonic()
    for i in range(10):  # ten chunks in a row arrive 0.4 s later, not 10 × 0.4 s later
        writer.write(b"%d;" % i)
        await writer.drain()
        await asyncio.sleep(0.01)
    got = b""
    while got.count(b";") < 10:
        got += await asyncio.wait_for(reader.read(100), 2)
    assert got == b"".join(b"%d;" % i for i in range(10))
    assert time.monotonic() - t < 1.0
    writer.close()


async def test_blackhole_stalls_existing_and_silences_new_connections(proxy: Proxied, echo: Echo) -> None:
    r_old, w_old = await asyncio.open_connection("127.0.0.1", proxy.port)
    w_old.write(b"a")
    assert await asyncio.wait_for(r_old.readexactly(1), 2) == b"a"
    await proxy.set(blackhole=True)
    seen = len(echo.received)
    w_old.write(b"b")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(r_old.readexactly(1), 0.5)
    r_new, w_new = await asyncio.open_connection("127.0.0.1", proxy.port)  # accepted…
    w_new.write(b"c")
    with pytest.raises(TimeoutError):  # …but never answered
        await asyncio.wait_for(r_new.readexactly(1), 0.5)
    assert len(echo.received) == seen  # nothing reached the server either
    await proxy.set()
    # the stalled connection flows again (held, not dropped); the silenced one stays silent
    assert await asyncio.wait_for(r_old.readexactly(1), 2) == b"b"
    w_new.write(b"d")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(r_new.readexactly(1), 0.5)
    assert await roundtrip(proxy.port, b"fresh") == b"fresh"
    w_old.close()
    w_new.close()


async def test_reset_fraction_one_resets_every_new_connection(proxy: Proxied) -> None:
    r_old, w_old = await asyncio.open_connection("127.0.0.1", proxy.port)
    await proxy.set(reset_fraction=1.0)
    for _ in range(5):
        # the RST may even beat the client's own connect completion
        with pytest.raises(ConnectionResetError):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            try:
                writer.write(b"x")
                await writer.drain()
                await asyncio.wait_for(reader.read(1), 2)
            finally:
                writer.close()
    w_old.write(b"still")  # connections made before keep working
    assert await asyncio.wait_for(r_old.readexactly(5), 2) == b"still"
    w_old.close()
    await proxy.set()
    assert await roundtrip(proxy.port) == b"ping"


async def test_reset_midstream_forwards_the_request_and_loses_the_reply(proxy: Proxied, echo: Echo) -> None:
    await proxy.set(reset_midstream_fraction=1.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"request-1")
    with pytest.raises(ConnectionResetError):
        data = await asyncio.wait_for(reader.read(100), 2)
        assert data == b"", data  # reached only if no RST: fail with what came back
    writer.close()
    assert b"".join(echo.received) == b"request-1"  # the server did get (and answer) it
    await proxy.set(reset_midstream_fraction=0.0)
    assert await roundtrip(proxy.port) == b"ping"


async def test_bandwidth_limit(proxy: Proxied) -> None:
    await proxy.set(bandwidth_bytes_per_s=200_000)
    payload = os.urandom(100_000)
    t = time.monotonic()
    assert await roundtrip(proxy.port, payload, timeout_s=5) == payload
    assert 0.4 <= time.monotonic() - t < 3.0


async def test_bad_control_file_keeps_the_previous_faults(proxy: Proxied) -> None:
    await proxy.set(latency_s=0.2)
    proxy.control.write_text("{not json")
    await asyncio.sleep(APPLY_S)
    t = time.monotonic()
    await roundtrip(proxy.port)
    assert time.monotonic() - t >= 0.4


async def test_proxy_exits_on_sigterm(proxy: Proxied) -> None:
    proxy.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proxy.proc.wait(), 5) == 0


def test_proxy_exits_when_its_parent_dies(tmp_path: Path) -> None:
    pid_file = tmp_path / "proxy.pid"
    parent = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, {FAULTPROXY!r}, '--target-port', '9',"
        f" '--port-file', {str(tmp_path / 'port')!r}, '--control', {str(tmp_path / 'c.json')!r}])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(1.0)\n"
    )
    subprocess.run([sys.executable, "-c", parent], check=True, timeout=10)
    child = psutil.Process(int(pid_file.read_text()))
    try:
        child.wait(timeout=5)
    except psutil.TimeoutExpired:
        child.kill()  # our own grandchild, by pid
        pytest.fail("the proxy outlived its parent")


# the chaos service -----------------------------------------------------------------------------
def test_service_flags_are_read_from_the_control_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CHAOS_CONTROL_DIR", str(tmp_path))
    monkeypatch.setenv("STEADYSERVE_REPLICA_ID", "work-7")
    svc = Work()
    svc.setup()
    t = time.monotonic()
    assert svc.work("a") == {"x": "a", "replica": "work-7"}
    assert 0.018 <= time.monotonic() - t < 0.2
    control = tmp_path / "service-work-7.json"
    write_json_atomic(control, {"fail_500": True})
    with pytest.raises(RuntimeError):
        svc.work("b")
    write_json_atomic(control, {"fail_503": True})
    with pytest.raises(ReplicaUnavailable) as info:
        svc.work("c")
    assert info.value.status == 503
    write_json_atomic(control, {"delay_s": 0.1})
    t = time.monotonic()
    svc.work("d")
    assert time.monotonic() - t >= 0.11
    control.unlink()
    assert svc.work("e")["x"] == "e"


def test_service_control_rereads_only_on_change(tmp_path: Path) -> None:
    path = tmp_path / "service-x.json"
    ctl = ServiceControl(path)
    assert ctl.current() == {}
    write_json_atomic(path, {"delay_s": 1})
    assert ctl.current() == {"delay_s": 1}
    key = ctl._key
    assert ctl.current() == {"delay_s": 1} and ctl._key == key
    write_json_atomic(path, {"delay_s": 2})
    assert ctl.current() == {"delay_s": 2}


def test_poison_crashes_the_process() -> None:
    code = ("from tests.chaos.services import Work\n"
            "w = Work(); w.setup(); w.work('poison')\n"
            "raise SystemExit(0)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, timeout=15)
    assert proc.returncode == 1


# the load generator ----------------------------------------------------------------------------
@dataclass
class SlowServer:
    url: str
    in_flight: int = 0
    max_in_flight: int = 0
    served: int = 0


@pytest.fixture
async def slow_server() -> AsyncIterator[SlowServer]:
    state = SlowServer("")
    release = asyncio.Event()  # set at teardown: no handler outlives the test

    async def work(request: web.Request) -> web.Response:
        body = await request.json()
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(release.wait(), float(request.query.get("sleep", "0.2")))
        finally:
            state.in_flight -= 1
        state.served += 1
        return web.json_response({"x": body["x"], "replica": f"r{int(body['x'].split('-')[1]) % 2}"})

    app = web.Application()
    app.router.add_post("/work", work)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state.url = f"http://127.0.0.1:{port}/work"
    yield state
    release.set()
    for _ in range(100):  # bounded: at most 1 s for the released handlers to finish
        if state.in_flight == 0:
            break
        await asyncio.sleep(0.01)
    await runner.cleanup()


async def test_load_is_open_loop_against_a_slow_server(slow_server: SlowServer) -> None:
    result = await run_load(slow_server.url, 50, 2.0, body_fn=lambda i: {"x": f"req-{i}"})
    print(result.report())
    assert result.total == 100 and result.sent == 100
    assert result.success_rate() == 1.0
    assert result.max_send_lag_s() < 0.1  # every request left on schedule
    sends = sorted(r.sent_s for r in result.records if r.sent_s is not None)
    assert sends[-1] - sends[0] == pytest.approx(1.98, abs=0.1)
    assert slow_server.max_in_flight >= 8  # 50/s × 0.2 s ≈ 10 concurrent, not 1 per connection
    p50 = result.p50()
    assert p50 is not None and 0.19 <= p50 < 0.35
    assert set(result.replica_share()) == {"r0", "r1"}


async def test_load_keeps_its_schedule_when_the_server_never_answers(slow_server: SlowServer) -> None:
    url = slow_server.url + "?sleep=30"
    result = await run_load(url, 40, 1.0, body_fn=lambda i: {"x": f"req-{i}"}, timeout_s=0.5)
    assert result.sent == 40 and result.success_rate() == 0.0
    assert result.errors() == {"TimeoutError": 40}
    assert result.max_send_lag_s() < 0.1
    assert result.wall_s < 2.0


async def test_load_runs_beside_an_injector_and_caps_in_flight(slow_server: SlowServer) -> None:
    t0 = time.monotonic() + 0.05
    marks: list[float] = []

    async def injector() -> None:
        await sleep_until(t0, 0.5)
        marks.append(time.monotonic() - t0)

    result, _ = await asyncio.gather(
        run_load(slow_server.url, 40, 1.0, body_fn=lambda i: {"x": f"req-{i}"}, t0=t0,
                 max_in_flight=4, headers_fn=lambda i: {"X-Priority": "batch" if i % 2 else "online"}),
        injector(),
    )
    assert marks and marks[0] == pytest.approx(0.5, abs=0.05)
    assert result.errors()["InFlightLimit"] > 0 and result.sent <= 40
    assert {r.priority for r in result.records} == {"batch", "online"}
    assert result.select(priority_is("batch"))[0].index % 2 == 1


def test_load_result_figures() -> None:
    def rec(i: float, status: int | None, lat: float, replica: str | None = None,
            error: str | None = None, prio: str = "online") -> RequestRecord:
        return RequestRecord(int(i * 10), i, i, i + lat, status, error, replica,
                             headers={"retry-after": "1"} if status == 503 else {},
                             request_headers={"X-Priority": prio})

    records = [rec(i / 10, 200, 0.01 * (i + 1), f"r{i % 2}") for i in range(8)]
    records += [rec(0.8, 503, 0.001, prio="batch"), rec(0.9, None, 5.0, error="TimeoutError")]
    result = LoadResult("http://x", 10, 1.0, 0.0, records, wall_s=5.9)
    assert result.success_rate() == 0.8
    assert result.errors() == {"http_503": 1, "TimeoutError": 1}
    assert result.p50(is_ok) == pytest.approx(0.04)
    assert result.p99(is_ok) == pytest.approx(0.08)
    assert result.p99(is_rejection) == pytest.approx(0.001)
    assert result.p99() == pytest.approx(5.0)
    assert result.success_rate(priority_is("batch")) == 0.0
    assert result.replica_share() == {"r0": 0.5, "r1": 0.5}
    assert result.replica_share(0.0, 0.15) == {"r0": 0.5, "r1": 0.5}
    assert result.replica_share(0.0, 0.05) == {"r0": 1.0}
    assert result.goodput_per_s(0.0, 1.0) == 8.0
    assert result.goodput_series()[0] == 8.0
    text = result.report()
    for needle in ("80.00%", "http_503=1", "TimeoutError=1", "Retry-After", "priority batch",
                   "r0=50.0%"):
        assert needle in text, text


# the chaos gateway ---------------------------------------------------------------------------
@pytest.mark.slow
async def test_smoke_three_replicas_all_serve_through_their_proxies(chaos_gateway) -> None:
    chaos = chaos_gateway(replicas=3)
    replicas = await chaos.replicas()
    assert [r["state"] for r in replicas] == ["ready"] * 3
    for r in replicas:  # the gateway's address for each replica is its proxy's port
        proxy_pid = chaos.proxy_pid(r["id"])
        assert proxy_pid is not None
        listening = {c.laddr.port for c in psutil.Process(proxy_pid).net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN}
        assert int(r["address"].rsplit(":", 1)[1]) in listening
    result = await run_load(chaos.work_url(), 30, 5.0, body_fn=lambda i: {"x": f"req-{i}"})
    print(result.report())
    assert result.success_rate() == 1.0, result.report()
    assert all(r.replica is not None for r in result.records)
    share = result.replica_share()
    assert set(share) == {"work-0", "work-1", "work-2"}, share
    assert await chaos.metric("steadyserve_requests_total", deployment="work") >= 150
    assert chaos.gateway_rss_bytes() > 0


@pytest.mark.slow
async def test_faults_reach_through_the_gateway(chaos_gateway) -> None:
    chaos = chaos_gateway(replicas=2)
    url = chaos.work_url()
    for rid in ("work-0", "work-1"):
        chaos.set_proxy(rid, latency_s=0.2)
    await asyncio.sleep(APPLY_S)
    slow = await run_load(url, 5, 1.0, body_fn=lambda i: {"x": f"slow-{i}"})
    assert slow.success_rate() == 1.0, slow.report()
    assert (slow.p50() or 0) >= 0.4, slow.report()
    chaos.clear_faults()
    for rid in ("work-0", "work-1"):
        chaos.set_service(rid, fail_500=True)
    await asyncio.sleep(APPLY_S)
    failing = await run_load(url, 5, 1.0, body_fn=lambda i: {"x": f"fail-{i}"})
    assert failing.success_rate() == 0.0 and all((r.status or 0) >= 500 for r in failing.records)
    chaos.clear_faults()
    fast = await run_load(url, 10, 1.0, body_fn=lambda i: {"x": f"ok-{i}"})
    assert fast.success_rate() == 1.0 and (fast.p50() or 1) < 0.2, fast.report()


@pytest.mark.slow
async def test_killed_replica_is_restarted_with_a_fresh_proxy(chaos_gateway) -> None:
    chaos = chaos_gateway(replicas=2)
    old_replica = chaos.replica_pid("work-0")
    old_proxy = chaos.proxy_pid("work-0")
    assert old_replica is not None and old_proxy is not None
    assert chaos.kill("work-0", signal.SIGKILL) == old_replica
    old = psutil.Process(old_proxy)
    await asyncio.to_thread(old.wait, 5)  # raises TimeoutExpired if the proxy stays
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r0 = (await chaos.replicas())[0]
        if r0["state"] == "ready" and r0["restarts"] == 1:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail(f"work-0 did not come back: {await chaos.replicas()}")
    assert chaos.replica_pid("work-0") not in (None, old_replica)
    assert chaos.proxy_pid("work-0") not in (None, old_proxy)
    assert len(chaos.proxy_pids()) == 2
    assert await chaos.metric("steadyserve_replica_restarts_total") == 1


def test_sum_samples() -> None:
    text = (
        "# TYPE steadyserve_requests_total counter\n"
        'steadyserve_requests_total{deployment="work",code="2xx"} 3.0\n'
        'steadyserve_requests_total{deployment="work",code="5xx"} 2.0\n'
        'steadyserve_requests_total{deployment="other",code="2xx"} 7.0\n'
    )
    assert sum_samples(text, "steadyserve_requests_total") == 12
    assert sum_samples(text, "steadyserve_requests", deployment="work") == 5
    assert sum_samples(text, "steadyserve_requests_total", code="2xx", deployment="work") == 3
    assert sum_samples(text, "nothing") == 0
