"""Data-plane workers of one gateway (`[gateway] workers = N`, `--workers N`): the gateway
process keeps the control plane and serves on the port itself; N - 1 worker processes
(gateway.worker) share the port through SO_REUSEPORT, so the kernel spreads connections
over N event loops and the gateway's Python CPU is no longer one core.

This side of gateway.channel: a Unix socket in a private directory (0700) that workers
connect to. It pushes each worker the whole membership when it connects and after every
change (coalesced: at most one message per `PUSH_EVERY_S`), the automatic responses' actions
and invalidations; it takes their reports — demand (added to the autoscaler's), metrics
(summed into /metrics and the alert engine's samples, so both look as with one process),
requests awaiting each replica (the dashboard's count), unreachable replicas, held requests
asking for a replica, invalidations. A second socket in the same directory serves the whole
gateway app for the routes workers forward.

A worker that dies is started again after a backoff; connections it held are reset (the
clients' retries, or a balancer in front, send them again), the others go on.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..auth import usage
from ..config import Config
from ..policies.backoff import Backoff
from .channel import MAX_MESSAGE_BYTES, ChannelClosed, encode, read_message
from .worker import state_message, worker_main

log = logging.getLogger("steadyserve.workers")

PUSH_EVERY_S = 0.05
REPORT_STALE_S = 5.0  # a worker's demand and metrics older than this are left out
MAX_OUTSTANDING_ROWS = 10_000  # replicas one report may count requests for
STOP_TIMEOUT_S = 5.0


@dataclass(slots=True)
class _Worker:
    index: int
    process: Any = None  # multiprocessing.Process
    writer: asyncio.StreamWriter | None = None
    restarts: int = 0
    next_start_at: float = 0.0
    demand: dict[str, float] = field(default_factory=dict)
    metrics: bytes = b""
    outstanding: dict[tuple[str, str], int] = field(default_factory=dict)
    reported_at: float = 0.0


def outstanding_from_wire(rows: Any) -> dict[tuple[str, str], int]:
    """A worker's `outstanding` report (gateway.worker.outstanding_of), checked: at most
    `MAX_OUTSTANDING_ROWS` rows of [deployment, replica, count]; anything else is left out."""
    out: dict[tuple[str, str], int] = {}
    if not isinstance(rows, list):
        return out
    for row in rows[:MAX_OUTSTANDING_ROWS]:
        if isinstance(row, list) and len(row) == 3 and isinstance(row[0], str) \
                and isinstance(row[1], str) and type(row[2]) is int \
                and 0 <= row[2] < 1_000_000_000:
            out[(row[0], row[1])] = row[2]
    return out


class WorkerPool:
    def __init__(self, config: Config, gateway: Any, supervisor: Any,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.gateway = gateway
        self.supervisor = supervisor
        self.clock = clock
        self.workers = [_Worker(i) for i in range(1, config.gateway.workers)]
        self.dir = tempfile.mkdtemp(prefix="steadyserve-")  # 0700: this user only
        self.channel_path = os.path.join(self.dir, "channel.sock")
        self.http_path = os.path.join(self.dir, "http.sock")
        self.backoff = Backoff(base_s=0.5, cap_s=10.0)
        self._dirty = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    # lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Listen on the channel and start the workers (the gateway's port is bound first)."""
        self._server = await asyncio.start_unix_server(self._connected, self.channel_path,
                                                       limit=MAX_MESSAGE_BYTES)
        os.chmod(self.channel_path, 0o600)
        previous = self.gateway.membership.on_change

        def changed(d: Any) -> None:
            if previous is not None:
                previous(d)
            self._dirty.set()

        self.gateway.membership.on_change = changed
        self.gateway.splits.on_change = self._dirty.set  # a canary's split changed
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._push_loop(), name="workers-push"),
                       loop.create_task(self._watch_loop(), name="workers-watch")]

    async def stop(self) -> None:
        """Staged, like replicas: SIGTERM (workers drain), wait, kill. Once: the gateway's
        shutdown calls it, and `steadyserve run` again when the server ends otherwise."""
        if self._stopping:
            return
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for w in self.workers:
            if w.process is not None and w.process.is_alive():
                os.kill(w.process.pid, signal.SIGTERM)  # drains its connections
        deadline = time.monotonic() + STOP_TIMEOUT_S + self.config.gateway.graceful_shutdown_s
        for w in self.workers:
            if w.process is None:
                continue
            await asyncio.to_thread(w.process.join, max(0.1, deadline - time.monotonic()))
            if w.process.is_alive():
                log.warning("worker %d did not stop in time; killing", w.index)
                w.process.kill()
                await asyncio.to_thread(w.process.join, 5)
        if self._server is not None:
            self._server.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _spawn(self, w: _Worker) -> None:
        ctx = multiprocessing.get_context("spawn")
        w.process = ctx.Process(
            target=worker_main, name=f"steadyserve-worker-{w.index}", daemon=False,
            args=(self.config, w.index, self.channel_path, self.http_path, os.getpid()))
        w.process.start()
        log.info("started worker %d", w.index, extra={"worker": w.index, "pid": w.process.pid})

    async def _watch_loop(self) -> None:
        """Start each worker, and again (after a backoff) when it exits."""
        while True:
            try:
                now = self.clock()
                for w in self.workers:
                    if w.process is None:
                        if now >= w.next_start_at:
                            self._spawn(w)
                    elif not w.process.is_alive():
                        code = w.process.exitcode
                        w.process = None
                        w.restarts += 1
                        delay = self.backoff.delay(w.restarts, 0.5)  # capped by cap_s
                        w.next_start_at = now + delay
                        log.error("worker %d exited with %s; starting it again in %.1fs",
                                  w.index, code, delay, extra={"worker": w.index})
                self.gateway.metrics.workers_alive.set(
                    1 + sum(1 for w in self.workers if w.process is not None))
            except Exception:
                log.exception("worker watch failed; continuing")
            await asyncio.sleep(0.2)

    # the channel -----------------------------------------------------------------------------------
    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        worker: _Worker | None = None
        try:
            hello = await asyncio.wait_for(read_message(reader), 10)
            index = hello.get("worker")
            worker = next((w for w in self.workers if w.index == index), None)
            if hello["t"] != "hello" or worker is None:
                raise ChannelClosed(f"not a worker of this gateway: {hello!r:.80}")
            if worker.writer is not None:
                worker.writer.close()
            worker.writer = writer
            writer.write(self._state())
            while True:
                self._handle(worker, await read_message(reader))
        except (ChannelClosed, OSError, TimeoutError) as exc:
            if not self._stopping:
                log.warning("worker channel closed: %s", exc)
        except Exception:
            log.exception("worker channel failed")
        finally:
            if worker is not None and worker.writer is writer:
                worker.writer = None
            writer.close()

    def _state(self) -> bytes:
        infos = {s.replica_id: s.info for s in self.supervisor.slots if getattr(s, "info", None)}
        return state_message(self.gateway.membership, infos, self.supervisor.start_failures,
                             self.gateway.splits.to_wire())

    async def _push_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                message = self._state()
                for w in self.workers:
                    if w.writer is not None and not w.writer.is_closing():
                        w.writer.write(message)
            except Exception:
                log.exception("membership push failed; continuing")
            await asyncio.sleep(PUSH_EVERY_S)

    def broadcast(self, message: dict[str, Any], *, but: int | None = None) -> None:
        data = encode(message)
        for w in self.workers:
            if w.index != but and w.writer is not None and not w.writer.is_closing():
                w.writer.write(data)

    def _handle(self, w: _Worker, message: dict[str, Any]) -> None:
        kind = message["t"]
        if kind == "report":
            demand = message.get("demand")
            metrics = message.get("metrics")
            if isinstance(demand, dict):
                w.demand = {str(k): float(v) for k, v in demand.items()
                            if isinstance(v, int | float) and v >= 0}
            if isinstance(metrics, str):
                w.metrics = metrics.encode()
            w.outstanding = outstanding_from_wire(message.get("outstanding"))
            self.gateway.usage.merge(usage.from_wire(message.get("usage"),
                                                     self.gateway.usage.max_entries))
            if self.gateway.recorder is not None:
                self.gateway.recorder.merge(message.get("records"))
            if self.gateway.canaries is not None:
                self.gateway.canaries.merge(message.get("canary"))
            w.reported_at = self.clock()
        elif kind == "unavailable":
            d = self.gateway.membership.get(str(message.get("deployment")))
            endpoint = next((e for e in d.endpoints if e.replica_id == message.get("replica")),
                            None) if d is not None else None
            if d is not None and endpoint is not None:
                self.supervisor.report_unavailable(d.name, endpoint)
        elif kind == "activate":
            name = str(message.get("deployment"))
            if name in self.gateway.membership.deployments:
                held = message.get("held")
                self.supervisor.autoscaler.activate(
                    name, float(held) if isinstance(held, int) and 0 < held < 1_000_000 else 1.0)
                self._dirty.set()  # start failures travel with the state
        elif kind == "invalidated":
            tags = [str(t) for t in message.get("tags", [])][:10_000]
            if self.gateway.cache is not None:
                self.gateway.cache.drop_local(tags)
            self.broadcast({"t": "invalidate", "tags": tags}, but=w.index)
        else:
            log.warning("unknown worker message %r ignored", kind[:40])

    # what the rest of the gateway process reads ---------------------------------------------------
    def _fresh(self) -> list[_Worker]:
        oldest = self.clock() - REPORT_STALE_S
        return [w for w in self.workers if w.writer is not None and w.reported_at >= oldest]

    def demand(self, deployment: str) -> float:
        """The workers' reported demand of a deployment (their last time-weighted sample)."""
        return sum(w.demand.get(deployment, 0.0) for w in self._fresh())

    def outstanding(self) -> dict[tuple[str, str], int]:
        """{(deployment, replica): requests} the workers await, summed over their last
        reports (each about a second old)."""
        out: dict[tuple[str, str], int] = {}
        for w in self._fresh():
            for key, n in w.outstanding.items():
                out[key] = out.get(key, 0) + n
        return out

    def metric_texts(self) -> list[bytes]:
        return [w.metrics for w in self._fresh() if w.metrics]

    def status(self) -> list[dict[str, Any]]:
        return [{"worker": w.index, "pid": w.process.pid if w.process is not None else None,
                 "connected": w.writer is not None, "restarts": w.restarts}
                for w in self.workers]
