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
    "ClientError",
    "ConfigError",
    "HandlerOptions",
    "NotFound",
    "Overloaded",
    "ReplicaError",
    "RetryableError",
    "Service",
    "SteadyError",
    "__version__",
    "handler",
]
