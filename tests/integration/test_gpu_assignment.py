"""Local replicas get the GPUs their deployment asks for, as CUDA_VISIBLE_DEVICES, on the
machine's devices (named in the config here: the test runs on CPUs, and no device is touched):
fractions share a device, a device is never overbooked, and a replica that cannot get one
fails its start with the reason while the others serve."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import psutil
import pytest

from .conftest import HERE, start

pytestmark = [pytest.mark.integration]


def test_replicas_get_their_gpus_and_a_fourth_half_does_not_fit(tmp_path: Path) -> None:
    (tmp_path / "steadyserve.toml").write_text(f"""
data_dir = "{tmp_path / 'state'}"
gpus = ["0", "1"]
[alerting]
enabled = false
[deployments.echo]
service = "{HERE / 'services' / 'echo.py'}:Echo"
replicas = 3
num_gpus = 0.5
[deployments.big]
service = "{HERE / 'services' / 'echo.py'}:Echo"
replicas = 1
num_gpus = 1
""")
    gw = start([], tmp_path)
    try:
        gw.wait_ready_replicas("echo", 3, 60)
        deadline = time.monotonic() + 30
        while "no GPU free for replica big-0" not in gw.log.read_text():
            assert time.monotonic() < deadline, gw.log.read_text()[-3000:]
            time.sleep(0.1)
        listing = {d["name"]: d for d in httpx.get(f"{gw.url}/v1/deployments",
                                                  timeout=5).json()["deployments"]}
        devices = sorted(psutil.Process(r["pid"]).environ()["CUDA_VISIBLE_DEVICES"]
                         for r in listing["echo"]["replicas"])
        shares = {psutil.Process(r["pid"]).environ()["STEADYSERVE_GPU_SHARE"]
                  for r in listing["echo"]["replicas"]}
        # echo's three halves: two pack device 0, the third takes half of 1; big needs a
        # whole free device and there is none
        assert devices == ["0", "0", "1"] and shares == {"0.5"}
        assert listing["big"]["ready_replicas"] == 0
        with httpx.Client(base_url=gw.url, timeout=10) as c:
            assert c.post("/v1/deployments/echo/echo", json={"text": "x"}).status_code == 200
    finally:
        assert gw.stop() == []
