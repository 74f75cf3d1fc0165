"""`ProxiedLauncher`: start each replica as usual, then a fault proxy in front of it.

The gateway is handed the PROXY's port as the replica's address, so every byte between
gateway and replica (requests, /readyz, /info, /metrics) crosses the proxy and its faults.
The proxy's control file is `<CHAOS_CONTROL_DIR>/proxy-<replica_id>.json`; it is the same
file for every generation of a replica slot, so faults survive a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import sys
import time
from pathlib import Path

from steadyserve.config import Config, DeploymentConfig
from steadyserve.control.launcher import LaunchedReplica, LocalLauncher
from steadyserve.errors import ConfigError

FAULTPROXY = Path(__file__).with_name("faultproxy.py")
PROXY_START_TIMEOUT_S = 10.0
PROXY_STOP_TIMEOUT_S = 2.0

_launches = itertools.count()


def control_dir_from_env() -> Path:
    value = os.environ.get("CHAOS_CONTROL_DIR")
    if not value:
        raise ConfigError("ProxiedLauncher needs CHAOS_CONTROL_DIR in the environment")
    return Path(value)


def proxy_control_path(control_dir: Path, replica_id: str) -> Path:
    return control_dir / f"proxy-{replica_id}.json"


def service_control_path(control_dir: Path, replica_id: str) -> Path:
    return control_dir / f"service-{replica_id}.json"


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _read_port_file(path: Path) -> str:
    """Tiny local file, written atomically by the proxy: a blocking read is fine."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


async def start_proxy(target_port: int, control: Path, port_file: Path,
                      timeout_s: float = PROXY_START_TIMEOUT_S) -> tuple[asyncio.subprocess.Process, int]:
    """Start a faultproxy child and wait (bounded) for the port it listens on."""
    _remove(port_file)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(FAULTPROXY), "--target-port", str(target_port),
        "--port-file", str(port_file), "--control", str(control),
        stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            break
        text = _read_port_file(port_file)
        if text:
            return proc, int(text)
        await asyncio.sleep(0.02)
    await stop_process(proc)
    raise ConfigError(f"fault proxy for port {target_port} did not start "
                      f"(exit code {proc.returncode})")


async def stop_process(proc: asyncio.subprocess.Process, timeout_s: float = PROXY_STOP_TIMEOUT_S) -> None:
    """SIGTERM, wait a little, SIGKILL: only this one process, by its pid."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), timeout_s)


class ProxiedLauncher(LocalLauncher):
    def __init__(self, config: Config, control_dir: str | os.PathLike[str] | None = None) -> None:
        super().__init__(config)
        self.control_dir = Path(control_dir) if control_dir is not None else control_dir_from_env()
        self.control_dir.mkdir(parents=True, exist_ok=True)
        self._reapers: set[asyncio.Task[None]] = set()
        self.proxies: dict[str, asyncio.subprocess.Process] = {}  # replica id → current proxy

    async def launch(self, deployment: DeploymentConfig, replica_id: str) -> LaunchedReplica:
        replica = await super().launch(deployment, replica_id)
        port_file = self.control_dir / "ports" / f"proxy-{replica_id}-{next(_launches)}.port"
        port_file.parent.mkdir(exist_ok=True)
        try:
            proxy, proxy_port = await start_proxy(
                replica.port, proxy_control_path(self.control_dir, replica_id), port_file
            )
        except BaseException:
            self.signal(replica, signal.SIGKILL)  # no proxy: the slot must not keep a replica
            raise
        self.proxies[replica_id] = proxy
        task = asyncio.get_running_loop().create_task(
            self._reap(replica_id, replica.process, proxy), name=f"reap-proxy-{replica_id}"
        )
        self._reapers.add(task)
        task.add_done_callback(self._reapers.discard)
        return LaunchedReplica(replica.process, replica.host, proxy_port, replica.flight_recorder)

    async def _reap(self, replica_id: str, replica: asyncio.subprocess.Process,
                    proxy: asyncio.subprocess.Process) -> None:
        """When the replica exits, its proxy goes too (its port then refuses connections)."""
        try:
            await replica.wait()
        except asyncio.CancelledError:
            # the loop is closing: do not leave the proxy behind (PDEATHSIG is the backstop)
            if proxy.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proxy.pid, signal.SIGTERM)
            raise
        await stop_process(proxy)
        if self.proxies.get(replica_id) is proxy:
            del self.proxies[replica_id]
