"""control/launcher.py: the default cap on replicas a rollout may ask for."""

from __future__ import annotations

import pytest

from steadyserve.config import DeploymentConfig
from steadyserve.control.launcher import default_max_replicas, max_replicas, usable_memory_bytes

GiB = 1024**3


@pytest.mark.parametrize(
    ("replicas", "cores", "memory", "expected"),
    [
        pytest.param(1, 16, 128 * GiB, 64, id="cores-bound"),
        pytest.param(1, 16, 4 * GiB, 8, id="memory-bound"),
        pytest.param(1, 2, None, 8, id="memory-unknown"),
        pytest.param(12, 2, 2 * GiB, 12, id="never-below-configured"),
        pytest.param(0, 1, 100 * 1024**2, 1, id="at-least-one"),
        pytest.param(1, 0, 64 * GiB, 4, id="zero-cores-counts-as-one"),
    ],
)
def test_default_max_replicas(replicas: int, cores: int, memory: int | None, expected: int) -> None:
    assert default_max_replicas(replicas, cores, memory) == expected


def test_a_configured_max_replicas_wins() -> None:
    d = DeploymentConfig(name="d", service="m:C", replicas=2, max_replicas=3)
    assert max_replicas(d, 64, 512 * GiB) == 3
    assert max_replicas(DeploymentConfig(name="d", service="m:C"), 2, 4 * GiB) == 8


def test_usable_memory_is_known_on_linux() -> None:
    got = usable_memory_bytes()
    assert got is not None and got > 0
