"""steadyserve: serve a Python model class as replicas behind a load-balancing gateway."""

from .errors import (
    ClientError,
    ConfigError,
    NotFound,
    Overloaded,
    ReplicaError,
    RetryableError,
    SteadyError,
)
from .service import HandlerOptions, Service, handler

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Client",
    "ClientError",
    "ConfigError",
    "Failed",
    "HandlerOptions",
    "NotFound",
    "Overloaded",
    "ReplicaError",
    "RetryableError",
    "Service",
    "SteadyError",
    "__version__",
    "gather",
    "handler",
]


def __getattr__(name: str) -> object:
    """The client SDK on first use: service code that imports steadyserve does not load it."""
    if name in ("AsyncClient", "Client"):
        from . import client

        return getattr(client, name)
    if name in ("gather", "Failed"):  # composition (child calls), for service code
        from . import compose

        return getattr(compose, name)
    raise AttributeError(f"module 'steadyserve' has no attribute {name!r}")
