"""GPUs for local replicas: the assignment policy (a table), the launcher's bookkeeping
(a replica's devices come back when its process ends), device discovery, and the config."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from steadyserve.config import Config, DeploymentConfig
from steadyserve.control.launcher import LocalLauncher, visible_gpus
from steadyserve.errors import ConfigError
from steadyserve.policies.gpus import assign

DEVICES = ["0", "1"]


@pytest.mark.parametrize(("need", "held", "want"), [
    (0, {}, []),
    (1, {}, [("0", 1.0)]),
    (1, {"a": [("0", 1.0)]}, [("1", 1.0)]),
    (1, {"a": [("0", 1.0)], "b": [("1", 1.0)]}, None),  # never overbooked
    (0.5, {}, [("0", 0.5)]),
    (0.5, {"a": [("0", 0.5)]}, [("0", 0.5)]),  # fractions pack onto the fullest that fits
    (0.5, {"a": [("1", 0.25)]}, [("1", 0.5)]),  # best fit: device 1 is the fuller one
    (0.5, {"a": [("0", 0.75)]}, [("1", 0.5)]),  # does not fit on 0
    (0.25, {"a": [("0", 0.5)], "b": [("0", 0.25)]}, [("0", 0.25)]),  # exactly full
    (1, {"a": [("0", 0.25)]}, [("1", 1.0)]),  # a whole device needs a free one
    (2, {}, [("0", 1.0), ("1", 1.0)]),
    (2, {"a": [("1", 0.1)]}, None),  # several whole devices: nothing else on them
    (3, {}, None),
    (1.5, {}, None),  # a fraction above 1 is not a thing
])
def test_assign(need, held, want):
    assert assign(need, DEVICES, held) == want


def test_no_devices_no_gpu_replica():
    assert assign(0.5, [], {}) is None and assign(0, [], {}) == []


def config(num_gpus: float, gpus: tuple[str, ...] | None = ("0",)) -> Config:
    return Config(deployments=(DeploymentConfig(name="m", service="x:M", num_gpus=num_gpus),),
                  gpus=gpus)


def test_the_launcher_books_devices_and_gets_them_back_when_a_replica_ends():
    launcher = LocalLauncher(config(0.5))
    d = launcher.config.deployments[0]
    alive = [SimpleNamespace(returncode=None) for _ in range(3)]
    for i in range(2):
        launcher.gpu_held[f"m-{i}"] = (alive[i], launcher._gpus_for(d, f"m-{i}"))
    assert [held for _, held in launcher.gpu_held.values()] == [[("0", 0.5)], [("0", 0.5)]]
    with pytest.raises(ConfigError, match=r"no GPU free for replica m-2: it needs 0.5; this "
                                          r"machine's GPUs \['0'\] hold \{'0': 1.0\}"):
        launcher._gpus_for(d, "m-2")
    alive[0].returncode = -9  # m-0 died: its share is free again
    assert launcher._gpus_for(d, "m-2") == [("0", 0.5)]


def test_cpu_replicas_get_no_device_and_no_detection():
    launcher = LocalLauncher(config(0, gpus=None))
    assert launcher.gpus == [] and launcher._gpus_for(launcher.config.deployments[0], "m-0") == []


@pytest.mark.parametrize(("cfg", "env", "want"), [
    (("3", "GPU-abc"), {"CUDA_VISIBLE_DEVICES": "0"}, ["3", "GPU-abc"]),  # the config wins
    (None, {"CUDA_VISIBLE_DEVICES": "1, 2,"}, ["1", "2"]),
    (None, {"CUDA_VISIBLE_DEVICES": ""}, []),  # the gateway was given none
])
def test_visible_gpus(cfg, env, want):
    assert visible_gpus(config(0, gpus=cfg), env) == want


@pytest.mark.parametrize(("kw", "error"), [
    ({"num_gpus": 1.5}, "whole number of GPUs"),
    ({"num_gpus": 65}, "num_gpus in"),
])
def test_bad_gpu_requests_are_refused(kw, error):
    with pytest.raises(ConfigError, match=error):
        DeploymentConfig(name="m", service="x:M", **kw)


def test_bad_device_names_are_refused():
    with pytest.raises(ConfigError, match="device indices or UUIDs"):
        config(1, gpus=("0; rm -rf /",))
