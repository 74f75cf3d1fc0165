"""The whole configuration as frozen dataclasses, declared once and validated when built.

No I/O here: `settings.py` is the only reader of files, environment and flags.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import ConfigError
from .policies.balancing import BALANCERS

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
DEFAULT_SERVICE = "steadyserve.examples.embedding:Embedder"
MiB = 1024 * 1024


@dataclass(frozen=True, kw_only=True, slots=True)
class DeploymentConfig:
    name: str
    service: str  # "path/to/file.py:Class" or "package.module:Class"
    replicas: int = 1
    balancer: str = "power_of_two"
    torch_threads: int | None = None  # None: cores // all replicas, at least 1
    max_connections_per_replica: int = 256
    env: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ConfigError(
                f"deployment name {self.name!r}: use lowercase letters, digits, '-', '_', '.'"
            )
        if ":" not in self.service:
            raise ConfigError(f"deployment {self.name}: service must be 'file.py:Class' "
                              f"or 'module:Class', got {self.service!r}")
        if self.replicas < 1:
            raise ConfigError(f"deployment {self.name}: replicas must be >= 1")
        if self.balancer not in BALANCERS:
            raise ConfigError(f"deployment {self.name}: unknown balancer {self.balancer!r}; "
                              f"choose one of {sorted(BALANCERS)}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError(f"deployment {self.name}: torch_threads must be >= 1")
        if self.max_connections_per_replica < 1:
            raise ConfigError(f"deployment {self.name}: max_connections_per_replica must be >= 1")


@dataclass(frozen=True, kw_only=True, slots=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 1 * MiB
    compress_min_bytes: int = 1024  # responses smaller than this are never compressed
    request_timeout_s: float = 60.0  # upper bound on any one client request
    graceful_shutdown_s: float = 10.0  # drain in-flight requests on SIGTERM for at most this

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0..65535, got {self.port}")
        if self.max_body_bytes < 1024:
            raise ConfigError("max_body_bytes must be >= 1024")
        if self.compress_min_bytes < 0:
            raise ConfigError("compress_min_bytes must be >= 0")
        if self.request_timeout_s <= 0 or self.graceful_shutdown_s < 0:
            raise ConfigError("request_timeout_s must be > 0 and graceful_shutdown_s >= 0")


@dataclass(frozen=True, kw_only=True, slots=True)
class SupervisorConfig:
    restart_base_s: float = 0.5  # first restart waits 0.25–0.5 s, doubling up to the cap
    restart_cap_s: float = 30.0
    ready_timeout_s: float = 180.0  # a replica not ready by then is killed and restarted
    health_interval_s: float = 1.0
    health_timeout_s: float = 2.0
    unhealthy_after: int = 3  # consecutive failed /readyz before leaving rotation
    drain_timeout_s: float = 10.0  # SIGTERM'd replicas get this long before SIGKILL
    reconcile_interval_s: float = 0.2

    def __post_init__(self) -> None:
        if self.restart_base_s <= 0 or self.restart_cap_s < self.restart_base_s:
            raise ConfigError("need 0 < restart_base_s <= restart_cap_s")
        if min(self.ready_timeout_s, self.health_interval_s, self.health_timeout_s,
               self.drain_timeout_s, self.reconcile_interval_s) <= 0:
            raise ConfigError("supervisor intervals and timeouts must be > 0")
        if self.unhealthy_after < 1:
            raise ConfigError("unhealthy_after must be >= 1")


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    deployments: tuple[DeploymentConfig, ...]
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    data_dir: str = ".steadyserve"
    log_level: str = "info"
    log_format: str = "auto"  # json | text | auto (text on a terminal)

    def __post_init__(self) -> None:
        if not self.deployments:
            raise ConfigError("at least one deployment is needed")
        names = [d.name for d in self.deployments]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"duplicate deployment names: {dupes}")
        if self.log_format not in ("json", "text", "auto"):
            raise ConfigError("log_format must be json, text or auto")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError("log_level must be debug, info, warning or error")

    def deployment(self, name: str) -> DeploymentConfig:
        for d in self.deployments:
            if d.name == name:
                return d
        raise KeyError(name)

    @property
    def total_replicas(self) -> int:
        return sum(d.replicas for d in self.deployments)
