"""The dashboard's routes: the page and its assets (public: they hold no data), and the data
it polls (`GET /v1/dashboard`, read access: open on loopback while no keys exist, an API key
otherwise — the page asks for one and keeps it for the tab's session). The page's buttons
(silence an alert, restart a deployment's replicas, cancel its rollout) call the admin API
itself with the key the page holds; nothing here changes anything.

Asynchronous jobs (counts by deployment and state, the oldest queued, the newest failures)
are read from the queue's database at most every `JOBS_REFRESH_S`, like per-key usage.

Batch sizes come from the replicas' own /metrics, fetched at most every `BATCH_REFRESH_S`
per gateway however many pages poll: one poll refreshes them, the others read the last."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

from ..errors import NotFound, SteadyError
from ..gateway.http import Request, Response, json_response
from ..gateway.key_routes import usage_rows
from .data import (
    BATCH_REFRESH_S,
    JOB_FAILURES_SHOWN,
    JOBS_REFRESH_S,
    MAX_HISTORY_MIN,
    USAGE_REFRESH_S,
    USAGE_SHOWN,
    Periodic,
    batch_sizes,
    cache_levels,
    history,
    jobs_view,
    replica_counts,
    snapshot,
)

if TYPE_CHECKING:
    from ..gateway.app import Gateway

ASSETS = {  # file -> content type: nothing else is served from the package
    "index.html": b"text/html; charset=utf-8",
    "app.js": b"text/javascript; charset=utf-8",
    "style.css": b"text/css; charset=utf-8",
    "uPlot.iife.min.js": b"text/javascript; charset=utf-8",
    "uPlot.min.css": b"text/css; charset=utf-8",
}
_cache: dict[str, bytes | None] = {}
ACTIONS_SHOWN = 20
EVENTS_SHOWN = 10
log = logging.getLogger("steadyserve.dashboard")
_periodic: weakref.WeakKeyDictionary[Gateway, dict[str, Periodic[Any]]] = \
    weakref.WeakKeyDictionary()
clock = time.monotonic  # when batch sizes were read (tests move it)


def _asset(name: str) -> bytes | None:
    if name not in _cache:
        try:
            _cache[name] = (resources.files(__package__) / "static" / name).read_bytes()
        except (FileNotFoundError, OSError):
            _cache[name] = None  # the charting library was not installed (`make install`)
    return _cache[name]


def _static(name: str) -> Response:
    body = _asset(name)
    if body is None:
        raise NotFound(f"dashboard asset {name!r} is not installed; `make install` fetches the "
                       "charting library from npm")
    headers = [(b"cache-control", b"max-age=300"), (b"x-content-type-options", b"nosniff")]
    if name == "index.html":  # only its own scripts, never framed
        headers += [(b"content-security-policy", b"default-src 'self'; style-src 'self' "
                     b"'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'"),
                    (b"x-frame-options", b"DENY")]
    return Response(200, body, ASSETS[name], headers)


async def page(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    return _static("index.html")


async def asset(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    name = params["asset"]
    if name not in ASSETS:
        raise NotFound(f"no dashboard asset {name[:64]!r}")
    return _static(name)


async def data(gw: Gateway, req: Request, params: dict[str, str]) -> Response:
    """Everything one refresh of the page shows; `?history=MINUTES` adds the per-minute
    history the page opens with."""
    minutes = req.query_int("history", 1, MAX_HISTORY_MIN, default=0)
    engine = gw.alerting
    families = list(engine.samples().collect() if engine is not None else
                    gw.metrics.registry.collect())
    counters = snapshot(families)
    batches = await _batch_sizes(gw, clock())
    theirs = gw.worker_outstanding()  # the data-plane workers' requests
    deployments = []
    for d in gw.membership.deployments.values():
        described = gw.describe(d)
        scale = described.get("autoscale") or {}
        seen = batches.get(d.name, {})
        # requests awaiting each replica (calls, coalesced or not, and open streams): this
        # process's own, and the workers' (each worker's last report, ~1 s old)
        mine = {e.replica_id: e.outstanding for e in d.endpoints}
        replicas = [{**r, "outstanding": mine.get(r["id"], 0) + theirs.get((d.name, r["id"]), 0)}
                    for r in described["replicas"]]
        deployments.append({
            "name": d.name, "version": d.version, "balancer": d.config.balancer,
            "desired": d.desired_replicas, "ready": len(d.endpoints),
            "replica_counts": replica_counts(replicas, d.desired_replicas),
            "replicas": replicas,
            "autoscale": {k: scale[k] for k in ("min_replicas", "max_replicas", "demand",
                                                "panicking") if k in scale} or None,
            "scaling": list(scale.get("events", []))[:EVENTS_SHOWN],
            "metrics": counters.get(d.name, {}),
            # handlers declared batch=True only: a batch of one elsewhere is not a batch
            "batches": {name: {**seen[name], "max_batch_size": h.spec.options.max_batch_size}
                        for name, h in d.handlers.items()
                        if h.spec.options.batch and name in seen},
            "rollout": _rollout(gw, d.name),
            "canary": _canary(gw, d.name),
        })
    body: dict[str, Any] = {"t": time.time(), "deployments": deployments,
                            "cluster": gw.lead.status()}
    if engine is not None:
        status = engine.status()
        body["alerts"] = status["alerts"]
        body["silences"] = len(status["silences"])
        body["actions"] = status["actions"][:ACTIONS_SHOWN]
    if gw.cache is not None:
        body["cache"] = {k: v for k, v in gw.cache.status(0).items()
                         if k in ("l1", "l2", "hit_ratio_curve")}
        body["cache"]["levels"] = cache_levels(families)
    keys = await _key_usage(gw, clock())
    if keys is not None:
        body["keys"] = keys
    jobs = await _jobs(gw, clock())
    if jobs is not None:
        body["jobs"] = jobs
    if minutes and engine is not None:
        body["history"] = history(engine.store, time.time(), minutes)
    return json_response(body)


async def _refreshed(held: Periodic[Any], now: float, what: str,
                     read: Callable[[], Awaitable[Any]]) -> Any:
    """`held`'s value, read again when it is `refresh_s` old. The time is taken before the
    read, so polls arriving meanwhile use the last value instead of reading too."""
    if held.stale(now):
        held.at = now
        try:
            held.keep(await read(), now)
        except Exception:  # the page goes on without it; the next refresh tries again
            log.warning("could not read %s for the dashboard", what, exc_info=True)
    return held.value


async def _batch_sizes(gw: Gateway, now: float) -> dict[str, dict[str, dict[str, Any]]]:
    """The replicas' batch sizes, from their /metrics at most every `BATCH_REFRESH_S`."""
    async def read() -> dict[str, dict[str, dict[str, Any]]]:
        return await asyncio.to_thread(batch_sizes, await gw.replica_metrics())

    held = _held(gw).setdefault("batches", Periodic({}, BATCH_REFRESH_S))
    got: dict[str, dict[str, dict[str, Any]]] = await _refreshed(held, now, "batch sizes", read)
    return got


async def _key_usage(gw: Gateway, now: float) -> list[dict[str, Any]] | None:
    """Today's busiest keys (at most `USAGE_SHOWN`), from the database at most every
    `USAGE_REFRESH_S`; None while only the local admin key exists."""
    if not gw.keys.user_keys_exist() or gw.usage_flusher is None:
        return None

    async def read() -> list[dict[str, Any]]:
        return await usage_rows(gw, 1, USAGE_SHOWN)

    held = _held(gw).setdefault("keys", Periodic([], USAGE_REFRESH_S))
    got: list[dict[str, Any]] = await _refreshed(held, now, "key usage", read)
    return got


async def _jobs(gw: Gateway, now: float) -> dict[str, Any] | None:
    """Asynchronous jobs by deployment and state, the oldest queued one's submission time
    and the newest failures (`JOB_FAILURES_SHOWN`), from the queue's database at most every
    `JOBS_REFRESH_S`; None where this gateway keeps no queue."""
    runner = gw.jobs
    if runner is None:
        return None

    async def read() -> dict[str, Any]:
        got = await asyncio.to_thread(runner.store.overview, JOB_FAILURES_SHOWN)
        return jobs_view(got, time.time())

    held = _held(gw).setdefault("jobs", Periodic({}, JOBS_REFRESH_S))
    got: dict[str, Any] = await _refreshed(held, now, "jobs", read)
    return got


def _held(gw: Gateway) -> dict[str, Periodic[Any]]:
    return _periodic.setdefault(gw, {})


CANARY_HISTORY_SHOWN = 6


def _canary(gw: Gateway, name: str) -> dict[str, Any] | None:
    """The deployment's canary (control.canary): state, step, share, the last verdict with
    its checks, and the newest steps of its history with their evidence."""
    if gw.canaries is None or name not in gw.canaries.plans:
        return None
    got = gw.canaries.status(name)
    verdict = got.get("verdict") or {}
    return {k: got[k] for k in ("candidate", "state", "step", "steps", "percent", "reason",
                                "baseline", "candidate_arm", "requests_total")} | {
        "verdict": verdict.get("reason"), "checks": verdict.get("checks", []),
        "history": got["history"][-CANARY_HISTORY_SHOWN:]}


def _rollout(gw: Gateway, name: str) -> dict[str, Any] | None:
    """The deployment's rollout as the page shows it: its state, revision → target, progress
    and the reason it failed or was cancelled. The target's env values are left out (they
    may be credentials, and this data needs only read access): their names are shown."""
    status = getattr(gw.control, "rollout_status", None)
    if status is None:
        return None
    try:
        got = status(name)
    except SteadyError:  # a deployment the control plane does not roll out
        return None
    target = got.get("target") or {}
    return {
        "state": got.get("state"), "reason": got.get("reason"),
        "revision": got.get("revision"), "target": target.get("revision"),
        "service": target.get("service"), "replicas": target.get("replicas"),
        "env": sorted(target.get("env") or {}),
        "good_revision": got.get("good_revision"), "progress": got.get("progress"),
        "started_at": got.get("started_at"), "finished_at": got.get("finished_at"),
    }
