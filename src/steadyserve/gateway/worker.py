"""A data-plane worker process (`[gateway] workers` > 1): inference on the shared port.

It runs the data plane alone — edge, admission, response cache (its own L1; L2 shared
through Redis), dispatch — and nothing of the control plane. What it receives from the
gateway process (gateway.workers, over gateway.channel): the membership (each deployment's
config, desired count and replicas in rotation, with their handlers), the actions of
automatic responses, and invalidations. What it reports: its demand (time-weighted, for the
autoscaler) and its metrics each second, replicas it could not reach, requests held for a
first replica, and invalidations its requests caused. Every other route (admin, status,
alerts, /metrics, rollouts) is forwarded to the gateway process over a private Unix socket,
which answers it with the whole picture.

Start order: the worker binds the port only after the first membership arrived, so the
kernel never hands it a connection it could not route. It dies with the gateway process
(PR_SET_PDEATHSIG), and reconnects to the channel if it breaks.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import httpx

from ..auth import usage
from ..config import Config, DeploymentConfig
from ..netutil import reuseport_socket
from ..policies.rollout import config_from_fields
from ..process import die_with_parent, event_loop_runner, freeze_startup_heap
from ..tasks import cancel_and_wait
from .channel import MAX_MESSAGE_BYTES, ChannelClosed, encode, read_message
from .http import Request, Response
from .membership import Endpoint, Membership
from .transport import Address

log = logging.getLogger("steadyserve.worker")

REPORT_EVERY_S = 1.0
FIRST_STATE_TIMEOUT_S = 60.0  # a worker with no membership by then exits (and is restarted)
RECONNECT_S = 0.5
# request headers not forwarded: hop-by-hop, and what the forwarder sets itself (the body
# is forwarded decoded, and the gateway process answers uncompressed: this worker compresses)
_DROP_REQUEST = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length",
                           b"content-encoding", b"accept-encoding", b"upgrade", b"te",
                           b"x-request-id"})
_KEEP_RESPONSE = frozenset({"retry-after", "www-authenticate", "location", "allow", "vary",
                            "x-steadyserve-cache"})


def outstanding_of(membership: Membership) -> list[list[Any]]:
    """[[deployment, replica, requests], …]: what this worker awaits from each replica now —
    single calls, calls riding coalesced exchanges and open streams alike (the dashboard's
    per-replica count; replicas with none are left out)."""
    return [[name, e.replica_id, e.outstanding]
            for name, d in membership.deployments.items() for e in d.endpoints if e.outstanding]


def apply_state(membership: Membership, transport: Any, file_configs: dict[str, DeploymentConfig],
                deployments: dict[str, Any]) -> None:
    """Make this worker's membership what the gateway process says it is. Endpoints keep
    their own state (outstanding, health) across updates; only new replicas are added."""
    for name, state in deployments.items():
        d = membership.get(name)
        if d is None or name not in file_configs:
            continue
        config = config_from_fields(file_configs[name], state["config"])
        if config != d.config:
            membership.reconfigure(config)
        if state.get("desired") != d.desired and state.get("desired") is not None:
            membership.set_desired(name, int(state["desired"]))
        wanted = {e["id"]: e for e in state["endpoints"]}
        for e in list(d.endpoints):
            if e.replica_id not in wanted or (e.address.host, e.address.port) != (
                    wanted[e.replica_id]["host"], wanted[e.replica_id]["port"]):
                membership.remove(name, e.replica_id)
        have = {e.replica_id for e in d.endpoints}
        for rid, e in wanted.items():
            if rid in have:
                continue
            address = Address(str(e["host"]), int(e["port"]))
            set_max = getattr(transport, "set_max_connections", None)
            if set_max is not None:
                set_max(address, config.max_connections_per_replica)
            membership.add(name, Endpoint(rid, address), e["info"])


class WorkerLink:
    """This worker's end of the channel: applies what arrives, sends what it reports."""

    def __init__(self, index: int, channel_path: str, gateway: Any,
                 file_configs: dict[str, DeploymentConfig]) -> None:
        self.index = index
        self.channel_path = channel_path
        self.gateway = gateway
        self.file_configs = file_configs
        self.start_failures: dict[str, tuple[float, str]] = {}
        self.first_state = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._reports: asyncio.Task[None] | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name="worker-channel")
        self._reports = loop.create_task(self._report_loop(), name="worker-reports")

    async def stop(self) -> None:
        for task in (self._task, self._reports):
            await cancel_and_wait(task)

    def send(self, message: dict[str, Any]) -> None:
        """Best effort: a message while the channel is down is dropped (the next report
        carries the news again; a held request asks again when it is re-poked)."""
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(encode(message))

    async def _run(self) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(
                    self.channel_path, limit=MAX_MESSAGE_BYTES)
                self._writer = writer
                writer.write(encode({"t": "hello", "worker": self.index}))
                while True:
                    self._handle(await read_message(reader))
            except (OSError, ChannelClosed) as exc:
                log.warning("control channel lost (%s); reconnecting", exc)
            except Exception:
                log.exception("control channel failed; reconnecting")
            finally:
                if self._writer is not None:
                    self._writer.close()
                    self._writer = None
            await asyncio.sleep(RECONNECT_S)

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message["t"]
        gw = self.gateway
        if kind == "state":
            apply_state(gw.membership, gw.transport, self.file_configs, message["deployments"])
            gw.splits.apply_wire(message.get("splits", {}))
            self.start_failures = {k: (float(v[0]), str(v[1]))
                                   for k, v in message.get("start_failures", {}).items()}
            self.first_state.set()
        elif kind == "invalidate":
            if gw.cache is not None:
                gw.cache.drop_local(message["tags"])
        elif kind == "forget":
            if gw.cache is not None:
                gw.cache.forget_local([str(k) for k in message["keys"]])
        elif kind == "eject":
            gw.controls.eject(message["deployment"], message["replica"])
        elif kind == "shed_batch":
            gw.controls.shed_batch(message["deployment"], float(message["seconds"]))
        elif kind == "serve_stale":
            gw.controls.serve_stale(message["deployment"], float(message["seconds"]))
        elif kind == "expect_capacity":
            gw.controls.expect_capacity(message["deployment"], float(message["seconds"]))
        else:
            log.warning("unknown control message %r ignored", kind[:40])

    async def _report_loop(self) -> None:
        from prometheus_client import generate_latest

        while True:
            await asyncio.sleep(REPORT_EVERY_S)
            try:
                gw = self.gateway
                gw.export_admission()
                demand = {name: gw.controls.sample_demand(name)
                          for name, d in gw.membership.deployments.items()
                          if d.config.autoscale is not None}
                self.send({"t": "report", "demand": demand,
                           "outstanding": outstanding_of(gw.membership),
                           "metrics": generate_latest(gw.metrics.registry).decode(),
                           "usage": usage.to_wire(gw.usage.take()),
                           "canary": gw.splits.observations.take(),
                           "records": gw.recorder.take(gw.recorder.cfg.record_queue_max)
                           if gw.recorder is not None else []})
            except Exception:
                log.exception("worker report failed; continuing")

    # what the data plane calls -------------------------------------------------------------------
    def unavailable(self, deployment: str, endpoint: Endpoint) -> None:
        self.send({"t": "unavailable", "deployment": deployment, "replica": endpoint.replica_id})

    def activate(self, deployment: str) -> None:
        activator = self.gateway.dispatcher.activator
        held = activator.held(deployment) if activator is not None else 0
        self.send({"t": "activate", "deployment": deployment, "held": max(1, held)})

    def start_failure(self, deployment: str, since: float) -> str | None:
        failed = self.start_failures.get(deployment)
        return failed[1] if failed is not None and failed[0] >= since else None

    def invalidated(self, tags: list[str]) -> None:
        self.send({"t": "invalidated", "tags": tags})


class WorkerControl:
    """The control plane as a worker sees it: reports go over the channel; everything else
    is the gateway process's, reached by forwarding the route."""

    def __init__(self, link: WorkerLink) -> None:
        self.link = link

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def status(self, deployment: str) -> list[dict[str, Any]]:
        return []

    def report_unavailable(self, deployment: str, endpoint: Endpoint) -> None:
        self.link.unavailable(deployment, endpoint)

    def replica_exited(self, replica_id: str) -> bool:
        return False  # only the gateway process sees its replicas exit

    async def rollout(self, deployment: str, changes: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError("forwarded to the gateway process")

    def rollout_status(self, deployment: str) -> dict[str, Any]:
        raise AssertionError("forwarded to the gateway process")

    async def cancel_rollout(self, deployment: str) -> dict[str, Any]:
        raise AssertionError("forwarded to the gateway process")


class Forwarder:
    """Sends a route the worker does not serve to the gateway process, as it came."""

    def __init__(self, http_path: str, timeout_s: float, max_body_bytes: int) -> None:
        self.client = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=http_path),
                                        base_url="http://gateway", timeout=timeout_s)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, req: Request) -> Response:
        body = await req.body(self.max_body_bytes)
        headers = [(k, v) for k, v in req.scope["headers"] if k not in _DROP_REQUEST]
        headers.append((b"x-request-id", req.request_id.encode()))
        query = req.scope.get("query_string", b"")
        target = req.scope.get("raw_path") or req.path.encode()
        url = target.decode("latin-1") + (("?" + query.decode("latin-1")) if query else "")
        reply = await self.client.request(req.method, url, content=body, headers=headers)
        kept = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers.items()
                if k.lower() in _KEEP_RESPONSE]
        content_type = reply.headers.get("content-type", "application/json").encode("latin-1")
        return Response(reply.status_code, reply.content, content_type, kept)

    async def close(self) -> None:
        await self.client.aclose()


def worker_main(config: Config, index: int, channel_path: str, http_path: str,
                parent_pid: int) -> None:
    """The worker process's entry point (multiprocessing, spawn)."""
    die_with_parent(parent_pid)
    from ..observe.logs import configure_logging

    configure_logging(config.log_level, "json" if config.log_format == "auto" else config.log_format,
                      file=config.log_sink(f"worker-{index}"), process=f"worker-{index}")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per forwarded route: noise
    with event_loop_runner() as runner:
        runner.run(_serve(config, index, channel_path, http_path))


async def _serve(config: Config, index: int, channel_path: str, http_path: str) -> None:
    import uvicorn

    from .assemble import build_worker_gateway
    from .edge import server_config

    gateway, link = build_worker_gateway(config, index, channel_path, http_path)
    link.start()
    try:
        await asyncio.wait_for(link.first_state.wait(), FIRST_STATE_TIMEOUT_S)
    except TimeoutError:
        log.error("no membership from the gateway process in %g s; exiting",
                  FIRST_STATE_TIMEOUT_S)
        return
    sock = reuseport_socket(config.gateway.host, config.gateway.port)
    server = uvicorn.Server(server_config(gateway, config.gateway))
    freeze_startup_heap()  # as the gateway process does (cli.run)
    log.info("worker %d serving", index, extra={"worker": index, "pid": os.getpid()})
    try:
        await server.serve(sockets=[sock])
    finally:
        await link.stop()
        forward = gateway.forward
        if forward is not None:
            await forward.close()
        sock.close()


def describe_endpoint(endpoint: Endpoint, info: dict[str, Any]) -> dict[str, Any]:
    return {"id": endpoint.replica_id, "host": endpoint.address.host,
            "port": endpoint.address.port, "info": info}


def state_message(membership: Membership, infos: dict[str, dict[str, Any]],
                  start_failures: dict[str, tuple[float, str]],
                  splits: dict[str, Any] | None = None) -> bytes:
    """The whole membership, as `apply_state` takes it."""
    from ..policies.rollout import rollout_fields

    deployments = {}
    for name, d in membership.deployments.items():
        fields = rollout_fields(d.config)
        deployments[name] = {
            "config": fields, "desired": d.desired,
            "endpoints": [describe_endpoint(e, infos.get(e.replica_id, {})) for e in d.endpoints],
        }
    return encode({"t": "state", "deployments": deployments,
                   "start_failures": {k: list(v) for k, v in start_failures.items()},
                   "splits": splits or {}})
