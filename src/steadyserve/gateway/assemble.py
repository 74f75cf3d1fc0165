"""Wire a whole gateway process from a Config: metrics, transport, membership, supervisor."""

from __future__ import annotations

import logging
from pathlib import Path

from ..auth.keyring import KeyRing
from ..auth.usage import UsageFlusher
from ..config import Config
from ..control.canary import CanaryController
from ..control.launcher import LocalLauncher
from ..control.leadership import Leadership, default_gateway_id
from ..control.responder import Responder
from ..control.supervisor import Supervisor
from ..observe.aggregate import summed_registry
from ..observe.alerting import AlertEngine
from ..observe.metrics import GatewayMetrics
from ..policies.actions import ActionGuard
from ..store import Database, DatabaseUnavailable
from ..store.feedback import FeedbackStore
from ..store.keys import KeyStore
from ..store.records import RecordStore
from ..store.spool import Spool
from ..store.usage import UsageStore
from .activation import Activator
from .app import Gateway
from .jobs import build_runner
from .membership import Membership
from .records import RecordWriter
from .transport import HttpTransport
from .worker import Forwarder, WorkerControl, WorkerLink
from .workers import WorkerPool

log = logging.getLogger("steadyserve.gateway")


def open_database(config: Config) -> Database | None:
    """The state database, or None when it cannot open: alerts then live in memory only, and
    API keys are the local admin key alone until it can be read."""
    from ..store.backup import backup_dir

    try:
        # a schema migration is preceded by a backup (store.backup) when the database has data
        return Database(config.database, backup_dir=backup_dir(config))
    except DatabaseUnavailable as exc:
        log.error("state database unavailable: alert history in memory only, API keys other "
                  "than the local admin key unknown: %s", exc)
        return None


def build_keyring(config: Config, db: Database | None) -> KeyRing:
    return KeyRing(KeyStore(db, max_keys=config.auth.max_keys) if db is not None else None,
                   admin_key_path=Path(config.data_dir) / config.auth.admin_key_file,
                   refresh_s=config.auth.key_refresh_s)


def wire_autoscaling(gateway: Gateway, supervisor: Supervisor) -> None:
    """The data plane reports demand and ready replicas to the autoscaler, and holds requests
    of an autoscaled deployment with no ready replica, asking it for one."""
    autoscaler = supervisor.autoscaler
    autoscaler.demand = gateway.controls.demand
    autoscaler.sample = gateway.controls.sample_demand
    autoscaler.expect = gateway.controls.expect_capacity
    autoscaler.ready = gateway.controls.ready
    if autoscaler.policies:
        gateway.dispatcher.activator = Activator(poke=autoscaler.activate,
                                                 failure=supervisor.start_failure)


def join_cluster(config: Config, gateway: Gateway, supervisor: Supervisor, db: Database | None,
                 metrics: GatewayMetrics) -> None:
    """[cluster]: the singleton duties follow a lease in the shared database."""
    if db is None:
        # no database, no lease: do every duty here (alerts keep being told) and say so
        log.error("[cluster] is on but the database did not open: this gateway does every "
                  "singleton duty alone until it restarts with the database up")
        return
    gateway_id = config.cluster.gateway_id or default_gateway_id(config.gateway.port)
    lead = Leadership(db, config.cluster, gateway_id, metrics)
    lead.on_elected.append(supervisor.elected)
    supervisor.lead = lead
    supervisor.autoscaler.gateway_id = gateway_id
    gateway.lead = lead


def build_worker_gateway(config: Config, index: int, channel_path: str,
                         http_path: str) -> tuple[Gateway, WorkerLink]:
    """A data-plane worker's gateway (gateway.worker): membership from the channel, reports
    to it, and every route but inference and probes forwarded to the gateway process."""
    metrics = GatewayMetrics()
    db = open_database(config)  # API keys: this worker checks them itself
    transport = HttpTransport(
        max_connections=max(d.max_connections_per_replica for d in config.deployments),
        max_response_bytes=config.gateway.max_upstream_response_bytes,
    )
    membership = Membership(config.deployments)
    gateway = Gateway(config, transport=transport, membership=membership, metrics=metrics,
                      keys=build_keyring(config, db))
    link = WorkerLink(index, channel_path, gateway, {d.name: d for d in config.deployments})
    gateway.control = WorkerControl(link)
    gateway.dispatcher.on_unavailable = link.unavailable
    if any(d.autoscale is not None for d in config.deployments):
        # resize (membership.on_change) wakes the held requests when a replica arrives
        gateway.dispatcher.activator = Activator(poke=link.activate, failure=link.start_failure)
    gateway.forward = Forwarder(http_path, config.gateway.request_timeout_s,
                                config.gateway.max_body_bytes)
    gateway.on_invalidated = link.invalidated
    return gateway, link


def join_workers(gateway: Gateway, supervisor: Supervisor, pool: WorkerPool) -> None:
    """The gateway process's side of its data-plane workers (gateway.workers)."""
    gateway.controls.remote_demand = pool.demand
    gateway.controls.fanout = pool.broadcast
    gateway.worker_metrics = pool.metric_texts
    gateway.worker_outstanding = pool.outstanding
    gateway.on_invalidated = lambda tags: pool.broadcast({"t": "invalidate", "tags": tags})
    gateway.on_shutdown.append(pool.stop)
    if gateway.alerting is not None:
        registry = gateway.metrics.registry
        gateway.alerting.samples = lambda: summed_registry(registry, pool.metric_texts())


def build_gateway(
    config: Config, launcher: LocalLauncher | None = None
) -> tuple[Gateway, Supervisor]:
    """`launcher` replaces how replica processes start (tests put fault proxies in front)."""
    metrics = GatewayMetrics()
    db = open_database(config)
    transport = HttpTransport(
        max_connections=max(d.max_connections_per_replica for d in config.deployments),
        max_response_bytes=config.gateway.max_upstream_response_bytes,
    )
    membership = Membership(config.deployments)
    if launcher is None and config.backend == "ray":
        from ..control.ray_launcher import RayLauncher  # Ray is imported only when chosen

        launcher = RayLauncher(config)  # type: ignore[assignment]
    supervisor = Supervisor(config, membership, transport, metrics, launcher, state_store=db)
    gateway = Gateway(config, transport=transport, membership=membership, metrics=metrics,
                      control=supervisor, keys=build_keyring(config, db))
    supervisor.crash_listeners.append(gateway.dispatcher.on_replica_crash)
    gateway.feedback_spool = Spool(Path(config.data_dir) / "spool" / "feedback",
                                   config.feedback.spool_max_bytes)
    if db is not None:
        gateway.feedback_store = FeedbackStore(db, config.feedback.max_items_per_request)
        gateway.record_store = RecordStore(db)
        if gateway.recorder is not None:
            gateway.record_writer = RecordWriter(gateway.recorder, gateway.record_store)
        gateway.usage_flusher = UsageFlusher(gateway.usage, UsageStore(db),
                                             config.auth.usage_flush_s,
                                             config.auth.usage_retention_days)
        if config.jobs.enabled:  # asynchronous jobs: the queue is this database
            gateway.jobs = build_runner(config, gateway, db, config.cluster.gateway_id
                                        or default_gateway_id(config.gateway.port))
    wire_autoscaling(gateway, supervisor)
    if config.cluster.enabled:
        join_cluster(config, gateway, supervisor, db, metrics)
    if config.alerting.enabled:
        guard = ActionGuard(cooldown_s=config.alerting.action_cooldown_s,
                            max_per_hour=config.alerting.actions_per_hour)
        responder = Responder(gateway.controls, metrics, supervisor, guard, db,
                              dry_run=config.alerting.dry_run)
        gateway.alerting = AlertEngine(config, metrics, db, responder,
                                       before_sample=gateway.export_admission)
        gateway.alerting.lead = gateway.lead
    if any(d.canary is not None for d in config.deployments):
        gateway.canaries = CanaryController(config, gateway.splits, store=db,
                                            firing=lambda name: firing_on(gateway, name),
                                            lead=gateway.lead)
    return gateway, supervisor


def firing_on(gateway: Gateway, deployment: str) -> str | None:
    """The first alert firing on `deployment` (labels.deployment), as a line; None if none."""
    if gateway.alerting is None:
        return None
    for alert in gateway.alerting.book.alerts("firing"):
        if alert.labels.get("deployment") == deployment and not alert.silenced_by:
            return f"{alert.rule}: {alert.description}"
    return None
