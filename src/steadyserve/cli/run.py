"""`steadyserve run`: build the config, start the gateway (which starts the replicas), show
progress while replicas load, print the URL and a curl line, stop everything on Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import socket
import sys
import time
from typing import Any, TextIO

import orjson

from .. import __version__
from ..config import Config
from ..control.launcher import LocalLauncher, torch_threads, usable_cores
from ..control.supervisor import Supervisor
from ..errors import ConfigError
from ..gateway.app import Gateway
from ..gateway.assemble import build_gateway, join_workers
from ..gateway.edge import server_config
from ..gateway.workers import WorkerPool
from ..netutil import reuseport_socket, unix_listener
from ..observe.logs import configure_logging
from ..process import event_loop_runner, freeze_startup_heap
from ..settings import load_config
from . import exit_codes

log = logging.getLogger("steadyserve.cli")

_EXAMPLE_VALUES = {"str": "hello world", "int": 1, "float": 1.0, "bool": True, "dict": {}}


def example_curl(config: Config, gateway: Gateway) -> str:
    """A ready-to-paste curl line for the first deployment."""
    host = config.gateway.host if config.gateway.host not in ("0.0.0.0", "::") else "127.0.0.1"
    base = f"{host}:{config.gateway.port}"
    d = next(iter(gateway.membership.deployments.values()))
    emb = d.openai_handler("embeddings")
    if emb is not None:
        body: Any = {"model": d.name, "input": ["hello world", "a second text"]}
        path = "/v1/embeddings"
    elif d.handlers:
        h = next(iter(d.handlers.values()))
        body = {}
        for p in h.spec.params:
            kind = p["type"]["kind"]
            item = p["type"].get("item", {}).get("kind", "str")
            body[p["name"]] = [_EXAMPLE_VALUES.get(item, "x")] if kind == "list" else \
                _EXAMPLE_VALUES.get(kind, "x")
        path = f"/v1/deployments/{d.name}/{h.name}"
    else:
        return f"curl -s {base}/v1/deployments"
    data = shlex.quote(orjson.dumps(body).decode())
    return f"curl -s {base}{path} -H 'content-type: application/json' -d {data}"


async def show_progress(config: Config, gateway: Gateway, supervisor: Supervisor,
                        out: TextIO, started: float) -> None:
    """Redraw one status line while replicas load (plain lines when not a terminal)."""
    tty = out.isatty()
    last = ""
    while True:
        counts = supervisor.counts()
        parts = []
        for name, by_state in counts.items():
            total = sum(by_state.values())
            ready = by_state["ready"]
            bar = "█" * ready + "░" * (total - ready)
            parts.append(f"{name} [{bar}] {ready}/{total} ready")
        line = "  " + "   ".join(parts) + f"   {time.monotonic() - started:4.1f}s"
        all_ready = gateway.membership.readiness()[0]
        if tty:
            out.write("\r" + line + "\033[K")
            out.flush()
        elif line.split("   ")[:-1] != last.split("   ")[:-1]:
            out.write(line + "\n")
            out.flush()
        last = line
        if all_ready:
            break
        await asyncio.sleep(0.25)
    url = f"http://{config.gateway.host}:{config.gateway.port}"
    out.write(("\n" if tty else "") +
              f"ready in {time.monotonic() - started:.1f}s: serving on {url}\n"
              f"  try:   {example_curl(config, gateway)}\n"
              f"  docs:  {url}/v1/deployments   metrics: {url}/metrics   Ctrl-C stops\n")
    out.flush()


async def serve(config: Config, out: TextIO = sys.stderr, launcher: LocalLauncher | None = None) -> int:
    import uvicorn

    started = time.monotonic()
    gateway, supervisor = build_gateway(config, launcher)
    problem = gateway.prepare()  # the local admin key; refuse an exposed listener with no keys
    if problem is not None:
        print(f"steadyserve: {problem}", file=out)
        return exit_codes.CONFIG
    server = uvicorn.Server(server_config(gateway, config.gateway))
    freeze_startup_heap()
    progress: asyncio.Task[None] | None = None
    pool: WorkerPool | None = None
    sockets: list[socket.socket] | None = None
    if config.gateway.workers > 1:
        # every process binds the port with SO_REUSEPORT; the routes workers forward come
        # in on a private Unix socket
        pool = WorkerPool(config, gateway, supervisor)
        join_workers(gateway, supervisor, pool)
        try:
            sockets = [reuseport_socket(config.gateway.host, config.gateway.port),
                       unix_listener(pool.http_path)]
        except OSError as exc:
            print(f"steadyserve: cannot listen on {config.gateway.host}:{config.gateway.port}: "
                  f"{exc}", file=out)
            return exit_codes.FAILURE

    async def watch() -> None:
        nonlocal progress
        while not server.started and not server.should_exit:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if server.started:
            if pool is not None:
                await pool.start()
            progress = asyncio.create_task(show_progress(config, gateway, supervisor, out, started))

    watcher = asyncio.create_task(watch())  # uvicorn offers no "started" hook to await
    try:
        await server.serve(sockets=sockets)
    finally:
        watcher.cancel()
        if progress is not None:
            progress.cancel()
        if pool is not None:
            await pool.stop()  # no-op when the lifespan shutdown stopped it already
        for sock in sockets or ():
            sock.close()
    return exit_codes.OK if server.started else exit_codes.FAILURE


def run(args: argparse.Namespace) -> int:
    import os

    try:
        config = load_config(
            target=args.target, config_path=args.config, env=os.environ,
            flags={k: getattr(args, k) for k in ("name", "replicas", "balancer", "host", "port",
                                                  "max_body_bytes", "workers",
                                                  "log_level", "log_format",
                                                  "redis_url", "allow_unauthenticated",
                                                  "backend", "ray_address")},
        )
    except ConfigError as exc:
        print(f"steadyserve: {exc}", file=sys.stderr)
        return exit_codes.CONFIG
    configure_logging(config.log_level, config.log_format, file=config.log_sink("gateway"),
                      process="gateway")
    cores = usable_cores()
    summary = ", ".join(
        f"{d.name} ({d.replicas} × {d.service}, {torch_threads(config, d, cores)} thread(s) each)"
        for d in config.deployments
    )
    print(f"steadyserve {__version__}: starting {summary}", file=sys.stderr)
    with event_loop_runner() as runner:
        return runner.run(serve(config))
