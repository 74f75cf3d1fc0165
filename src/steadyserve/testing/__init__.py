"""Fakes shipped for tests: a fake clock and in-process replicas (no sockets)."""

from .clock import FakeClock
from .inprocess import InProcessDeployment, start_inprocess

__all__ = ["FakeClock", "InProcessDeployment", "start_inprocess"]
