"""Makes the harness fixtures available to every chaos test module."""

from .harness import chaos_gateway

__all__ = ["chaos_gateway"]
