"""Run replicas of a service inside the test's own process and plug them into a gateway.

    deployment = await start_inprocess(gateway, "echo", Echo, replicas=2)
    ...                      # the gateway now routes to ReplicaApps via InProcessTransport
    await deployment.stop()
"""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx

from .. import codec
from ..gateway.app import Gateway, child_host_header
from ..gateway.membership import Endpoint
from ..gateway.transport import Address, InProcessTransport
from ..replica.server import ReplicaApp
from ..service import Service, handler_specs


@dataclass
class InProcessDeployment:
    gateway: Gateway
    name: str
    apps: dict[str, ReplicaApp] = field(default_factory=dict)
    addresses: dict[str, Address] = field(default_factory=dict)

    def kill(self, replica_id: str) -> None:
        """Make a replica unreachable, as if its process died (still listed in membership)."""
        transport = self.gateway.transport
        assert isinstance(transport, InProcessTransport)
        transport.apps.pop(self.addresses[replica_id], None)

    async def stop(self) -> None:
        for replica_id, app in self.apps.items():
            self.gateway.membership.remove(self.name, replica_id)
            await app.stop()
            if app.children.transport is not None:
                await app.children.transport.aclose()


async def start_inprocess(
    gateway: Gateway, name: str, service_cls: type[Service], *, replicas: int = 1,
) -> InProcessDeployment:
    transport = gateway.transport
    if not isinstance(transport, InProcessTransport):
        raise TypeError("start_inprocess needs a Gateway built with an InProcessTransport")
    specs = handler_specs(service_cls)
    deployment = InProcessDeployment(gateway, name)
    for i in range(replicas):
        replica_id = f"{name}-{i}"
        app = ReplicaApp(service_cls(), specs, name=replica_id)
        # child calls (steadyserve.compose) go to this gateway in process, as a real
        # replica's go over HTTP, with its deployment's child-call credential
        app.children.transport = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=gateway),  # type: ignore[arg-type]
            base_url=f"http://{child_host_header(gateway.config)}")
        app.children.token = gateway.keys.child_token(name)
        await app.start()
        address = Address("inprocess", 10000 + len(transport.apps))
        transport.apps[address] = app
        deployment.apps[replica_id] = app
        deployment.addresses[replica_id] = address
        info = codec.decode(app._info)
        gateway.membership.add(name, Endpoint(replica_id, address), info)
    return deployment
