"""Wire a whole gateway process from a Config: metrics, transport, membership, supervisor."""

from __future__ import annotations

import logging

from ..config import Config
from ..control.launcher import LocalLauncher
from ..control.responder import Responder
from ..control.supervisor import Supervisor
from ..observe.alerting import AlertEngine
from ..observe.metrics import GatewayMetrics
from ..policies.actions import ActionGuard
from ..store import Database, DatabaseUnavailable
from .app import Gateway
from .membership import Membership
from .transport import HttpTransport

log = logging.getLogger("steadyserve.gateway")


def open_database(config: Config) -> Database | None:
    """The state database, or None (alerts then live in memory only) when it cannot open."""
    try:
        return Database(config.database)
    except DatabaseUnavailable as exc:
        log.error("state database unavailable, alert history kept in memory only: %s", exc)
        return None


def build_gateway(
    config: Config, launcher: LocalLauncher | None = None
) -> tuple[Gateway, Supervisor]:
    """`launcher` replaces how replica processes start (tests put fault proxies in front)."""
    metrics = GatewayMetrics()
    transport = HttpTransport(
        max_connections=max(d.max_connections_per_replica for d in config.deployments),
    )
    membership = Membership(config.deployments)
    supervisor = Supervisor(config, membership, transport, metrics, launcher)
    gateway = Gateway(config, transport=transport, membership=membership, metrics=metrics,
                      control=supervisor)
    supervisor.crash_listeners.append(gateway.dispatcher.on_replica_crash)
    if config.alerting.enabled:
        db = open_database(config)
        guard = ActionGuard(cooldown_s=config.alerting.action_cooldown_s,
                            max_per_hour=config.alerting.actions_per_hour)
        responder = Responder(gateway, supervisor, guard, db, dry_run=config.alerting.dry_run)
        gateway.alerting = AlertEngine(config, metrics, db, responder,
                                       before_sample=gateway.export_admission)
    return gateway, supervisor
