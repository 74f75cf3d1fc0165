"""control/launcher.py: torch thread budget per replica."""

from __future__ import annotations

import pytest

from steadyserve.config import Config, DeploymentConfig
from steadyserve.control.launcher import torch_threads, usable_cores


def config(*replicas: int, threads: int | None = None) -> Config:
    return Config(deployments=tuple(
        DeploymentConfig(name=f"d{i}", service="app.py:M", replicas=r,
                         torch_threads=threads if i == 0 else None)
        for i, r in enumerate(replicas)
    ))


@pytest.mark.parametrize(
    ("replicas", "cores", "expected"),
    [
        pytest.param((1,), 16, 16, id="one-replica-gets-all-cores"),
        pytest.param((2,), 16, 8, id="two-replicas-split"),
        pytest.param((3,), 16, 5, id="floor-division"),
        pytest.param((2, 2), 8, 2, id="counts-all-deployments"),
        pytest.param((4, 4), 4, 1, id="more-replicas-than-cores-at-least-1"),
        pytest.param((1,), 1, 1, id="single-core"),
        pytest.param((1,), 0, 1, id="zero-cores-still-1"),
    ],
)
def test_threads_share_cores(replicas, cores, expected):
    c = config(*replicas)
    for d in c.deployments:
        assert torch_threads(c, d, cores) == expected


@pytest.mark.parametrize(
    ("threads", "cores"),
    [pytest.param(3, 16, id="explicit-below-share"), pytest.param(32, 4, id="explicit-above-cores")],
)
def test_explicit_torch_threads_wins(threads, cores):
    c = config(2, 2, threads=threads)
    assert torch_threads(c, c.deployments[0], cores) == threads
    assert torch_threads(c, c.deployments[1], cores) == max(1, cores // 4)


def test_usable_cores_is_positive():
    assert usable_cores() >= 1
