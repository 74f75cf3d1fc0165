"""A real `steadyserve run` gateway probed as an attacker would, with raw loopback sockets:
oversized heads, slow and short bodies, idle connections, the connection cap, upgrades,
encoded bodies and zip bombs, early answers to clients that write their whole body first.
The gateway's memory is watched with psutil while it is flooded."""

from __future__ import annotations

import gzip
import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
import zstandard

from .conftest import ECHO, Running, start

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MiB = 1 << 20
EDGE_TOML = """
[gateway]
header_timeout_s = 1.0
body_timeout_s = 1.0
keepalive_timeout_s = 2.0
lingering_close_s = 2.0
max_connections = {max_connections}
"""


def write_config(directory: Path, max_connections: int) -> str:
    path = directory / "edge.toml"
    path.write_text(EDGE_TOML.format(max_connections=max_connections))
    return str(path)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """One gateway for the probes that do not change its limits (each probe cleans up)."""
    tmp = tmp_path_factory.mktemp("edge")
    running = start([ECHO, "--config", write_config(tmp, 256)], tmp)
    try:
        running.wait_ready(60)
        yield running
    finally:
        assert running.stop(signal.SIGTERM) == [], "replicas left behind"


def address(gw: Running) -> tuple[str, int]:
    host, port = gw.url.removeprefix("http://").split(":")
    return host, int(port)


def connect(gw: Running, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(address(gw), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the gateway writes until it closes; a reset after the answer is fine."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete response: {raw[:300]!r}"
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, body


def assert_edge_error(raw: bytes, status: int, code: str) -> str:
    got, headers, body = parse(raw)
    assert got == status, raw[:300]
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    error = json.loads(body[: int(headers["content-length"])])["error"]
    assert error["code"] == code and error["param"] is None
    return str(error["message"])


class RssWatch:
    """The gateway process's peak RSS over a block, sampled every 10 ms."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.baseline = self.proc.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.baseline) / MiB


def send_big_head(gw: Running, head: bytes, filler: bytes, total: int) -> bytes:
    """Write `head` then `total` bytes of `filler` as fast as the gateway takes them, then
    read its answer."""
    sock = connect(gw)
    try:
        try:
            sock.sendall(head)
            sent = 0
            while sent < total:
                sock.sendall(filler)
                sent += len(filler)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the gateway stopped reading after its answer and lingering: expected
        return read_until_closed(sock)
    finally:
        sock.close()


def test_ten_20_mb_header_lines_get_431_and_the_gateway_stays_small(gateway):
    filler = b"a" * (256 * 1024)
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
    with RssWatch(gateway.proc.pid) as rss, ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: send_big_head(gateway, head, filler, 20 * MiB),
                                range(10)))
    for raw in answers:
        assert_edge_error(raw, 431, "headers_too_large")
    print(f"RSS {rss.baseline / MiB:.0f} MiB → peak {rss.peak / MiB:.0f} MiB "
          f"(+{rss.growth_mib:.1f} MiB) under 10 × 20 MB header lines")
    assert rss.growth_mib <= 50
    assert gateway.client().get("/healthz").status_code == 200


def test_long_request_lines_and_too_many_headers_are_refused(gateway):
    sock = connect(gateway)
    sock.sendall(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert "max_request_line_bytes" in assert_edge_error(read_until_closed(sock), 414,
                                                         "uri_too_long")
    sock.close()
    sock = connect(gateway)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 + b"".join(b"X-H%d: 1\r\n" % i for i in range(10_000)) + b"\r\n")
    assert "max_headers" in assert_edge_error(read_until_closed(sock), 431, "headers_too_large")
    sock.close()


@pytest.mark.parametrize("request_bytes", [
    b"POST /v1/deployments/echo/echo HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"text\": ",
    b"POST /v1/deployments/echo/echo HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"t\r\n",
], ids=["short-content-length", "unterminated-chunked"])
def test_a_body_that_stops_short_gets_408_within_body_timeout(gateway, request_bytes):
    sock = connect(gateway)
    started = time.monotonic()
    sock.sendall(request_bytes)
    raw = read_until_closed(sock)
    elapsed = time.monotonic() - started
    sock.close()
    assert_edge_error(raw, 408, "request_timeout")
    assert 0.9 <= elapsed < 1.0 + 2.0 + 1.5  # body_timeout_s, then at most lingering_close_s


def test_slowloris_connections_are_answered_408_and_closed(gateway):
    socks = [connect(gateway) for _ in range(30)]
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
    started = time.monotonic()
    closed_at: dict[int, float] = {}
    answers: dict[int, bytes] = {i: b"" for i in range(len(socks))}
    for s in socks:
        s.setblocking(False)
    sent = 0
    # one byte per connection every 0.2 s, as long as the gateway keeps the connection
    while len(closed_at) < len(socks) and time.monotonic() - started < 8:
        for i, s in enumerate(socks):
            if i in closed_at:
                continue
            try:
                s.send(head[sent % len(head):sent % len(head) + 1])
            except (BrokenPipeError, ConnectionResetError):
                pass
            try:
                while chunk := s.recv(65536):
                    answers[i] += chunk
                closed_at[i] = time.monotonic() - started  # EOF: the gateway closed it
            except BlockingIOError:
                pass
            except ConnectionResetError:
                closed_at[i] = time.monotonic() - started
        sent += 1
        time.sleep(0.2)
    for s in socks:
        s.close()
    assert len(closed_at) == len(socks), "the gateway kept slowloris connections open"
    assert max(closed_at.values()) < 1.0 + 2.0 + 1.5  # header_timeout_s + lingering_close_s
    for raw in answers.values():
        assert_edge_error(raw, 408, "request_timeout")


def test_a_connection_that_never_sends_a_byte_is_closed_after_keepalive_timeout(gateway):
    sock = connect(gateway)
    started = time.monotonic()
    assert read_until_closed(sock) == b""
    assert 1.9 <= time.monotonic() - started < 4
    sock.close()


def test_websocket_upgrade_is_a_json_400_and_no_error_line(gateway):
    sock = connect(gateway)
    sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\n"
                 b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 b"Sec-WebSocket-Version: 13\r\n\r\n")
    message = assert_edge_error(read_until_closed(sock), 400, "invalid_request")
    sock.close()
    assert "websocket" in message
    time.sleep(0.2)  # let the log line, if any, reach the file
    for line in gateway.log.read_text().splitlines():
        if line.startswith("{"):
            assert json.loads(line).get("level") not in ("error", "critical"), line


ENCODE: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress, "deflate": zlib.compress,
    "zstd": zstandard.ZstdCompressor(level=3).compress,
}


def post_echo(gw: Running, body: bytes, headers: dict[str, str]) -> Any:
    with gw.client() as c:
        return c.post("/v1/deployments/echo/echo", content=body,
                      headers={"content-type": "application/json", **headers})


@pytest.mark.parametrize("coding", ENCODE)
def test_encoded_request_bodies_are_decoded(gateway, coding):
    text = "héllo " * 5000
    r = post_echo(gateway, ENCODE[coding](json.dumps({"text": text}).encode()),
                  {"content-encoding": coding})
    assert r.status_code == 200, r.text
    assert r.json()["text"] == text


def test_an_unknown_content_encoding_is_415_naming_it(gateway):
    r = post_echo(gateway, b'{"text": "x"}', {"content-encoding": "br"})
    assert r.status_code == 415
    assert "'br'" in r.json()["error"]["message"]


@pytest.mark.parametrize("coding", ["gzip", "zstd"])
def test_a_zip_bomb_is_413_and_the_gateway_stays_small(gateway, coding):
    zeros = b"\0" * (16 * MiB)
    member = gzip.compress(zeros, 9) if coding == "gzip" else ENCODE["zstd"](zeros)
    bomb = member * 32  # 512 MiB once decoded, well under max_body_bytes as sent
    assert len(bomb) < MiB
    with RssWatch(gateway.proc.pid) as rss:
        r = post_echo(gateway, bomb, {"content-encoding": coding})
    assert r.status_code == 413
    assert "decodes to more than" in r.json()["error"]["message"]
    print(f"RSS +{rss.growth_mib:.1f} MiB under a {coding} bomb of 512 MiB")
    assert rss.growth_mib <= 50


@pytest.mark.parametrize("size_mib", [2, 6])
def test_a_client_writing_its_whole_body_first_reads_the_early_413(gateway, size_mib):
    """urllib sends `Connection: close` and writes its whole body before reading: without a
    lingering close it often got EPIPE/ECONNRESET instead of the answer (2 MiB: sometimes,
    as the loopback buffers can take most of it; 6 MiB: nearly always)."""
    outcomes: dict[str, int] = {}
    for _ in range(10):
        req = urllib.request.Request(f"{gateway.url}/v1/deployments/echo/echo",
                                     data=b"x" * (size_mib * MiB), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=10)
            outcome = "200"
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read())
            outcome = f"{exc.code} {body['error']['code']}"
        except OSError as exc:
            outcome = repr(getattr(exc, "reason", exc))
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes == {"413 payload_too_large": 10}


def test_at_the_cap_the_oldest_idle_connection_goes_then_new_ones_get_503(serve, tmp_path):
    gw = serve([ECHO, "--config", write_config(tmp_path, 8)])
    time.sleep(0.5)  # the readiness polls' connections are gone
    idle = []
    for _ in range(8):
        idle.append(connect(gw))
        time.sleep(0.05)
    newcomer = connect(gw)
    newcomer.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert parse(newcomer.recv(65536))[0] == 200
    assert read_until_closed(idle[0]) == b""  # the longest idle made room, without a word
    # now every connection is busy in the middle of a head: nothing to close, so 503
    for s in [*idle[1:], newcomer]:
        s.sendall(b"GET /healthz HTTP/1.1\r\n")
    late = connect(gw)
    raw = read_until_closed(late)
    assert "max_connections" in assert_edge_error(raw, 503, "overloaded")
    assert parse(raw)[1]["retry-after"] == "1"
    for s in [*idle, newcomer, late]:
        s.close()
