"""Start real `steadyserve run` processes on free loopback ports; stop them and check that
nothing they started is left behind. Also the outside systems tests share: a fresh PostgreSQL
schema per test (`pg_url`, `pg_admin`) and a fresh key prefix on the shared Redis
(`shared_redis`); without them those tests skip, except under CI=true, where they fail."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import psutil
import psycopg
import pytest
import redis

from steadyserve.cache.redis_store import RedisStore

HERE = Path(__file__).parent
PG_URL = os.environ.get("STEADYSERVE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("STEADYSERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def unavailable(what: str, exc: BaseException) -> None:
    """A service the test needs is missing: fail under CI=true (CI runs it), else skip."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is required under CI=true: {exc}")
    pytest.skip(f"{what} not reachable: {exc}")


def connect_pg_admin() -> psycopg.Connection[tuple[object, ...]]:
    try:
        return psycopg.connect(PG_URL, connect_timeout=3, autocommit=True)
    except psycopg.Error as exc:
        unavailable(f"PostgreSQL at {PG_URL}", exc)
        raise


@pytest.fixture
def pg_admin() -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    admin = connect_pg_admin()
    yield admin
    admin.close()


@pytest.fixture
def pg_url(pg_admin: psycopg.Connection[tuple[object, ...]]) -> Iterator[str]:
    """A URL whose tables land in a fresh schema (dropped at the end), and whose connections
    carry a unique application_name (so a test can find and kill exactly its own sessions)."""
    yield from fresh_schema_url(pg_admin)


def fresh_schema_url(pg_admin: psycopg.Connection[tuple[object, ...]]) -> Iterator[str]:
    """`pg_url`'s body, for a fixture that needs a second fresh schema."""
    schema = f"ss_test_{uuid.uuid4().hex[:12]}"
    pg_admin.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options={quote(f'-csearch_path={schema}')}&application_name={schema}"
    finally:
        pg_admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def shared_redis() -> Iterator[tuple[str, str]]:
    """(url, a fresh key prefix) on the shared Redis; the prefix's keys are deleted at the end."""
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=3, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        unavailable(f"Redis at {REDIS_URL}", exc)
    prefix = f"ss-test-{uuid.uuid4().hex[:12]}:"
    try:
        yield REDIS_URL, prefix
    finally:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
        client.close()
@pytest.fixture
def prefix(shared_redis: tuple[str, str]) -> str:
    """A fresh key prefix on the shared Redis (its keys are deleted at the end)."""
    return shared_redis[1]


async def store(prefix: str, origin: str = "a", **kw: Any) -> RedisStore:
    """A started RedisStore on the shared Redis under `prefix`, with short timeouts."""
    s = RedisStore(REDIS_URL, origin=origin, prefix=prefix, timeout_s=0.5, retry_s=0.1, **kw)
    await s.start()
    assert s.up
    return s


STEADYSERVE = [sys.executable, "-m", "steadyserve.cli.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    data_dir: Path

    def admin_headers(self) -> dict[str, str]:
        """Authorization of the local admin key the gateway wrote into its data directory."""
        key_file = self.data_dir / "admin.key"
        return {"authorization": f"Bearer {key_file.read_text().strip()}"} if key_file.exists() \
            else {}

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 30), **kw)

    def replica_pids(self) -> list[int]:
        return [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]

    def status(self, deployment: str) -> dict:
        return httpx.get(f"{self.url}/v1/deployments/{deployment}", timeout=5).json()

    def wait_ready(self, timeout_s: float) -> float:
        started = time.monotonic()
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited early:\n{self.log.read_text()[-4000:]}")
            try:
                # /readyz needs one replica per deployment; tests want every replica up
                listing = httpx.get(f"{self.url}/v1/deployments", timeout=1).json()["deployments"]
                if all(d["ready_replicas"] == d["desired_replicas"] for d in listing):
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"not ready in {timeout_s}s:\n{self.log.read_text()[-4000:]}")

    def wait_ready_replicas(self, deployment: str, ready: int, timeout_s: float) -> None:
        """Until `deployment` has `ready` replicas in rotation (when another deployment of the
        gateway never gets ready, on purpose, and `wait_ready` would wait for it too)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited early:\n{self.log.read_text()[-4000:]}")
            try:
                if self.status(deployment)["ready_replicas"] == ready:
                    return
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{deployment}: not {ready} ready replicas in "
                                     f"{timeout_s}s:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> list[int]:
        """Signal the gateway, wait for it, and return the replica pids still alive."""
        children = self.replica_pids() if self.proc.poll() is None else []
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError("gateway did not stop in time") from None
        deadline = time.monotonic() + 10
        alive = children
        while time.monotonic() < deadline:
            alive = [p for p in children if _alive(p)]
            if not alive:
                break
            time.sleep(0.05)
        return alive


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def start(args: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> Running:
    port = free_port()
    log = tmp_path / f"gateway-{port}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(
        [*STEADYSERVE, "run", *args, "--port", str(port), "--log-format", "json"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=tmp_path, env=full_env,
    )
    data_dir = _data_dir(args, tmp_path, full_env)
    return Running(proc, f"http://127.0.0.1:{port}", log,
                   data_dir if data_dir.is_absolute() else tmp_path / data_dir)


def _data_dir(args: list[str], cwd: Path, env: dict[str, str]) -> Path:
    """Where the gateway keeps its state (its admin key): the environment, else the config
    file's `data_dir` (--config, or ./steadyserve.toml with no TARGET), else .steadyserve."""
    if "STEADYSERVE_DATA_DIR" in env:
        return Path(env["STEADYSERVE_DATA_DIR"])
    config = args[args.index("--config") + 1] if "--config" in args else None
    if config is None and not any(a and not a.startswith("-") and ":" in a for a in args):
        config = "steadyserve.toml"
    if config is not None:
        path = Path(config) if Path(config).is_absolute() else cwd / config
        if path.is_file():
            data_dir = tomllib.loads(path.read_text()).get("data_dir")
            if data_dir:
                return Path(data_dir)
    return Path(".steadyserve")


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    started: list[Running] = []

    def factory(args: list[str], ready_timeout_s: float = 60, **kw) -> Running:
        running = start(args, tmp_path, **kw)
        started.append(running)
        running.wait_ready(ready_timeout_s)
        return running

    yield factory
    for running in started:
        leftover = running.stop(signal.SIGTERM)
        for pid in leftover:  # never leave our own children behind, even when a test failed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


ECHO = str(HERE / "services" / "echo.py") + ":Echo"


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """A state Database on each backend: a SQLite file, then PostgreSQL (a fresh schema)."""
    from steadyserve.store import Database

    url = f"sqlite:///{tmp_path}/state.db" if request.param == "sqlite" \
        else request.getfixturevalue("pg_url")
    database = Database(url)
    yield database
    database.close()


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster of the test's own (initdb in a temporary directory, a free port),
    so a test may stop and start it without touching the shared one."""

    directory: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", _pg_bin("pg_ctl"), "-D",
                        str(self.directory / "data"), *args], check=True, timeout=60,
                       capture_output=True)

    def start(self) -> None:
        self._ctl("-o", f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 "
                  "-c fsync=off", "-l", str(self.directory / "log"), "-w", "start")

    def stop(self) -> None:
        self._ctl("-m", "fast", "-w", "stop")


def _pg_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if not found:
        unavailable(f"PostgreSQL's {name}", FileNotFoundError(name))
    return str(found[-1])


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    import shutil
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="ss-pg-"))
    shutil.chown(directory, "postgres", "postgres")
    pg = PrivatePostgres(directory, free_port())
    try:
        subprocess.run(["runuser", "-u", "postgres", "--", _pg_bin("initdb"), "-A", "trust",
                        "-U", "postgres", "-D", str(directory / "data")], check=True,
                       timeout=120, capture_output=True)
        pg.start()
    except (subprocess.SubprocessError, OSError) as exc:
        shutil.rmtree(directory, ignore_errors=True)
        unavailable("a private PostgreSQL cluster (initdb, pg_ctl as user postgres)", exc)
    try:
        yield pg
    finally:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            pg.stop()
        shutil.rmtree(directory, ignore_errors=True)
