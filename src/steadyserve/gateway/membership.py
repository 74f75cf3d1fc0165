"""Which replicas are in rotation, per deployment, and what their handlers accept.

The control plane (supervisor) adds and removes endpoints; the data plane only reads them.
This is the seam where membership will be pushed to several data-plane workers later.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..config import DeploymentConfig
from ..policies.balancing import Balancer, make_balancer
from ..policies.outlier import HandlerErrors, HostHealth
from ..schema import compile_params
from ..service import HandlerSpec
from .transport import Address


@dataclass(slots=True, eq=False)
class Endpoint:
    replica_id: str
    address: Address
    outstanding: int = 0
    ewma_latency_s: float = 0.0
    ewma_at: float = 0.0
    health: HostHealth = field(default_factory=HostHealth)  # outlier detection (passive)
    handler_errors: HandlerErrors = field(default_factory=HandlerErrors)  # vs its peers'


@dataclass(slots=True, eq=False)
class Handler:
    spec: HandlerSpec
    validate: Callable[[Any], dict[str, Any]]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def item_param(self) -> str:
        return str(self.spec.params[0]["name"]) if self.spec.options.batch else ""


@dataclass(slots=True, eq=False)
class Deployment:
    config: DeploymentConfig
    balancer: Balancer
    endpoints: list[Endpoint] = field(default_factory=list)
    handlers: dict[str, Handler] = field(default_factory=dict)
    service: str = ""
    version: str = ""
    desired: int | None = None  # an autoscaled deployment's count now; None: config.replicas

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def desired_replicas(self) -> int:
        return self.config.replicas if self.desired is None else self.desired

    def openai_handler(self, kind: str) -> Handler | None:
        for h in self.handlers.values():
            if h.spec.options.openai == kind:
                return h
        return None


class Membership:
    def __init__(self, deployments: Iterable[DeploymentConfig]) -> None:
        self.deployments: dict[str, Deployment] = {
            d.name: Deployment(d, make_balancer(d.balancer)) for d in deployments
        }
        self.on_change: Callable[[Deployment], None] | None = None

    def reconfigure(self, config: DeploymentConfig) -> None:
        """A rollout changed the deployment's config (replicas, service, balancer)."""
        d = self.deployments[config.name]
        if config.balancer != d.config.balancer:
            # a fresh balancer: its state (a round-robin cursor) belongs to the old policy
            d.balancer = make_balancer(config.balancer)
        d.config = config
        self._changed(d)

    def set_desired(self, deployment: str, replicas: int) -> None:
        """The autoscaler chose a new replica count."""
        d = self.deployments[deployment]
        d.desired = replicas
        self._changed(d)

    def _changed(self, d: Deployment) -> None:
        if self.on_change is not None:
            self.on_change(d)

    def get(self, name: str) -> Deployment | None:
        return self.deployments.get(name)

    def add(self, deployment: str, endpoint: Endpoint, info: dict[str, Any]) -> None:
        d = self.deployments[deployment]
        if not d.handlers or info.get("version") != d.version:
            specs = [HandlerSpec.from_wire(h) for h in info.get("handlers", [])]
            d.handlers = {s.name: Handler(s, compile_params(s.params)) for s in specs}
            d.service = str(info.get("service", ""))
            d.version = str(info.get("version", ""))
        d.endpoints = [e for e in d.endpoints if e.replica_id != endpoint.replica_id] + [endpoint]
        self._changed(d)

    def remove(self, deployment: str, replica_id: str) -> Endpoint | None:
        d = self.deployments[deployment]
        for e in d.endpoints:
            if e.replica_id == replica_id:
                d.endpoints = [x for x in d.endpoints if x is not e]  # new list: safe mid-iteration
                self._changed(d)
                return e
        return None

    def readiness(self) -> tuple[bool, str]:
        # a paused deployment (replicas = 0) is meant to have none; one that scales to zero
        # holds its requests until a replica is ready
        missing = [n for n, d in self.deployments.items()
                   if not d.endpoints and d.desired_replicas > 0
                   and not (d.config.autoscale and d.config.autoscale.min_replicas == 0)]
        if missing:
            return False, "no ready replica for deployment(s): " + ", ".join(missing)
        return True, "ready"
