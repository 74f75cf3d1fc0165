"""Wire a whole gateway process from a Config: metrics, transport, membership, supervisor."""

from __future__ import annotations

from ..config import Config
from ..control.launcher import LocalLauncher
from ..control.supervisor import Supervisor
from ..observe.metrics import GatewayMetrics
from .app import Gateway
from .membership import Membership
from .transport import HttpTransport


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
    return gateway, supervisor
