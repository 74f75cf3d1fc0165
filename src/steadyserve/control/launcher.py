"""The one wrapper for replica subprocesses: start one with its socket pre-bound, signal it.

The gateway binds 127.0.0.1:0 itself and hands the listening fd to the child, so it knows the
port with no race and no stdout parsing; it then closes its own copy, so a dead replica's
port refuses connections at once instead of queueing them in a backlog nobody reads.
Children get their own session (Ctrl-C reaches only the gateway, which stages the
shutdown) and die with the gateway (PR_SET_PDEATHSIG in the child).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, DeploymentConfig
from ..errors import ConfigError
from ..observe import logfiles
from ..policies import gpus as gpu_policy

log = logging.getLogger("steadyserve.launcher")


@dataclass(slots=True)
class LaunchedReplica:
    process: asyncio.subprocess.Process
    host: str
    port: int
    flight_recorder: str | None = None  # file naming the inputs it is executing

    @property
    def pid(self) -> int:
        return self.process.pid


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


MAX_REMEMBERED = 4096  # replica ids whose start time is kept for their last words
REPLICA_MEMORY_BYTES = 512 * 1024 * 1024  # a small model's replica, for the default cap
REPLICAS_PER_CORE = 4


def usable_memory_bytes() -> int | None:
    """Physical memory, or the cgroup's limit when lower (a container); None if unknown."""
    try:
        found = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not on Linux
        return None
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                raw = f.read().strip()
        except OSError:
            continue
        if raw.isdigit():
            found = min(found, int(raw))
    return found


def default_max_replicas(replicas: int, cores: int, memory_bytes: int | None) -> int:
    """The most replicas a rollout may ask for when `max_replicas` is not configured:
    min(4 × cores, memory / 512 MiB), never below the configured count nor 1."""
    cap = REPLICAS_PER_CORE * max(1, cores)
    if memory_bytes is not None:
        cap = min(cap, memory_bytes // REPLICA_MEMORY_BYTES)
    return max(1, replicas, cap)


def max_replicas(deployment: DeploymentConfig, cores: int, memory_bytes: int | None) -> int:
    if deployment.max_replicas is not None:
        return deployment.max_replicas
    return default_max_replicas(deployment.replicas, cores, memory_bytes)


def torch_threads(config: Config, deployment: DeploymentConfig, cores: int) -> int:
    """replicas × threads ≤ cores by default, never below one thread."""
    if deployment.torch_threads is not None:
        return deployment.torch_threads
    return max(1, cores // max(1, config.total_replicas))


def _resolved_format(fmt: str) -> str:
    if fmt == "auto":
        return "text" if sys.stderr.isatty() else "json"
    return fmt


def replica_env(config: Config, deployment: DeploymentConfig, replica_id: str,
                base: dict[str, str]) -> dict[str, str]:
    """A replica process's environment: `base`, where services keep their data (the risk
    example's features and model), the deployment's `env`, who it is, and where its child
    calls go with which credential (its deployment's own: gateway.compose)."""
    env = dict(base)
    env["STEADYSERVE_DATABASE_URL"] = config.database
    env["STEADYSERVE_DATA_DIR"] = os.path.abspath(config.data_dir)
    env.update(deployment.env)
    env["PYTHONUNBUFFERED"] = "1"
    env["STEADYSERVE_REPLICA_ID"] = replica_id
    env["STEADYSERVE_DEPLOYMENT"] = deployment.name
    for name in CHILD_CALL_ENV:
        env.pop(name, None)
        if name in os.environ:
            env[name] = os.environ[name]
    token = _child_token(deployment.name)
    env.pop("STEADYSERVE_CHILD_TOKEN", None)
    if token is not None:
        env["STEADYSERVE_CHILD_TOKEN"] = token
    return env


CHILD_CALL_ENV = ("STEADYSERVE_GATEWAY_URL", "STEADYSERVE_GATEWAY_HOST")


def _no_child_token(deployment: str) -> str | None:
    return None


# the gateway process's KeyRing.child_token, set before replicas start (gateway.app); kept out
# of os.environ, which every replica inherits: each gets its own deployment's token only
_child_token: Callable[[str], str | None] = _no_child_token


def set_child_tokens(source: Callable[[str], str | None]) -> None:
    global _child_token
    _child_token = source


def replica_argv(config: Config, deployment: DeploymentConfig, replica_id: str, threads: int,
                 *, fd: str, parent_pid: str, recorder: str | None) -> list[str]:
    """The replica server's command line (`python -m steadyserve.replica`)."""
    argv = [
        sys.executable, "-m", "steadyserve.replica",
        "--service", deployment.service, "--fd", fd,
        "--name", replica_id, "--threads", str(threads),
        "--parent-pid", parent_pid,
        "--drain-timeout-s", str(config.supervisor.drain_timeout_s),
        "--log-level", config.log_level,
        "--log-format", _resolved_format(config.log_format),
        "--nice", str(config.supervisor.replica_nice),
    ]
    if recorder is not None:
        argv += ["--flight-recorder", recorder]
    sink = config.log_sink(replica_id)
    if sink is not None:
        argv += ["--log-file", os.path.abspath(sink.path), "--log-file-bytes", str(sink.max_bytes),
                 "--log-file-backups", str(sink.backups)]
    return argv


def visible_gpus(config: Config, env: Mapping[str, str] | None = None) -> list[str]:
    """The GPUs local replicas may be given: `gpus` from the config, else the gateway's own
    CUDA_VISIBLE_DEVICES, else what `nvidia-smi` lists (none when it is absent)."""
    if config.gpus is not None:
        return list(config.gpus)
    seen: Mapping[str, str] = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in seen:
        return [d.strip() for d in seen["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, timeout=10, check=True, text=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip().isdigit()]


class LocalLauncher:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.cores = usable_cores()
        self.gpus = visible_gpus(config) \
            if any(d.num_gpus > 0 for d in config.deployments) else []
        # the devices each live replica holds: (its process, [(device, share)])
        self.gpu_held: dict[str, tuple[Any, list[tuple[str, float]]]] = {}
        self.processes: dict[str, asyncio.subprocess.Process] = {}  # by replica id
        self.started_at: dict[str, float] = {}  # wall-clock start of each replica id's process

    def last_words(self, replica_id: str) -> str | None:
        """The last error its process logged (its log file), e.g. why its setup() failed."""
        if self.config.log_dir is None or replica_id not in self.started_at:
            return None
        path = Path(self.config.log_dir) / logfiles.file_name(replica_id)
        return logfiles.last_error(path, self.started_at[replica_id])

    def prune_logs(self) -> None:
        """Keep the log directory under `log_dir_max_bytes`, sparing the files of the gateway,
        its workers and every replica still running (called before each start)."""
        if self.config.log_dir is None:
            return
        self.processes = {r: p for r, p in self.processes.items() if p.returncode is None}
        running = ["gateway", *(f"worker-{i}" for i in range(1, self.config.gateway.workers)),
                   *self.processes]
        removed = logfiles.prune(Path(self.config.log_dir),
                                 self.config.observability.log_dir_max_bytes, running)
        if removed:
            log.info("pruned %d old log files", len(removed), extra={"dir": self.config.log_dir})

    def _gpus_for(self, deployment: DeploymentConfig,
                  replica_id: str) -> list[tuple[str, float]]:
        """The (device, share) pairs for a replica that asks for GPUs; ConfigError (a failed
        start, with the reason) when they are not free."""
        if deployment.num_gpus <= 0:
            return []
        self.gpu_held = {r: held for r, held in self.gpu_held.items()
                         if held[0].returncode is None}
        shares = gpu_policy.assign(deployment.num_gpus, self.gpus,
                                   {r: held[1] for r, held in self.gpu_held.items()})
        if shares is None:
            taken = gpu_policy.used({r: held[1] for r, held in self.gpu_held.items()})
            raise ConfigError(
                f"no GPU free for replica {replica_id}: it needs {deployment.num_gpus:g}; this "
                f"machine's GPUs {self.gpus or 'none found'} hold "
                f"{ {d: round(v, 3) for d, v in taken.items()} }")
        return shares

    async def launch(self, deployment: DeploymentConfig, replica_id: str) -> LaunchedReplica:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            sock.listen(1024)
            sock.set_inheritable(True)
            port = sock.getsockname()[1]
            self.prune_logs()
            threads = torch_threads(self.config, deployment, self.cores)
            recorder = os.path.join(self.config.data_dir, "flight", f"{replica_id}.keys")
            argv = replica_argv(self.config, deployment, replica_id, threads,
                                fd=str(sock.fileno()), parent_pid=str(os.getpid()),
                                recorder=recorder)
            env = replica_env(self.config, deployment, replica_id, base=dict(os.environ))
            gpus = self._gpus_for(deployment, replica_id)
            if gpus:  # its devices only; a share below 1 also caps its memory (examples)
                env["CUDA_VISIBLE_DEVICES"] = ",".join(d for d, _ in gpus)
                env["STEADYSERVE_GPU_SHARE"] = f"{min(1.0, deployment.num_gpus):g}"
            try:
                process = await asyncio.create_subprocess_exec(
                    *argv, pass_fds=(sock.fileno(),), start_new_session=True, env=env,
                    stdin=asyncio.subprocess.DEVNULL,
                )
            except OSError as exc:
                raise ConfigError(f"cannot start replica of {deployment.name}: {exc}") from exc
            self.processes[replica_id] = process
            self.started_at[replica_id] = time.time()
            while len(self.started_at) > MAX_REMEMBERED:  # ids of long-gone replicas
                del self.started_at[next(iter(self.started_at))]
            if gpus:
                self.gpu_held[replica_id] = (process, gpus)
            return LaunchedReplica(process, "127.0.0.1", port, recorder)
        finally:
            sock.close()

    @staticmethod
    def signal(replica: LaunchedReplica, sig: signal.Signals) -> None:
        if replica.process.returncode is None:
            try:
                os.kill(replica.pid, sig)
            except ProcessLookupError:
                pass
