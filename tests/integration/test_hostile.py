"""The attacker's table (issue 9), replayed against real `steadyserve run` gateways: every probe
an outside client made, and the behaviour now expected of it, memory included (the gateway's
RSS, and a replica's where the probe reaches it, grows by at most 50 MiB under each flood).

Gateways: one shared by most rows (`echo`, the risk example, a `blame` service; default
limits), one with small edge limits for the timeouts and the connection cap, one restarted
for the silence cap, and a fresh one watched from its first moment for alerts and metrics.
The raw-socket helpers are test_edge.py's, which covers the edge rows in depth.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from steadyserve.gateway.app import ROUTES

from .conftest import ECHO, HERE, Running, start
from .test_edge import (
    RssWatch,
    address,
    assert_edge_error,
    connect,
    parse,
    read_until_closed,
    send_big_head,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(180)]

MiB = 1 << 20
RISK = "steadyserve.examples.risk.service:RiskScorer"
BLAME = f"{HERE / 'services' / 'blame.py'}:Blame"
MAX_GROWTH_MIB = 50  # the bound on RSS growth under one flood
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def stop(gw: Running) -> None:
    """SIGTERM the gateway; kill (by pid) any replica it left behind, then fail on it."""
    leftover = gw.stop(signal.SIGTERM)
    for pid in leftover:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert leftover == [], f"replicas left behind: {leftover}"


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` (0 when none)."""
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and labels.items() <= s.labels.items())


def error_of(r: httpx.Response) -> dict[str, Any]:
    assert r.headers["content-type"].startswith("application/json"), r.text[:200]
    return dict(r.json()["error"])


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """The gateway most rows share. `blame` balances round robin, so a test knows that both
    replicas take requests; automatic responses are off, so no replica is restarted under a
    test by an alert its probes raised."""
    tmp = tmp_path_factory.mktemp("hostile")
    config = tmp / "hostile.toml"
    config.write_text(f"""
data_dir = {toml_str(str(tmp / 'data'))}

[alerting]
actions = {{ReplicaErrors = [], ReplicaCrashLooping = []}}

[deployments.echo]
service = {toml_str(ECHO)}
replicas = 2

[deployments.risk]
service = {toml_str(RISK)}
rollout_env = ["RISK_FEATURE_CACHE_BYTES"]

[deployments.blame]
service = {toml_str(BLAME)}
replicas = 2
balancer = "round_robin"

[deployments.blame.env]
BLAME_LOG = {toml_str(str(tmp / 'blame.log'))}
""")
    running = start(["--config", str(config)], tmp)
    try:
        running.wait_ready(120)  # the risk replica trains its model on a first start
        yield running
    finally:
        stop(running)


# ---- rollouts: nothing from the network becomes code or environment -----------------------------

def test_rollout_probes_are_refused_and_change_nothing(gw: Running, tmp_path: Path) -> None:
    path = "/v1/admin/deployments/risk/rollout"
    pwned = tmp_path / "pwned"
    evil = {"env": {"PYTHONWARNINGS": "ignore::antigravity.x",
                    "BROWSER": f"sh -c 'id > {pwned}' %s"}}
    admin = gw.admin_headers()
    with gw.client() as c:
        before = c.get(path, headers=admin).json()
        pids = set(gw.replica_pids())
        as_text = {"content-type": "text/plain"}

        r = c.post(path, content=json.dumps(evil), headers=as_text)
        assert (r.status_code, error_of(r)["code"]) == (401, "unauthorized")
        r = c.post(path, content=json.dumps(evil), headers={**admin, **as_text})
        assert (r.status_code, error_of(r)["code"]) == (415, "unsupported_media_type")
        r = c.post(path, json=evil, headers={**admin, "origin": "https://evil.example"})
        assert (r.status_code, error_of(r)["code"]) == (403, "forbidden")
        r = c.post(path, json=evil, headers={**admin, "host": "rebind.evil.example:8000"})
        assert (r.status_code, error_of(r)["code"]) == (421, "host_not_allowed")

        r = c.post(path, json=evil, headers=admin)  # the admin key, JSON: still not allowed
        assert r.status_code == 400
        assert error_of(r)["param"] == "env.PYTHONWARNINGS"
        assert "'PYTHONWARNINGS' may not be set by a rollout" in error_of(r)["message"]
        r = c.post(path, json={"service": "/some/file.py:Cls"}, headers=admin)
        assert (r.status_code, error_of(r)["param"]) == (400, "service")

        r = c.post(path, json={"replicas": 1000}, headers=admin)
        assert (r.status_code, error_of(r)["param"]) == (400, "replicas")
        assert f"[0, {before['max_replicas']}]" in error_of(r)["message"]
        r = c.post(path, json={"replicas": 1.5}, headers=admin)
        assert (r.status_code, error_of(r)["param"]) == (400, "replicas")

        time.sleep(1.0)  # a replica the gateway was about to start would be there by now
        after = c.get(path, headers=admin).json()
    keys = ("revision", "state", "target", "good_revision", "previous_revision")
    assert {k: after[k] for k in keys} == {k: before[k] for k in keys}
    assert [x["pid"] for x in after["replicas"]] == [x["pid"] for x in before["replicas"]]
    assert set(gw.replica_pids()) == pids  # no replica started
    assert not pwned.exists()


def test_balancer_and_pool_size_rollouts_take_effect(gw: Running) -> None:
    # an aborted rollout converging back is tests/integration/test_resilience_processes.py::
    # test_a_rollout_failing_at_step_1_converges_back_with_no_failed_request; here only that
    # the two settings a rollout may change besides service, replicas and env are applied
    path = "/v1/admin/deployments/echo/rollout"
    admin = gw.admin_headers()
    with gw.client() as c:
        r = c.post(path, json={"balancer": "round_robin", "max_connections_per_replica": 2},
                   headers=admin)
        assert r.status_code == 202, r.text
        revision = r.json()["revision"]
        deadline = time.monotonic() + 90
        while (got := c.get(path, headers=admin).json())["state"] == "rolling":
            assert time.monotonic() < deadline, got
            time.sleep(0.2)
        assert got["state"] == "done", got
        assert (got["target"]["revision"], got["target"]["balancer"],
                got["target"]["max_connections_per_replica"]) == (revision, "round_robin", 2)
        replicas = gw.status("echo")["replicas"]
        assert {x["revision"] for x in replicas} == {revision} and len(replicas) == 2

        # round robin: consecutive requests alternate between the two replicas
        served = []
        for i in range(6):
            r = c.post("/v1/deployments/echo/echo", json={"text": str(i)})
            assert r.status_code == 200, r.text
            served.append(r.json()["pid"])
        assert len(set(served)) == 2 and all(a != b for a, b in itertools.pairwise(served))

        # at most 2 connections to each replica, however many requests are in flight
        def slow(_: int) -> int:
            with gw.client() as own:
                return own.post("/v1/deployments/echo/slow", json={"seconds": 0.1}).status_code

        most = 0
        with ThreadPoolExecutor(8) as pool:
            calls = [pool.submit(slow, i) for i in range(8)]
            while not all(f.done() for f in calls):
                text = c.get("/metrics").text
                for replica in replicas:
                    most = max(most, int(metric(text, "steadyserve_upstream_connections",
                                                deployment="echo", replica=replica["id"])))
        assert [f.result() for f in calls] == [200] * 8
        text = c.get("/metrics").text  # and the pools they left, kept alive
        most = max(most, *(int(metric(text, "steadyserve_upstream_connections", deployment="echo",
                                      replica=replica["id"])) for replica in replicas))
    print(f"\n  echo rolled to revision {revision}: round robin, at most {most} connections "
          f"to a replica seen under 8 concurrent calls")
    assert 1 <= most <= 2


# ---- the HTTP edge ----------------------------------------------------------------------------

def test_header_floods_get_431_and_the_gateway_stays_small(gw: Running) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Flood: "
    with RssWatch(gw.proc.pid) as rss, ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(
            lambda _: send_big_head(gw, head, b"z" * (512 * 1024), 20 * MiB), range(10)))
    for raw in answers:
        assert_edge_error(raw, 431, "headers_too_large")
    print(f"\n  10 × 20 MB header lines: 431 × 10, gateway RSS +{rss.growth_mib:.1f} MiB")
    assert rss.growth_mib <= MAX_GROWTH_MIB

    sock = connect(gw)
    many = b"".join(b"X-N%d: v\r\n" % i for i in range(10_000))
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + many + b"\r\n")
    assert "max_headers" in assert_edge_error(read_until_closed(sock), 431, "headers_too_large")
    sock.close()
    assert httpx.get(f"{gw.url}/healthz", timeout=10).status_code == 200


def test_websocket_upgrade_is_a_json_4xx_and_logs_no_error(gw: Running) -> None:
    logged = gw.log.stat().st_size
    sock = connect(gw)
    sock.sendall(b"GET /v1/deployments HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\n"
                 b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                 b"Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\n\r\n")
    status, headers, body = parse(read_until_closed(sock))
    sock.close()
    assert 400 <= status < 500 and headers["content-type"] == "application/json"
    assert "upgrade" in json.loads(body)["error"]["message"]
    time.sleep(0.3)  # a log line, if any, reaches the file
    with gw.log.open("rb") as f:
        f.seek(logged)
        for line in f.read().decode().splitlines():
            if line.startswith("{"):
                assert json.loads(line).get("level") not in ("error", "critical"), line


def gzip_bomb(decoded_mib: int) -> bytes:
    """One gzip member of `decoded_mib` MiB of zeros, compressed a MiB at a time."""
    z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(MiB)
    return b"".join([*(z.compress(zeros) for _ in range(decoded_mib)), z.flush()])


def test_encoded_bodies_gzip_served_br_refused_bomb_413(gw: Running) -> None:
    echo = "/v1/deployments/echo/echo"
    json_ct = {"content-type": "application/json"}
    with gw.client() as c:
        z = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        body = z.compress(json.dumps({"text": "zipped " * 1000}).encode()) + z.flush()
        r = c.post(echo, content=body, headers={**json_ct, "content-encoding": "gzip"})
        assert r.status_code == 200, r.text
        assert r.json()["text"] == "zipped " * 1000
        r = c.post(echo, content=b'{"text": "x"}', headers={**json_ct, "content-encoding": "br"})
        assert (r.status_code, error_of(r)["code"]) == (415, "unsupported_media_type")

        bomb = gzip_bomb(256)
        with RssWatch(gw.proc.pid) as rss:
            r = c.post(echo, content=bomb, headers={**json_ct, "content-encoding": "gzip"})
        assert (r.status_code, error_of(r)["code"]) == (413, "payload_too_large")
    print(f"\n  gzip bomb ({len(bomb) / 1024:.0f} KiB → 256 MiB): 413, "
          f"gateway RSS +{rss.growth_mib:.1f} MiB")
    assert rss.growth_mib <= MAX_GROWTH_MIB


def test_a_client_that_writes_a_2_mib_body_before_reading_gets_the_413(gw: Running) -> None:
    seen = []
    for _ in range(10):
        req = urllib.request.Request(f"{gw.url}/v1/deployments/echo/echo", method="POST",
                                     data=b"{" + b" " * (2 * MiB) + b"}",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as answer:
                seen.append(str(answer.status))
        except urllib.error.HTTPError as exc:
            seen.append(f"{exc.code} {json.loads(exc.read())['error']['code']}")
        except OSError as exc:  # a reset or a broken pipe: the answer was lost
            seen.append(repr(exc))
    assert seen == ["413 payload_too_large"] * 10


@pytest.fixture
def small_edge(serve, tmp_path: Path) -> Running:
    """A gateway with small edge limits: 3 s for a head, 2 s for a body, 16 connections, 1 s
    for a client that reads nothing."""
    config = tmp_path / "edge.toml"
    config.write_text("""
[gateway]
header_timeout_s = 3.0
body_timeout_s = 2.0
lingering_close_s = 1.0
max_connections = 16
send_timeout_s = 1.0
""")
    return serve([ECHO, "--replicas", "1", "--config", str(config)])


def test_a_client_that_reads_nothing_is_cut_off_and_leaves_no_socket(small_edge: Running
                                                                      ) -> None:
    # 8 clients each pipeline 300 requests for the OpenAPI document (~25 KB answers) and read
    # nothing: their sockets fill, the gateway's write buffers pass the high-water mark, and
    # send_timeout_s (1 s) later each connection is aborted — it held memory and a file
    # descriptor for ever before (asyncio's close waits for a flush that never comes)
    gw = small_edge
    gateway = psutil.Process(gw.proc.pid)
    size = len(httpx.get(f"{gw.url}/openapi.json", timeout=10).content)
    port = address(gw)[1]

    def client_sockets() -> int:
        # the gateway's sockets on its listening port, the listener aside: the clients'
        # connections. Not its file-descriptor count: files the gateway opens lazily (a log
        # file, a store's connection on first write) are no leak, and twice they made it 22
        return sum(1 for c in gateway.net_connections(kind="tcp")
                   if c.laddr and c.laddr.port == port and c.status != psutil.CONN_LISTEN)

    settle = time.monotonic() + 5  # the probe's keep-alive connection, closed by the client
    while client_sockets() and time.monotonic() < settle:
        time.sleep(0.05)
    held = client_sockets()
    request = b"GET /openapi.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 300
    with RssWatch(gw.proc.pid) as rss:
        socks = []
        for _ in range(8):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(10)
            sock.connect(address(gw))
            sock.sendall(request)
            socks.append(sock)
        holding = 0  # the most seen at once: the count must see them while they are held
        until = time.monotonic() + 4.0  # send_timeout_s, with room for a slow machine
        while time.monotonic() < until:
            holding = max(holding, client_sockets())
            time.sleep(0.05)
        ended = []
        for sock in socks:
            got = 0
            try:
                while chunk := sock.recv(1 << 20):
                    got += len(chunk)
            except ConnectionResetError:
                pass
            sock.close()
            ended.append(got)
    assert all(got < 300 * size for got in ended), (ended, size)
    deadline = time.monotonic() + 5
    while client_sockets() > held and time.monotonic() < deadline:
        time.sleep(0.1)
    print(f"\n  8 clients reading none of 300 × {size // 1024} KiB: cut off, read "
          f"{max(ended) // 1024} KiB at most, client sockets {held} → {holding} held → "
          f"{client_sockets()}, "
          f"RSS +{rss.growth_mib:.1f} MiB")
    assert holding > held, "the gateway's client sockets were not counted while held"
    assert client_sockets() <= held
    assert rss.growth_mib <= MAX_GROWTH_MIB
    assert httpx.get(f"{gw.url}/healthz", timeout=10).status_code == 200


def test_short_bodies_and_slowloris_get_408_and_the_cap_sheds_idle_then_503(small_edge: Running
                                                                           ) -> None:
    gw = small_edge
    post = (b"POST /v1/deployments/echo/echo HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\n")
    stalled = [post + b"Content-Length: 1000\r\n\r\n{\"text\": \"short",
               post + b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"tex\r\n"]

    def stall(request: bytes) -> tuple[bytes, float]:
        # timed from before connecting: the edge's clock may start at the accept, which a
        # clock started after connect() would miss (it measured 1.99997 s, twice)
        started = time.monotonic()
        sock = connect(gw, timeout=30)
        sock.sendall(request)
        raw = read_until_closed(sock)
        sock.close()
        return raw, time.monotonic() - started

    with ThreadPoolExecutor(2) as pool:
        for raw, took in pool.map(stall, stalled):
            assert_edge_error(raw, 408, "request_timeout")
            print(f"\n  a body that stops short: 408 and closed after {took:.2f} s")
            assert 2.0 <= took < 2.0 + 1.0 + 5  # body_timeout_s (+ lingering, + a slow machine)

    # the cap: 16 idle connections, then a newcomer; the oldest idle one makes room silently
    # (lingering and idle connections are closed first, oldest first: a leftover of the
    # probes above would go before ours, never instead of the newcomer)
    time.sleep(0.5)  # the connections above are gone
    idle = []
    for _ in range(16):
        idle.append(connect(gw))
        time.sleep(0.02)  # distinct ages
    with connect(gw) as newcomer:
        newcomer.sendall(HEALTHZ)
        assert parse(newcomer.recv(65536))[0] == 200, "a newcomer at the cap was not served"
    assert read_until_closed(idle[0]) == b"", "the oldest idle connection did not make room"
    for s in idle:
        s.close()

    # slowloris: 16 connections at one header byte a second fill the cap (a newcomer gets
    # 503), and each gets 408 and is closed within header_timeout_s
    time.sleep(0.5)
    slow = [connect(gw) for _ in range(16)]
    trickle = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"s" * 100
    answers = {i: b"" for i in range(len(slow))}
    closed_after: dict[int, float] = {}
    started = time.monotonic()
    for tick in range(20):
        for i, s in enumerate(slow):
            if i in closed_after:
                continue
            s.setblocking(False)
            try:  # read first: never write into a connection the gateway already closed
                while chunk := s.recv(65536):
                    answers[i] += chunk
                closed_after[i] = time.monotonic() - started  # EOF
            except BlockingIOError:
                s.setblocking(True)
                try:
                    s.sendall(trickle[tick:tick + 1])
                except (BrokenPipeError, ConnectionResetError):
                    closed_after[i] = time.monotonic() - started
            except ConnectionResetError:
                closed_after[i] = time.monotonic() - started
        if tick == 0:
            # every connection is in the middle of a head: none is idle, none can make room
            time.sleep(0.5)
            with connect(gw) as late:
                assert "max_connections" in assert_edge_error(read_until_closed(late), 503,
                                                              "overloaded")
        if len(closed_after) == len(slow):
            break
        time.sleep(1.0)
    for s in slow:
        s.close()
    assert len(closed_after) == len(slow), "slowloris connections kept open"
    for raw in answers.values():
        assert_edge_error(raw, 408, "request_timeout")
    print(f"  slowloris × 16 at 1 byte/s: 408, closed after {min(closed_after.values()):.1f}–"
          f"{max(closed_after.values()):.1f} s; a newcomer meanwhile: 503")
    assert 3.0 <= min(closed_after.values())  # header_timeout_s, not an early refusal
    assert max(closed_after.values()) < 3.0 + 1.0 + 5  # header_timeout_s (+ lingering, + slack)
    assert httpx.get(f"{gw.url}/healthz", timeout=10).status_code == 200


# ---- silences ---------------------------------------------------------------------------------

def silence_config(path: Path, data_dir: Path, max_silences: int) -> str:
    path.write_text(f"""
data_dir = {toml_str(str(data_dir))}
[alerting]
max_silences = {max_silences}
""")
    return str(path)


def test_silence_floods_and_bad_silences_are_refused_and_a_restart_keeps_the_cap(
        serve, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    gw = serve([ECHO, "--replicas", "1", "--config",
                silence_config(tmp_path / "five.toml", data_dir, 5)])
    with gw.client(headers=gw.admin_headers()) as c:
        big = {"matchers": {"alertname": "Flood"}, "duration_s": 3600, "comment": "c" * 1_000_000}
        with RssWatch(gw.proc.pid) as rss:
            for _ in range(40):
                r = c.post("/v1/silences", json=big)
                assert (r.status_code, error_of(r)["code"]) == (413, "payload_too_large")
        assert "at most 4096" in error_of(r)["message"]  # max_silence_bytes, not the body limit
        listing = c.get("/v1/alerts")
        assert listing.status_code == 200 and listing.json()["silences"] == []
        print(f"\n  40 × 1 MB silences: 413 × 40, gateway RSS +{rss.growth_mib:.1f} MiB, "
              f"/v1/alerts {len(listing.content)} bytes")
        assert rss.growth_mib <= MAX_GROWTH_MIB and len(listing.content) < 64 * 1024

        for bad, param in (({"matchers": {"": ""}, "duration_s": 3600}, "matchers"),
                           ({"matchers": {}, "duration_s": 3600}, "matchers"),
                           ({"matchers": {"alertname": "X"}, "duration_s": 1e-9}, "duration_s")):
            r = c.post("/v1/silences", json=bad)
            assert (r.status_code, error_of(r)["param"]) == (400, param), bad
        made = []
        for i in range(5):
            r = c.post("/v1/silences", json={"matchers": {"alertname": f"A{i}"}, "duration_s": 3600})
            assert r.status_code == 201, r.text
            made.append(r.json()["id"])
            time.sleep(0.01)  # distinct start times: "the newest" is well defined
        r = c.post("/v1/silences", json={"matchers": {"alertname": "A5"}, "duration_s": 3600})
        assert (r.status_code, error_of(r)["code"]) == (409, "conflict")
    stop(gw)

    again = serve([ECHO, "--replicas", "1", "--config",
                   silence_config(tmp_path / "three.toml", data_dir, 3)])
    with again.client(headers=again.admin_headers()) as c:
        kept = [s["id"] for s in c.get("/v1/alerts").json()["silences"]]
    assert sorted(kept) == sorted(made[2:])  # at most max_silences, the newest


# ---- cache invalidation -----------------------------------------------------------------------

def test_invalidation_floods_are_bounded_on_the_gateway_and_the_replica(gw: Running) -> None:
    path = "/v1/cache/invalidate"
    risk_pid = gw.status("risk")["replicas"][0]["pid"]
    serial = iter(range(10**9))
    with gw.client(headers=gw.admin_headers()) as c:
        with RssWatch(gw.proc.pid) as rss:
            for _ in range(60):
                r = c.post(path, json={"tags": [f"account:{next(serial)}" for _ in range(10_000)]})
                assert (r.status_code, error_of(r)["code"]) == (413, "payload_too_large")
        print(f"\n  60 × 10,000 tags: 413 × 60, gateway RSS +{rss.growth_mib:.1f} MiB")
        assert rss.growth_mib <= MAX_GROWTH_MIB

        with RssWatch(gw.proc.pid) as rss, RssWatch(risk_pid) as replica_rss:
            for _ in range(60):
                r = c.post(path, json={"tags": [f"account:{next(serial)}" for _ in range(1000)]})
                assert r.status_code == 200, r.text
                assert r.json()["replicas"] == {"told": 1, "failed": 0}
        print(f"  60 × 1,000 tags: 200 × 60, gateway RSS +{rss.growth_mib:.1f} MiB, "
              f"risk replica RSS +{replica_rss.growth_mib:.1f} MiB")
        assert rss.growth_mib <= MAX_GROWTH_MIB and replica_rss.growth_mib <= MAX_GROWTH_MIB

        r = c.post(path, json={"tags": ["*"]})
        assert (r.status_code, error_of(r)["param"]) == (400, "tags")
    r = httpx.post(f"{gw.url}{path}", json={"tags": ["account:1"]}, timeout=10)
    assert (r.status_code, error_of(r)["code"]) == (401, "unauthorized")


# ---- blame: a handler's exception is the request's --------------------------------------------

def executions(log: Path) -> dict[str, list[str]]:
    """Input → the replicas that ran it, in order (services/blame.py writes one line per run)."""
    runs: dict[str, list[str]] = {}
    for line in log.read_text().splitlines():
        replica, _, x = line.partition(" ")
        runs.setdefault(x, []).append(replica)
    return runs


def test_a_handler_that_raises_fails_only_its_request_and_is_not_retried(gw: Running) -> None:
    log = gw.data_dir.parent / "blame.log"
    work = "/v1/deployments/blame/work"
    with gw.client() as c:
        before = c.get("/metrics").text
        for i in range(20):
            r = c.post(work, json={"x": f"bad-{i}"})
            assert (r.status_code, error_of(r)["code"]) == (500, "handler_failed")
            r = c.post(work, json={"x": f"good-{i}"})
            assert r.status_code == 200, r.text
        after = c.get("/metrics").text
        served = set()
        for i in range(10):  # good requests keep succeeding, on both replicas
            r = c.post(work, json={"x": f"later-{i}"})
            assert r.status_code == 200, r.text
            served.add(r.json()["replica"])
        assert served == {"blame-0", "blame-1"}
        runs = executions(log)
        assert all(len(runs[f"bad-{i}"]) == 1 for i in range(20)), runs  # executed once each
        for name, labels in (("steadyserve_upstream_retries_total", {}),
                             ("steadyserve_outlier_events_total", {"event": "ejected"})):
            assert metric(after, name, deployment="blame", **labels) \
                == metric(before, name, deployment="blame", **labels), name
        assert metric(after, "steadyserve_upstream_attempts_total", deployment="blame",
                      outcome="handler_error") \
            - metric(before, "steadyserve_upstream_attempts_total", deployment="blame",
                     outcome="handler_error") == 20
        assert not any(x["ejected"] for x in gw.status("blame")["replicas"])

        # RetryableError ("not here, not now") is the replica's: retried on the other one
        before = c.get("/metrics").text
        for i in range(4):
            r = c.post(work, json={"x": f"retry-{i}"})
            assert r.status_code == 200, r.text
            assert r.json()["replica"] == "blame-1"
        after = c.get("/metrics").text
    runs = executions(log)
    first_on_0 = [i for i in range(4) if runs[f"retry-{i}"] == ["blame-0", "blame-1"]]
    assert all(runs[f"retry-{i}"] in (["blame-0", "blame-1"], ["blame-1"]) for i in range(4)), runs
    assert first_on_0, runs  # round robin sent some of them to blame-0 first
    retried = metric(after, "steadyserve_upstream_retries_total", deployment="blame") \
        - metric(before, "steadyserve_upstream_retries_total", deployment="blame")
    assert retried == len(first_on_0)


# ---- access: every admin route, every bad credential --------------------------------------------

ADMIN_ROUTES = [r for r in ROUTES if r.access == "admin"]
PATH_PARAMS = {"deployment": "echo", "silence": "0123456789ab", "key": "nobody",
               "request_id": "0123456789abcdef01234567"}


def test_admin_routes_refuse_no_wrong_revoked_and_infer_only_keys(gw: Running) -> None:
    admin = gw.admin_headers()
    with gw.client() as c:
        made = c.post("/v1/admin/keys", headers=admin, json={"name": "gone", "scopes": ["admin"]})
        assert made.status_code == 201, made.text
        revoked = made.json()["key"]
        assert c.get("/v1/admin/keys", headers={"authorization": f"Bearer {revoked}"}).status_code == 200
        assert c.delete("/v1/admin/keys/gone", headers=admin).status_code == 200
        made = c.post("/v1/admin/keys", headers=admin, json={"name": "web", "scopes": ["infer"]})
        assert made.status_code == 201, made.text
        infer_only = made.json()["key"]
        admin_id = admin["authorization"].split("_")[1]
        try:
            credentials = {
                "none": ({}, 401),
                "not a key": ({"authorization": "Bearer letmein"}, 401),
                "wrong secret": ({"authorization": f"Bearer ss_{admin_id}_{'0' * 64}"}, 401),
                "revoked": ({"authorization": f"Bearer {revoked}"}, 401),
                "infer only": ({"authorization": f"Bearer {infer_only}"}, 403),
            }
            seen = {}
            for route in ADMIN_ROUTES:
                url = route.pattern.format(**PATH_PARAMS)
                for name, (headers, status) in credentials.items():
                    r = c.request(route.method, url, headers=headers,
                                  json={} if route.json_body else None)
                    seen[f"{route.method} {route.pattern} ({name})"] = r.status_code
                    assert r.status_code == status, (route.method, url, name, r.text)
                    assert error_of(r)["code"] == ("unauthorized" if status == 401 else "forbidden")
            print(f"\n  {len(ADMIN_ROUTES)} admin routes × {len(credentials)} bad credentials: "
                  f"{sorted(set(seen.values()))}")
            assert len(ADMIN_ROUTES) >= 10
        finally:  # inference is open on loopback again once no user key is active
            assert c.delete("/v1/admin/keys/web", headers=admin).status_code == 200


# ---- a fresh gateway's alerts, and metrics while a replica is killed again and again ------------

def test_a_fresh_gateway_alerts_nothing_and_killed_replicas_leave_no_series(tmp_path: Path) -> None:
    # tests/integration/test_alerting.py checks both in depth (test_a_fresh_start_polled_on_
    # readyz_raises_no_alert_nor_after_a_restart, test_series_count_stays_constant_while_a_
    # replica_is_killed_again_and_again); this is the table's quick pass
    config = tmp_path / "fresh.toml"
    config.write_text(f"""
data_dir = {toml_str(str(tmp_path / 'data'))}
[supervisor]
restart_base_s = 0.1
restart_cap_s = 0.5
[alerting]
evaluation_interval_s = 0.5
actions = {{ReplicaCrashLooping = []}}
[deployments.echo]
service = {toml_str(ECHO)}
replicas = 2
balancer = "round_robin"
""")
    gw = start(["--config", str(config)], tmp_path)
    try:
        answers: dict[int | None, int] = {}
        deadline = time.monotonic() + 60
        status: int | None = None
        while status != 200:  # a load balancer's probe, from the first moment
            assert time.monotonic() < deadline and gw.proc.poll() is None, gw.log.read_text()[-3000:]
            try:
                status = httpx.get(f"{gw.url}/readyz", timeout=2).status_code
            except httpx.TransportError:
                status = None  # not listening yet
            answers[status] = answers.get(status, 0) + 1
            time.sleep(0.05)
        assert set(answers) <= {None, 503, 200}, answers
        gw.wait_ready(60)
        time.sleep(1.5)  # three evaluations after ready
        with gw.client(headers=gw.admin_headers()) as c:
            alerts = c.get("/v1/alerts").json()
            text = c.get("/metrics").text
        assert [a for a in alerts["alerts"] if a["state"] == "firing"] == []
        assert {a["rule"] for a in alerts["alerts"]} <= {"DeploymentNotReady"}, alerts["alerts"]
        assert {t["rule"] for t in alerts["history"]} <= {"DeploymentNotReady"}, alerts["history"]
        assert 'deployment="-"' not in text
        database_up = [s.value for f in text_string_to_metric_families(text) for s in f.samples
                       if s.name == "steadyserve_database_up"]
        assert database_up in ([], [1.0]), database_up  # not known yet, or up
        print(f"\n  /readyz while starting: {answers}; alerts after: {alerts['alerts']}")

        pids = {gw.proc.pid}
        counts = []
        for _ in range(4):
            victim = gw.status("echo")["replicas"][0]
            pids.add(victim["pid"])
            os.kill(victim["pid"], signal.SIGKILL)
            deadline = time.monotonic() + 60
            while not ((x := gw.status("echo")["replicas"][0])["state"] == "ready"
                       and x["pid"] != victim["pid"]):
                assert time.monotonic() < deadline, gw.log.read_text()[-3000:]
                time.sleep(0.1)
            gw.wait_ready(60)
            pids.update(x["pid"] for x in gw.status("echo")["replicas"])
            with gw.client() as c:
                for i in range(6):  # both replicas serve (round robin): their series exist
                    assert c.post("/v1/deployments/echo/echo", json={"text": str(i)}).status_code == 200
                text = c.get("/metrics").text
            values = {v for f in text_string_to_metric_families(text) for s in f.samples
                      for v in s.labels.values()}
            assert not [v for v in values if "127.0.0.1:" in v or v in {str(p) for p in pids}]
            counts.append(sum(len(f.samples) for f in text_string_to_metric_families(text)))
    finally:
        stop(gw)
    print(f"  series after each of 4 SIGKILLs: {counts}")
    assert counts == [counts[0]] * 4, counts
