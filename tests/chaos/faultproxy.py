"""A fault-injecting TCP proxy, run as its own process (stdlib only, uvloop when present):

    python -m tests.chaos.faultproxy --target-port P --port-file F --control C

Listens on 127.0.0.1:0, writes its port to F (atomically), forwards every connection to
127.0.0.1:P. Every 50 ms it looks at the JSON file C (missing or empty = no faults; a file
that does not parse keeps the previous faults) with these keys, all optional:

    latency_s                 each chunk is delivered this much later, both ways (a delay
                              line: latency, not a throughput cap; order is kept)
    blackhole                 true: nothing is forwarded in either direction. Existing
                              connections stall (what they read is held, not dropped, and
                              flows again once the blackhole is lifted, like TCP after a
                              partition heals); connections accepted DURING a blackhole are
                              never forwarded nor answered, even after it is lifted (the
                              client sees a silent peer until it gives up)
    reset_fraction            0..1: that share of NEW connections is reset at once (RST:
                              SO_LINGER (1, 0), then close)
    reset_midstream_fraction  0..1: that share of requests gets its connection reset after
                              the request was forwarded, when the reply starts to come back
                              (the upstream did the work, the reply is lost). A "request" is
                              the client→upstream bytes sent after the previous reply
                              started (HTTP/1.1 without pipelining, as the gateway talks)
    bandwidth_bytes_per_s     per direction and connection; 0 = unlimited

Exits on SIGTERM/SIGINT and when its parent dies (PR_SET_PDEATHSIG plus a getppid check).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import random
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, fields
from typing import Any

POLL_S = 0.05
CHUNK = 64 * 1024
Item = tuple[float, bytes] | None  # (deliver at, data); None = end of stream


@dataclass(frozen=True, slots=True)
class Faults:
    latency_s: float = 0.0
    blackhole: bool = False
    reset_fraction: float = 0.0
    reset_midstream_fraction: float = 0.0
    bandwidth_bytes_per_s: float = 0.0

    @classmethod
    def from_json(cls, data: Any) -> Faults:
        if not isinstance(data, dict):
            raise ValueError("control file must hold a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fault keys {unknown}; known: {sorted(known)}")
        return cls(
            latency_s=max(0.0, float(data.get("latency_s", 0.0))),
            blackhole=bool(data.get("blackhole", False)),
            reset_fraction=min(1.0, max(0.0, float(data.get("reset_fraction", 0.0)))),
            reset_midstream_fraction=min(1.0, max(0.0, float(data.get("reset_midstream_fraction", 0.0)))),
            bandwidth_bytes_per_s=max(0.0, float(data.get("bandwidth_bytes_per_s", 0.0))),
        )


def _log(msg: str) -> None:
    print(f"faultproxy[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Proxy:
    def __init__(self, target_port: int, control: str, *, rand: random.Random | None = None) -> None:
        self.target_port = target_port
        self.control = control
        self.faults = Faults()
        self.rand = rand or random.Random()
        self._control_key: tuple[int, int, int] | None = None
        self.conns: set[Conn] = set()
        self.stopping = asyncio.Event()
        self.flowing = asyncio.Event()  # clear while a blackhole is on
        self.flowing.set()

    # control file -------------------------------------------------------------------------
    def poll_control(self) -> None:
        try:
            st = os.stat(self.control)
        except FileNotFoundError:
            if self._control_key is not None:
                self._control_key = None
                self._set(Faults())
                _log("control file gone: no faults")
            return
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        if key == self._control_key:
            return
        try:
            with open(self.control, "rb") as f:
                raw = f.read()
            faults = Faults.from_json(json.loads(raw)) if raw.strip() else Faults()
        except (OSError, ValueError) as exc:  # a half-written file: keep the old faults
            _log(f"ignoring control file: {exc}")
            return
        self._control_key = key
        if faults != self.faults:
            self._set(faults)
            _log(f"faults now {faults}")

    def _set(self, faults: Faults) -> None:
        self.faults = faults
        if faults.blackhole:
            self.flowing.clear()
        else:
            self.flowing.set()

    async def watch(self, parent_pid: int) -> None:
        while not self.stopping.is_set():
            self.poll_control()
            if os.getppid() != parent_pid:
                _log("parent died; exiting")
                self.stopping.set()
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), POLL_S)

    # connections -----------------------------------------------------------------------------
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._handle(reader, writer)
        except asyncio.CancelledError:  # shutdown: a leaf task, nothing to propagate to
            writer.transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        faults = self.faults
        if faults.reset_fraction > 0 and self.rand.random() < faults.reset_fraction:
            reset(writer)
            return
        if faults.blackhole:
            await self._swallow(reader, writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            reset(writer)  # upstream refuses: so do we (the replica is gone)
            return
        conn = Conn(self, reader, writer, up_reader, up_writer)
        self.conns.add(conn)
        try:
            await conn.run()
        finally:
            self.conns.discard(conn)

    async def _swallow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A blackholed new connection: read and drop everything, never answer."""
        try:
            while not self.stopping.is_set():
                if not await reader.read(CHUNK):
                    break
        except OSError:
            pass
        finally:
            writer.transport.abort()


class Conn:
    """One proxied connection: per direction a reader feeding a delay line and a writer."""

    def __init__(self, proxy: Proxy, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter,
                 u_reader: asyncio.StreamReader, u_writer: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.c_reader, self.c_writer = c_reader, c_writer
        self.u_reader, self.u_writer = u_reader, u_writer
        self.awaiting_reply = False  # request bytes went up and no reply byte came back yet
        self.doomed = False  # reset this connection when the reply starts
        self.done = asyncio.Event()

    async def run(self) -> None:
        up_q: asyncio.Queue[Item] = asyncio.Queue(maxsize=64)
        down_q: asyncio.Queue[Item] = asyncio.Queue(maxsize=64)
        tasks = [
            asyncio.create_task(self._read(self.c_reader, up_q, upstream=True)),
            asyncio.create_task(self._write(up_q, self.u_writer)),
            asyncio.create_task(self._read(self.u_reader, down_q, upstream=False)),
            asyncio.create_task(self._write(down_q, self.c_writer)),
        ]
        stop = asyncio.create_task(self.proxy.stopping.wait())
        reset_seen = asyncio.create_task(self.done.wait())
        writers = {tasks[1], tasks[3]}
        pending: set[asyncio.Task[Any]] = {*tasks, stop, reset_seen}
        try:
            # ends when both directions are finished, one side fails, a midstream reset
            # happened, or the proxy stops; at most one pass per task
            for _ in range(len(pending)):
                finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if stop in finished or reset_seen in finished:
                    break
                if any(not t.cancelled() and t.exception() is not None for t in finished):
                    break
                if not writers & pending:
                    break
        finally:
            for t in (*tasks, stop, reset_seen):
                t.cancel()
            await asyncio.gather(*tasks, stop, reset_seen, return_exceptions=True)
            self.c_writer.transport.abort()
            self.u_writer.transport.abort()

    async def _read(self, reader: asyncio.StreamReader, q: asyncio.Queue[Item],
                    *, upstream: bool) -> None:
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                faults = self.proxy.faults
                if upstream:
                    if not self.awaiting_reply:  # the first bytes of a new request
                        self.awaiting_reply = True
                        f = faults.reset_midstream_fraction
                        self.doomed = f > 0 and self.proxy.rand.random() < f
                else:
                    self.awaiting_reply = False
                    if self.doomed:  # the request went up; lose the reply
                        reset(self.c_writer)
                        self.u_writer.transport.abort()
                        self.done.set()
                        return
                await q.put((time.monotonic() + faults.latency_s, data))
        except (OSError, asyncio.IncompleteReadError):
            pass
        await q.put(None)

    async def _write(self, q: asyncio.Queue[Item], writer: asyncio.StreamWriter) -> None:
        next_free = 0.0  # bandwidth: when this direction may send its next byte
        while True:
            item = await q.get()
            if item is None:
                if writer.can_write_eof():
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                return
            deliver_at, data = item
            if not self.proxy.flowing.is_set():
                await self.proxy.flowing.wait()  # blackhole: hold it, stalled, not dropped
            bw = self.proxy.faults.bandwidth_bytes_per_s
            now = time.monotonic()
            if bw > 0:
                # send in slices so a big chunk trickles out instead of bursting at the end
                start = max(now, deliver_at, next_free)
                step = max(1, int(bw * 0.02))
                for i in range(0, len(data), step):
                    piece = data[i:i + step]
                    wait = start - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    writer.write(piece)
                    await writer.drain()
                    start += len(piece) / bw
                next_free = start
                continue
            if deliver_at > now:
                await asyncio.sleep(deliver_at - now)
            writer.write(data)
            await writer.drain()


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _write_port(path: str, port: int) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{port}\n")
    os.replace(tmp, path)


async def amain(args: argparse.Namespace, parent_pid: int) -> int:
    proxy = Proxy(args.target_port, args.control)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, proxy.stopping.set)
    proxy.poll_control()
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    _write_port(args.port_file, port)
    _log(f"127.0.0.1:{port} -> 127.0.0.1:{args.target_port}, control {args.control}")
    watcher = asyncio.create_task(proxy.watch(parent_pid))
    try:
        await proxy.stopping.wait()
    finally:
        watcher.cancel()
        server.close()
        # abort live connections so server.wait_closed() (3.12+) cannot hang
        for conn in list(proxy.conns):
            conn.c_writer.transport.abort()
            conn.u_writer.transport.abort()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="faultproxy")
    parser.add_argument("--target-port", type=int, required=True)
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--control", required=True)
    args = parser.parse_args(argv)
    parent_pid = os.getppid()
    _die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        return 0
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        return runner.run(amain(args, parent_pid))


if __name__ == "__main__":
    sys.exit(main())
