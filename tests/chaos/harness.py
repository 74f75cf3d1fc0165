"""Start a real chaos gateway (tests.chaos.gateway_proc) with fault proxies in front of its
replicas, steer faults through control files, and stop it leaving no process behind.

    def test_something(chaos_gateway):
        chaos = chaos_gateway(replicas=3)          # blocks until every replica is ready
        chaos.set_proxy("work-0", latency_s=0.2)   # faults between gateway and replica
        chaos.set_service("work-1", fail_500=True) # faults inside the replica's handler
        chaos.kill("work-2", signal.SIGKILL)
        await chaos.replicas(); await chaos.metric("steadyserve_requests_total", code="200")
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .proxied import proxy_control_path, service_control_path
from .services import SERVICE_KEYS

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICE = f"{Path(__file__).with_name('services.py')}:Work"
FAULTPROXY = str(Path(__file__).with_name("faultproxy.py"))
DEPLOYMENT = "work"
PROXY_KEYS = frozenset({"latency_s", "blackhole", "reset_fraction", "reset_midstream_fraction",
                        "bandwidth_bytes_per_s"})
STOP_TIMEOUT_S = 20.0
LEFTOVER_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _alive(p: psutil.Process) -> bool:
    try:
        return bool(p.is_running() and p.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return [str(a) for a in p.cmdline()]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


@dataclass
class Chaos:
    """One running chaos gateway. Blocking helpers are cheap and local (files, signals,
    psutil); the ones that talk HTTP to the gateway are coroutines, so they can run beside
    a load generator without stalling its schedule."""

    proc: subprocess.Popen[bytes]
    port: int
    control_dir: Path
    log_path: Path
    config_path: Path
    replica_count: int
    data_dir: Path
    _descendants: dict[int, psutil.Process] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def gateway_pid(self) -> int:
        return self.proc.pid

    def admin_headers(self) -> dict[str, str]:
        """The local admin key the gateway wrote into its data directory (admin routes)."""
        token = (self.data_dir / "admin.key").read_text().strip()
        return {"Authorization": f"Bearer {token}"}

    def work_url(self, handler: str = "work") -> str:
        return f"{self.url}/v1/deployments/{DEPLOYMENT}/{handler}"

    def log_text(self, tail_chars: int = 8000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail_chars:]
        except FileNotFoundError:
            return ""

    # faults --------------------------------------------------------------------------------
    def set_proxy(self, replica_id: str, **faults: Any) -> None:
        """Replace the proxy faults of one replica slot (no keyword: no faults). The proxy
        picks them up within ~50 ms. Keys: see faultproxy.py."""
        unknown = sorted(set(faults) - PROXY_KEYS)
        if unknown:
            raise ValueError(f"unknown proxy faults {unknown}; known: {sorted(PROXY_KEYS)}")
        write_json_atomic(proxy_control_path(self.control_dir, replica_id), faults)

    def set_service(self, replica_id: str, **flags: Any) -> None:
        """Replace the service faults of one replica slot (no keyword: none). Read by the
        replica on its next request. Keys: fail_500, fail_503, delay_s."""
        unknown = sorted(set(flags) - SERVICE_KEYS)
        if unknown:
            raise ValueError(f"unknown service flags {unknown}; known: {sorted(SERVICE_KEYS)}")
        write_json_atomic(service_control_path(self.control_dir, replica_id), flags)

    def clear_faults(self) -> None:
        for i in range(self.replica_count):
            self.set_proxy(f"{DEPLOYMENT}-{i}")
            self.set_service(f"{DEPLOYMENT}-{i}")

    # processes -----------------------------------------------------------------------------
    def children(self) -> list[psutil.Process]:
        try:
            return list(psutil.Process(self.proc.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            return []

    def replica_pid(self, replica_id: str) -> int | None:
        """The live replica process of a slot (from the process table: no HTTP)."""
        for p in self.children():
            cmd = _cmdline(p)
            if "steadyserve.replica" in cmd and "--name" in cmd and \
                    cmd[cmd.index("--name") + 1:][:1] == [replica_id] and _alive(p):
                return int(p.pid)
        return None

    def proxy_pid(self, replica_id: str) -> int | None:
        control = str(proxy_control_path(self.control_dir, replica_id))
        for p in self.children():
            cmd = _cmdline(p)
            if FAULTPROXY in cmd and control in cmd and _alive(p):
                return int(p.pid)
        return None

    def proxy_pids(self) -> list[int]:
        return [p.pid for p in self.children() if FAULTPROXY in _cmdline(p) and _alive(p)]

    def kill(self, replica_id: str, sig: int = signal.SIGKILL) -> int:
        """Signal the replica process of a slot (a child of our gateway); returns its pid."""
        pid = self.replica_pid(replica_id)
        if pid is None:
            raise LookupError(f"no live replica process for {replica_id}")
        os.kill(pid, sig)
        return pid

    def gateway_rss_bytes(self) -> int:
        return int(psutil.Process(self.proc.pid).memory_info().rss)

    # HTTP views ------------------------------------------------------------------------------
    async def get_json(self, path: str, timeout_s: float = 10.0) -> Any:
        async with httpx.AsyncClient(base_url=self.url, timeout=timeout_s) as c:
            r = await c.get(path)
            r.raise_for_status()
            return r.json()

    async def deployment(self) -> dict[str, Any]:
        data: dict[str, Any] = await self.get_json(f"/v1/deployments/{DEPLOYMENT}")
        return data

    async def replicas(self) -> list[dict[str, Any]]:
        """[{id, pid, state, restarts, address, last_exit_code, ready_for_s}, …]"""
        return list((await self.deployment())["replicas"])

    async def metric(self, name: str, timeout_s: float = 10.0, **labels: str) -> float:
        """Sum of the samples called `name` (a counter may be named with or without `_total`)
        whose labels include `labels`; 0.0 when none matches. Replica metrics merged into the
        gateway's /metrics count too."""
        async with httpx.AsyncClient(base_url=self.url, timeout=timeout_s) as c:
            r = await c.get("/metrics")
            r.raise_for_status()
            text = r.text
        return sum_samples(text, name, **labels)

    async def metric_by(self, name: str, by: tuple[str, ...], **labels: str) -> dict[str, float]:
        """`name` summed per value of the labels in `by` ("interactive/at_once"), for a
        failure's figures: which rule shed, which outcome the attempts had."""
        async with httpx.AsyncClient(base_url=self.url, timeout=10.0) as c:
            r = await c.get("/metrics")
            r.raise_for_status()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(r.text):
            for sample in family.samples:
                if sample.name not in (name, f"{name}_total") or not sample.value:
                    continue
                if all(sample.labels.get(k) == str(v) for k, v in labels.items()):
                    key = "/".join(sample.labels.get(b, "") for b in by)
                    out[key] = out.get(key, 0.0) + float(sample.value)
        return out

    async def wait_ready(self, timeout_s: float = 30.0) -> float:
        """Poll until every replica is in rotation; returns the seconds it took."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            self.check_running()
            try:
                if _all_ready((await self.get_json("/v1/deployments", timeout_s=2))["deployments"]):
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError(f"replicas not all ready in {timeout_s}s:\n{self.log_text()}")

    # lifecycle -------------------------------------------------------------------------------
    def check_running(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"chaos gateway exited ({self.proc.returncode}):\n{self.log_text()}")

    def wait_ready_blocking(self, timeout_s: float) -> float:
        started = time.monotonic()
        with httpx.Client(base_url=self.url, timeout=2) as c:
            while time.monotonic() - started < timeout_s:
                self.check_running()
                try:
                    if _all_ready(c.get("/v1/deployments").json()["deployments"]):
                        return time.monotonic() - started
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                time.sleep(0.1)
        raise AssertionError(f"replicas not all ready in {timeout_s}s:\n{self.log_text()}")

    def remember_descendants(self) -> None:
        for p in self.children():
            self._descendants.setdefault(p.pid, p)

    def stop(self) -> list[str]:
        """SIGTERM the gateway (SIGKILL after 20 s). Returns what went wrong: a gateway that
        needed SIGKILL, descendants still alive afterwards (those are then killed)."""
        problems: list[str] = []
        self.remember_descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                problems.append(f"gateway did not stop within {STOP_TIMEOUT_S}s of SIGTERM")
                self.proc.kill()
                self.proc.wait(5)
        deadline = time.monotonic() + LEFTOVER_TIMEOUT_S
        left = list(self._descendants.values())
        while time.monotonic() < deadline:
            left = [p for p in left if _alive(p)]
            if not left:
                break
            time.sleep(0.05)
        for p in left:
            problems.append(f"left behind: pid {p.pid} {' '.join(_cmdline(p))[:200]}")
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()  # one of ours (a descendant of our gateway): never leave it running
        return problems


def _all_ready(listing: list[dict[str, Any]]) -> bool:
    return bool(listing) and all(d["ready_replicas"] == d["desired_replicas"] for d in listing)


def sum_samples(metrics_text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name not in (name, f"{name}_total"):
                continue
            if all(sample.labels.get(k) == str(v) for k, v in labels.items()):
                total += float(sample.value)
    return total


def config_toml(replicas: int, extra_toml: str = "", deployment_toml: str = "") -> str:
    """`extra_toml` comes first (top-level keys, [gateway], [supervisor] tables);
    `deployment_toml` lines go inside [deployments.work]."""
    return (
        f"{extra_toml.strip()}\n\n"
        f"[deployments.{DEPLOYMENT}]\n"
        f"service = {json.dumps(SERVICE)}\n"
        f"replicas = {replicas}\n"
        f"{deployment_toml.strip()}\n"
    )


def launch(tmp_path: Path, replicas: int = 3, extra_toml: str = "", deployment_toml: str = "",
           env: dict[str, str] | None = None) -> Chaos:
    """Start a chaos gateway (not waiting for readiness)."""
    n = len(list(tmp_path.glob("chaos-*")))
    base = tmp_path / f"chaos-{n}"
    control_dir = base / "control"
    control_dir.mkdir(parents=True)
    config_path = base / "steadyserve.toml"
    config_path.write_text(config_toml(replicas, extra_toml, deployment_toml))
    port = free_port()
    log_path = base / "gateway.log"
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    # each chaos gateway keeps its state (database, admin key, flight records) in its own
    # directory, not in the repository it runs from
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "CHAOS_CONTROL_DIR": str(control_dir),
                "PYTHONPATH": pythonpath, "STEADYSERVE_DATA_DIR": str(base / "data"),
                **(env or {})}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.chaos.gateway_proc", "--config", str(config_path),
             "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO_ROOT,
            env=full_env,
        )
    return Chaos(proc, port, control_dir, log_path, config_path, replicas,
                 Path(full_env["STEADYSERVE_DATA_DIR"]))


class StartChaos(Protocol):
    def __call__(self, replicas: int = 3, extra_toml: str = "", *, deployment_toml: str = "",
                 ready_timeout_s: float = 30.0, env: dict[str, str] | None = None) -> Chaos: ...


@pytest.fixture
def chaos_gateway(tmp_path: Path) -> Iterator[StartChaos]:
    """A factory: `chaos_gateway(replicas=3, extra_toml="")` starts a chaos gateway and
    returns once every replica is ready. At teardown every gateway is stopped (SIGTERM, then
    SIGKILL after 20 s) and the test fails if any replica or proxy process is left."""
    started: list[Chaos] = []

    def start(replicas: int = 3, extra_toml: str = "", *, deployment_toml: str = "",
              ready_timeout_s: float = 30.0, env: dict[str, str] | None = None) -> Chaos:
        chaos = launch(tmp_path, replicas, extra_toml, deployment_toml, env)
        started.append(chaos)
        chaos.wait_ready_blocking(ready_timeout_s)
        chaos.remember_descendants()
        return chaos

    yield start
    problems: list[str] = []
    for chaos in started:
        found = chaos.stop()
        if found:
            problems += found
            problems.append(f"gateway log tail:\n{chaos.log_text(4000)}")
    assert not problems, "\n".join(problems)
