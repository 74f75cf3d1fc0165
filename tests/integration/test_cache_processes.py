"""The response cache with real processes, a real Redis and a real PostgreSQL.

  * the risk example (SQLite, then PostgreSQL): an update is visible to the very next read,
    also while other clients hammer the same account, on every replica;
  * bad input and a database cut off (through a TCP proxy in this process): 404 / 400 / 503
    with Retry-After, and recovery without a restart;
  * two gateways sharing the Redis L2: a hit from the other gateway's answer, and an
    invalidation that reaches the other gateway's L1;
  * Redis killed under load: no client error, L2 marked down, and back by itself;
  * every replica killed: stale-if-error answers the cached keys, 503 fast for the rest;
  * bugs found while writing these tests, now fixed: a read after an update never joins an
    older computation; a gateway back from an L2 outage drops what may have missed
    invalidations; and an invalidation on one gateway is seen by the next read on another
    (the writer waits for the other gateways' acknowledgements).

PostgreSQL (127.0.0.1:5432, or STEADYSERVE_TEST_POSTGRES_URL) runs in a fresh schema per test
and the shared Redis (127.0.0.1:6379, or STEADYSERVE_TEST_REDIS_URL) under a fresh key
prefix; without them those tests skip, except under CI=true, where they fail. The "Redis
killed" test runs its own redis-server on a free port. Tests name those fixtures before
`serve`, so their gateways stop before the schema is dropped or the Redis killed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from steadyserve.examples.risk.model import RiskModel, load_or_train

from .conftest import HERE, Running, free_port, unavailable

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RISK = "steadyserve.examples.risk.service:RiskScorer"
CACHE_ECHO = str(HERE / "services" / "cache_echo.py")
TX = {"account_id": 42, "amount": 129.9, "merchant_category": "crypto", "hour": 3}
SCORE = "/v1/deployments/risk/score"
ACCOUNT = "/v1/deployments/risk/account"
UPDATE = "/v1/deployments/risk/update_account"
CACHE = "x-steadyserve-cache"

Serve = Callable[..., Running]


def _toml(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


# ---- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def risk_model(tmp_path_factory: pytest.TempPathFactory) -> RiskModel:
    """Trained once for the module; each test copies the file into its data directory (so
    replicas load it instead of training) and scores with it here to know the right answer."""
    return load_or_train(tmp_path_factory.mktemp("risk-model"))


def _data_dir(tmp_path: Path, model: RiskModel) -> Path:
    data_dir = tmp_path / "data"
    data_dir.mkdir(exist_ok=True)
    assert model.path is not None
    shutil.copy(model.path, data_dir / model.path.name)
    return data_dir


class OwnRedis:
    """A redis-server of this test's own on a free port, killed and restarted by PID."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = tmp_path / f"redis-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT, cwd=self.log.parent)
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.RedisError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise AssertionError(f"redis-server did not start:\n{self.log.read_text()}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    if shutil.which("redis-server") is None:
        unavailable("redis-server", FileNotFoundError("redis-server is not on PATH"))
    server = OwnRedis(tmp_path)
    try:
        yield server
    finally:
        server.kill()


class TcpProxy:
    """127.0.0.1:<port> → target, in threads of this process. `stop` closes the listener and
    every connection (the database 'goes away'); `start` listens again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.accepted = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        listener.settimeout(0.1)
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            with self._lock:
                if self._listener is not listener:
                    return
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target, timeout=3)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                if self._listener is not listener:  # stopped meanwhile
                    _close(client)
                    _close(upstream)
                    return
                self._conns |= {client, upstream}
                self.accepted += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns -= {src, dst}
            _close(src)
            _close(dst)

    def stop(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        if listener is not None:
            listener.close()
        for conn in conns:
            _close(conn)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


# ---- helpers -----------------------------------------------------------------------------------

def samples(gw: Running, name: str, **labels: str) -> dict[str, float]:
    """{replica label (or ""): value} of one metric sample name in the gateway's /metrics."""
    text = httpx.get(f"{gw.url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                out[s.labels.get("replica", "")] = s.value
    return out


def wait_for(what: str, check: Callable[[], bool], timeout_s: float, every_s: float = 0.05) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(every_s)
    return time.monotonic() - started


def score(c: httpx.Client, tx: dict[str, Any] = TX, **headers: str) -> tuple[float, str]:
    r = c.post(SCORE, json={"transactions": [tx]}, headers=headers)
    assert r.status_code == 200, r.text
    return float(r.json()[0]["score"]), r.headers.get(CACHE, "-")


def expected_score(model: RiskModel, row: dict[str, Any], tx: dict[str, Any] = TX) -> float:
    return model.score([row], [tx])[0][0]


def risk_config(tmp_path: Path, data_dir: Path, *, replicas: int, database_url: str | None = None,
                name: str = "risk.toml") -> Path:
    env = f"\n[deployments.risk.env]\nSTEADYSERVE_DATABASE_URL = {_toml(database_url)}\n" \
        if database_url else ""
    path = tmp_path / name
    path.write_text(f"""
data_dir = {_toml(str(data_dir))}

[alerting]
enabled = false

[cache]
affinity = false  # every replica sees every account: each must drop its feature rows

[deployments.risk]
service = {_toml(RISK)}
replicas = {replicas}
{env}""")
    return path


def update_then_read(gw: Running, model: RiskModel) -> None:
    """Warm the response cache and both replicas' feature caches; update account 42; the
    very next score is computed afresh from the new row, and both replicas dropped theirs."""
    with gw.client() as c:
        timings: list[float] = []
        outcomes: list[str] = []
        for _ in range(5):
            t0 = time.perf_counter()
            s, outcome = score(c)
            timings.append(time.perf_counter() - t0)
            outcomes.append(outcome)
        print(f"\n  score 42 x5: {outcomes}, latencies {[_ms(t) for t in timings]}")
        assert outcomes == ["miss", "hit", "hit", "hit", "hit"]
        before = s
        row = c.post(ACCOUNT, json={"account_id": 42}, headers={"cache-control": "no-store"}).json()
        assert before == pytest.approx(expected_score(model, row), rel=1e-9, abs=1e-12)

        # every replica reads account 42 through its feature cache (no-store: past the gateway)
        base = samples(gw, "steadyserve_replica_cache_hits_total", cache="risk_features")
        assert len(base) == 2, base

        def warmed() -> bool:
            def one(_: int) -> None:
                with gw.client() as cc:
                    for _ in range(3):
                        _s, o = score(cc, **{"cache-control": "no-store"})
                        assert o == "-"
            threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            now = samples(gw, "steadyserve_replica_cache_hits_total", cache="risk_features")
            return all(now[r] - base[r] >= 2 for r in base)  # the 5 s canary adds 1 at most

        warm_s = wait_for("both replicas' feature caches warm", warmed, 20, every_s=0)
        inv = samples(gw, "steadyserve_replica_cache_invalidated_total", cache="risk_features")
        tags = samples(gw, "steadyserve_replica_invalidated_tags_total")
        print(f"  feature caches warm on {sorted(base)} in {warm_s:.2f} s")

        t0 = time.perf_counter()
        r = c.post(UPDATE, json={"account_id": 42, "amount": 25_000.0, "chargeback": True, "hour": 3})
        update_s = time.perf_counter() - t0
        assert r.status_code == 200, r.text
        new_row = r.json()
        assert new_row["tx_count"] == row["tx_count"] + 1
        t0 = time.perf_counter()
        after, outcome = score(c)  # no sleep
        after_s = time.perf_counter() - t0
        print(f"  update_account {_ms(update_s)}; next score {before:.6f} -> {after:.6f} "
              f"({outcome}, {_ms(after_s)})")
        assert outcome == "miss"
        assert after != before
        assert after == pytest.approx(expected_score(model, new_row), rel=1e-9, abs=1e-12)
        # and once more: now a hit, of the new answer
        assert score(c) == (after, "hit")

    inv_after = samples(gw, "steadyserve_replica_cache_invalidated_total", cache="risk_features")
    tags_after = samples(gw, "steadyserve_replica_invalidated_tags_total")
    print(f"  replica feature rows invalidated {inv} -> {inv_after}; tags told {tags} -> {tags_after}")
    assert all(inv_after[r] >= inv[r] + 1 for r in inv), (inv, inv_after)
    assert all(tags_after[r] >= tags[r] + 1 for r in tags), (tags, tags_after)


def no_stale_reads_under_load(gw: Running, model: RiskModel, loops: int, readers: int = 4) -> None:
    """Readers hammer account 42 (score and account, through the cache) while updates go in;
    after each update returns, the next read reflects it."""
    stop = threading.Event()
    errors: list[str] = []
    reads = Counter[str]()

    def reader(k: int) -> None:
        with gw.client(timeout=15) as c:
            while not stop.is_set():
                try:
                    if k % 2:
                        r = c.post(SCORE, json={"transactions": [TX]})
                    else:
                        r = c.post(ACCOUNT, json={"account_id": 42})
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.text[:200]}")
                    reads[r.headers.get(CACHE, "-")] += 1
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(readers)]
    for t in threads:
        t.start()
    stale: list[str] = []
    seen = Counter[str]()
    update_times: list[float] = []
    try:
        with gw.client(timeout=15) as c:
            previous = None
            for i in range(loops):
                time.sleep(0.02)  # let the readers fill the cache with the current answer
                body = {"account_id": 42, "amount": 40.0 + 173.0 * i, "chargeback": i % 4 == 0,
                        "hour": i % 24}
                t0 = time.perf_counter()
                r = c.post(UPDATE, json=body)
                update_times.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text
                row = r.json()
                a = c.post(ACCOUNT, json={"account_id": 42})
                assert a.status_code == 200, a.text
                seen["account:" + a.headers.get(CACHE, "-")] += 1
                if a.json()["tx_count"] != row["tx_count"]:
                    stale.append(f"loop {i}: account tx_count {a.json()['tx_count']} after update "
                                 f"to {row['tx_count']} ({a.headers.get(CACHE)})")
                got, outcome = score(c)
                seen["score:" + outcome] += 1
                want = expected_score(model, row)
                if got != pytest.approx(want, rel=1e-9, abs=1e-12):
                    stale.append(f"loop {i}: score {got} ({outcome}), expected {want}")
                if previous is not None and got == previous:
                    stale.append(f"loop {i}: score unchanged by the update ({outcome})")
                previous = got
    finally:
        stop.set()
        for t in threads:
            t.join(20)
    print(f"  {loops} updates under {readers} readers: update p50 "
          f"{_ms(statistics.median(update_times))} max {_ms(max(update_times))}; "
          f"reads after update {dict(seen)}; reader outcomes {dict(reads)}")
    assert errors == [], errors[:5]
    assert stale == [], stale
    assert sum(reads.values()) > loops



# ---- 1, 2: an update is visible to the next read ----------------------------------------------

def test_risk_update_is_seen_by_the_next_read_sqlite(serve: Serve, tmp_path: Path,
                                                     risk_model: RiskModel) -> None:
    started = time.monotonic()
    data_dir = _data_dir(tmp_path, risk_model)
    gw = serve(["--config", str(risk_config(tmp_path, data_dir, replicas=2))], ready_timeout_s=120)
    print(f"\n  risk on SQLite, 2 replicas ready in {time.monotonic() - started:.1f} s")
    update_then_read(gw, risk_model)
    no_stale_reads_under_load(gw, risk_model, loops=20)
    assert gw.stop() == []
    assert "Traceback" not in gw.log.read_text()


def test_risk_update_is_seen_by_the_next_read_postgres(pg_url: str, serve: Serve, tmp_path: Path,
                                                       risk_model: RiskModel) -> None:
    started = time.monotonic()
    data_dir = _data_dir(tmp_path, risk_model)
    config = risk_config(tmp_path, data_dir, replicas=2, database_url=pg_url)
    gw = serve(["--config", str(config)], ready_timeout_s=120)
    print(f"\n  risk on PostgreSQL, 2 replicas ready (seeded) in {time.monotonic() - started:.1f} s")
    update_then_read(gw, risk_model)
    no_stale_reads_under_load(gw, risk_model, loops=20)
    assert gw.stop() == []


# ---- 3: bad input, and the database cut off ----------------------------------------------------

def test_risk_bad_input_and_database_down(pg_url: str, serve: Serve, tmp_path: Path,
                                          risk_model: RiskModel) -> None:
    parts = urlsplit(pg_url)
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    user = f"{parts.username}@" if parts.username else ""
    proxied = urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{proxy.port}"))
    proxy.start()
    try:
        data_dir = _data_dir(tmp_path, risk_model)
        config = risk_config(tmp_path, data_dir, replicas=1, database_url=proxied)
        gw = serve(["--config", str(config)], ready_timeout_s=120)
        assert proxy.accepted > 0  # seeded through the proxy
        with gw.client(timeout=30) as c:
            r = c.post(SCORE, json={"transactions": [{**TX, "account_id": 999_999_999}]})
            print(f"\n  unknown account: {r.status_code} {r.text}")
            assert r.status_code == 404
            assert r.json()["error"]["param"] == "account_id"
            assert "999999999" in r.json()["error"]["message"]

            r = c.post(SCORE, json={"transactions": [{**TX, "amount": "lots"}]})
            print(f"  malformed amount: {r.status_code} {r.text}")
            assert r.status_code == 400
            assert r.json()["error"]["param"] == "transactions[0].amount"
            r = c.post(SCORE, json={"transactions": [{**TX, "amount": -5}]})
            print(f"  negative amount: {r.status_code} {r.text}")
            assert r.status_code == 400 and "amount" in r.json()["error"]["param"]

            proxy.stop()
            t0 = time.perf_counter()
            r = c.post(SCORE, json={"transactions": [{**TX, "account_id": 4242}]})
            down_s = time.perf_counter() - t0
            print(f"  database cut: {r.status_code} in {_ms(down_s)}, retry-after "
                  f"{r.headers.get('retry-after')}: {r.text[:300]}")
            assert r.status_code == 503, r.text
            assert int(r.headers["retry-after"]) >= 1
            assert down_s < 5
            # an outage of a few seconds, with traffic: every request answered 503 quickly
            during: list[tuple[int, float]] = []
            while time.perf_counter() - t0 < 3:
                t1 = time.perf_counter()
                r = c.post(SCORE, json={"transactions": [{**TX, "account_id": 5000 + len(during)}]})
                during.append((r.status_code, time.perf_counter() - t1))
                time.sleep(0.1)
            print(f"  during the outage: {Counter(s for s, _ in during)}, slowest "
                  f"{_ms(max(t for _, t in during))}")
            assert {s for s, _ in during} == {503}
            assert max(t for _, t in during) < 5

            proxy.start()
            back = time.monotonic()
            statuses: list[int] = []
            while True:
                r = c.post(SCORE, json={"transactions": [{**TX, "account_id": 4242}]})
                statuses.append(r.status_code)
                if r.status_code == 200 or time.monotonic() - back > 10:
                    break
                time.sleep(0.2)
            back_s = time.monotonic() - back
            print(f"  proxy back: 200 after {back_s:.2f} s, statuses {statuses}")
            assert r.status_code == 200, r.text
            assert r.headers[CACHE] == "miss"
        (replica,) = gw.status("risk")["replicas"]
        assert replica["restarts"] == 0  # recovered by itself, not by a restart
        assert gw.stop() == []
    finally:
        proxy.stop()


# ---- 4: two gateways sharing the Redis L2 ------------------------------------------------------

def echo_config(path: Path, data_dir: Path, cls: str, *, replicas: int = 1, cache: str = "",
                extra: str = "", sections: str = "") -> Path:
    path.write_text(f"""
data_dir = {_toml(str(data_dir))}

[alerting]
enabled = false

{sections}

[cache]
{cache}

[deployments.echo]
service = {_toml(f"{CACHE_ECHO}:{cls}")}
replicas = {replicas}
{extra}""")
    return path


def test_two_gateways_share_the_redis_l2(shared_redis: tuple[str, str], serve: Serve,
                                          tmp_path: Path) -> None:
    url, prefix = shared_redis
    # redis_timeout_s above the 50 ms default: this test is about sharing, not a slow machine
    cache = f"redis_url = {_toml(url)}\nredis_prefix = {_toml(prefix)}\nredis_timeout_s = 0.5"
    a = serve(["--config", str(echo_config(tmp_path / "a.toml", tmp_path / "a", "CacheEcho",
                                           cache=cache))])
    b = serve(["--config", str(echo_config(tmp_path / "b.toml", tmp_path / "b", "CacheEcho",
                                           cache=cache))])
    text = f"shared-{uuid.uuid4().hex[:8]}"
    with a.client() as ca, b.client() as cb:
        r = ca.post("/v1/deployments/echo/echo", json={"text": text})
        assert r.status_code == 200 and r.headers[CACHE] == "miss"
        answer = r.json()

        def b_hit() -> bool:  # A writes L2 in the background
            return cb.post("/v1/deployments/echo/echo", json={"text": text}).headers[CACHE] == "hit"

        l2_s = wait_for("gateway B answers from L2", b_hit, 5, every_s=0.02)
        rb = cb.post("/v1/deployments/echo/echo", json={"text": text})
        assert rb.headers[CACHE] == "hit" and rb.json() == answer  # A's replica's answer
        assert cb.post("/v1/deployments/echo/calls", json={}).json()["calls"] == 0
        assert ca.post("/v1/deployments/echo/calls", json={}).json()["calls"] == 1
        print(f"\n  B hit from L2 {l2_s * 1000:.0f} ms after A's miss; B's replica never called")

        inv = ca.post("/v1/cache/invalidate", json={"tags": [f"text:{text}"]}, headers=a.admin_headers())
        assert inv.status_code == 200, inv.text
        t0 = time.monotonic()
        body = inv.json()
        print(f"  invalidate on A: {body}")
        assert body["l2"] == "up" and body["l2_dropped"] == 1
        assert body["other_gateways"] == {"acknowledged": 1, "expected": 1}

        outcomes: list[str] = []

        def b_miss() -> bool:
            r = cb.post("/v1/deployments/echo/echo", json={"text": text})
            assert r.status_code == 200
            outcomes.append(r.headers[CACHE])
            return outcomes[-1] == "miss"

        # B acknowledged before A answered: its very first answer is a miss
        seen_s = wait_for("B's L1 drops the entry", b_miss, 2, every_s=0.01)
        print(f"  B's outcomes after A's invalidate returned: {outcomes} (miss after "
              f"{seen_s * 1000:.0f} ms)")
        assert outcomes[0] == "miss", outcomes
        assert cb.post("/v1/deployments/echo/calls", json={}).json()["calls"] == 1
        assert time.monotonic() - t0 < 2
        # A's L1 dropped it too; B's fresh answer reaches A through L2
        def a_hit_of_b() -> bool:
            r = ca.post("/v1/deployments/echo/echo", json={"text": text})
            return r.headers[CACHE] == "hit" and r.json()["pid"] != answer["pid"]

        wait_for("A answers B's recomputed entry from L2", a_hit_of_b, 5, every_s=0.02)
    assert a.stop() == [] and b.stop() == []


# ---- 5: Redis killed under load ----------------------------------------------------------------

def test_redis_killed_under_load(own_redis: OwnRedis, serve: Serve, tmp_path: Path) -> None:
    own_redis.start()
    # redis_timeout_s above the 50 ms default: on a busy 2-core machine the event loop alone
    # can take that long, and a spurious outage would blur the one this test makes
    cache = (f"redis_url = {_toml(own_redis.url)}\nredis_prefix = {_toml('ss-test:')}\n"
             "redis_timeout_s = 0.25")
    gw = serve(["--config", str(echo_config(tmp_path / "e.toml", tmp_path / "d", "CacheEcho",
                                            cache=cache))])
    assert samples(gw, "steadyserve_cache_l2_up") == {"": 1.0}
    stop = threading.Event()
    errors: list[str] = []
    outcomes = Counter[str]()
    latencies: list[tuple[float, float]] = []  # (at, seconds)
    t_start = time.monotonic()

    def load(k: int) -> None:
        i = 0
        with gw.client(timeout=15) as c:
            while not stop.is_set():
                text = f"hot-{i % 10}" if i % 2 == 0 else f"new-{k}-{i}"
                i += 1
                t0 = time.monotonic()
                try:
                    r = c.post("/v1/deployments/echo/echo", json={"text": text})
                    if r.status_code != 200 or r.json()["text"] != text:
                        errors.append(f"{r.status_code} {r.text[:200]}")
                    outcomes[r.headers.get(CACHE, "-")] += 1
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))
                latencies.append((t0 - t_start, time.monotonic() - t0))

    threads = [threading.Thread(target=load, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        before = samples(gw, "steadyserve_cache_l2_outages_total")[""]
        writes_before = samples(gw, "steadyserve_cache_l2_writes_total")[""]
        killed_at = time.monotonic() - t_start
        own_redis.kill()
        down_s = wait_for("steadyserve_cache_l2_up == 0",
                          lambda: samples(gw, "steadyserve_cache_l2_up")[""] == 0, 5, every_s=0.1)
        time.sleep(max(0.0, 4 - (time.monotonic() - t_start)))
        restarted_at = time.monotonic() - t_start
        own_redis.start()
        up_s = wait_for("steadyserve_cache_l2_up == 1",
                        lambda: samples(gw, "steadyserve_cache_l2_up")[""] == 1, 5, every_s=0.1)
        time.sleep(max(1.5, 6 - (time.monotonic() - t_start)))
        writes_after = samples(gw, "steadyserve_cache_l2_writes_total")[""]
        after = samples(gw, "steadyserve_cache_l2_outages_total")[""]
        still_up = samples(gw, "steadyserve_cache_l2_up")[""]
    finally:
        stop.set()
        for t in threads:
            t.join(20)
    total = sum(outcomes.values())
    during = [s for at, s in latencies if killed_at <= at < restarted_at]
    print(f"\n  {total} requests by 8 threads in {time.monotonic() - t_start:.1f} s: {dict(outcomes)}; "
          f"errors {len(errors)}")
    print(f"  killed redis at {killed_at:.2f} s, l2_up=0 seen {down_s:.2f} s later; restarted at "
          f"{restarted_at:.2f} s, l2_up=1 seen {up_s:.2f} s later; outages {before} -> {after}")
    all_s = sorted(s for _, s in latencies)
    print(f"  latency p50 {_ms(all_s[len(all_s) // 2])} p99 {_ms(all_s[int(len(all_s) * 0.99)])} "
          f"max {_ms(all_s[-1])}; while down: max {_ms(max(during))}; "
          f"L2 writes {writes_before} -> {writes_after}")
    assert errors == [], errors[:5]
    assert total > 200
    log = gw.log.read_text()
    assert "redis L2 cache unavailable" in log
    assert log.count("redis L2 cache connected") >= 2  # at start, and after the restart
    # exactly one outage, the kill: no flapping on dead pooled connections after the restart
    assert (before, after, still_up) == (0, 1, 1)
    assert writes_after > writes_before  # L2 is written again
    assert gw.stop() == []


# ---- 6: every replica killed: stale-if-error ---------------------------------------------------

def test_all_replicas_killed_stale_if_error(serve: Serve, tmp_path: Path) -> None:
    marker = tmp_path / "block-setup"
    config = echo_config(
        tmp_path / "s.toml", tmp_path / "d", "CacheEchoShortTtl", replicas=2,
        cache="stale_while_revalidate_s = 0\nstale_if_error_s = 300",
        sections="[supervisor]\ndrain_timeout_s = 2  # replicas stuck in setup() stop quickly",
        extra=f"\n[deployments.echo.env]\nCACHE_ECHO_BLOCK_FILE = {_toml(str(marker))}\n")
    gw = serve(["--config", str(config)])
    try:
        with gw.client(timeout=30) as c:
            r = c.post("/v1/deployments/echo/echo", json={"text": "K"})
            assert r.status_code == 200 and r.headers[CACHE] == "miss"
            answer = r.json()
            assert c.post("/v1/deployments/echo/echo", json={"text": "K"}).headers[CACHE] == "hit"
            time.sleep(1.3)  # past the 1 s TTL
            marker.touch()
            victims = gw.replica_pids()
            assert len(victims) == 2
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
            gone_s = wait_for("0 ready replicas", lambda: gw.status("echo")["ready_replicas"] == 0, 10)

            t0 = time.perf_counter()
            r = c.post("/v1/deployments/echo/echo", json={"text": "K"})
            stale_s = time.perf_counter() - t0
            assert r.status_code == 200, r.text
            assert r.headers[CACHE] == "stale-if-error"
            assert r.json() == answer

            t0 = time.perf_counter()
            r = c.post("/v1/deployments/echo/echo", json={"text": "never-cached"})
            fail_s = time.perf_counter() - t0
            print(f"\n  replicas gone {gone_s:.2f} s after SIGKILL; K: 200 stale-if-error in "
                  f"{_ms(stale_s)}; uncached: {r.status_code} in {_ms(fail_s)}, retry-after "
                  f"{r.headers.get('retry-after')}")
            assert r.status_code == 503, r.text
            assert int(r.headers["retry-after"]) >= 1
            assert fail_s < 0.5
            # the supervisor restarts them; they hang in setup() (the marker), out of rotation
            restarted_s = wait_for("replicas restarted", lambda: all(
                x["state"] == "starting" for x in gw.status("echo")["replicas"]), 10, every_s=0.1)
            r = c.post("/v1/deployments/echo/echo", json={"text": "K"})
            assert r.status_code == 200 and r.headers[CACHE] == "stale-if-error"
            pids = gw.replica_pids()
            print(f"  replicas restarted (starting, blocked in setup) {restarted_s:.2f} s later: "
                  f"pids {pids}; K still stale-if-error")
            assert len(pids) == 2 and not set(pids) & set(victims)
    finally:
        marker.unlink(missing_ok=True)
    t0 = time.monotonic()
    assert gw.stop() == []
    print(f"  stopped in {time.monotonic() - t0:.2f} s, nothing left behind")


# ---- consistency corners ----------------------------------------------------------------------

def require(ok: bool, what: str) -> None:
    """A precondition of a corner-case test: says which setup step failed, apart from the check."""
    if not ok:
        raise RuntimeError(f"precondition failed: {what}")


def test_invalidation_on_one_gateway_is_seen_by_the_next_read_on_another(
        shared_redis: tuple[str, str], serve: Serve, tmp_path: Path) -> None:
    url, prefix = shared_redis
    cache = f"redis_url = {_toml(url)}\nredis_prefix = {_toml(prefix)}\nredis_timeout_s = 0.5"
    a = serve(["--config", str(echo_config(tmp_path / "a.toml", tmp_path / "a",
                                           "CacheEchoSlowInvalidate", cache=cache))])
    b = serve(["--config", str(echo_config(tmp_path / "b.toml", tmp_path / "b",
                                           "CacheEchoSlowInvalidate", cache=cache))])
    text = f"shared-{uuid.uuid4().hex[:8]}"
    with a.client() as ca, b.client() as cb:
        require(ca.post("/v1/deployments/echo/echo", json={"text": text}).headers[CACHE] == "miss",
                "A computes the answer")
        try:
            wait_for("B answers from L2", lambda: cb.post(
                "/v1/deployments/echo/echo", json={"text": text}).headers[CACHE] == "hit", 5)
        except AssertionError as exc:
            raise RuntimeError(f"precondition: {exc}") from exc
        inv = ca.post("/v1/cache/invalidate", json={"tags": [f"text:{text}"]}, headers=a.admin_headers())
        require(inv.status_code == 200 and inv.json()["l2"] == "up", f"invalidated: {inv.text}")
        r = cb.post("/v1/deployments/echo/echo", json={"text": text})
        print(f"\n  B right after A's invalidate returned: {r.headers[CACHE]}")
        assert r.headers[CACHE] == "miss"


def test_a_read_after_an_update_never_joins_an_older_computation(serve: Serve, tmp_path: Path) -> None:
    kv_dir = tmp_path / "kv"
    kv_dir.mkdir()
    config = tmp_path / "kv.toml"
    config.write_text(f"""
data_dir = {_toml(str(tmp_path / "d"))}

[alerting]
enabled = false

[deployments.kv]
service = {_toml(f"{CACHE_ECHO}:CacheKV")}
replicas = 2

[deployments.kv.env]
CACHE_KV_DIR = {_toml(str(kv_dir))}
""")
    gw = serve(["--config", str(config)])
    with gw.client() as c:
        require(c.post("/v1/deployments/kv/put", json={"key": "a", "value": "old"}).status_code == 200,
                "first put")
        first: dict[str, Any] = {}

        def slow_read() -> None:  # reads "old", answers a second later
            with gw.client() as c2:
                r = c2.post("/v1/deployments/kv/get", json={"key": "a"})
                first.update(r.json(), cache=r.headers[CACHE], at=time.monotonic())

        reader = threading.Thread(target=slow_read)
        reader.start()
        time.sleep(0.3)
        r = c.post("/v1/deployments/kv/put", json={"key": "a", "value": "new"})  # the other replica
        put_done = time.monotonic()
        require(r.status_code == 200, f"second put: {r.text}")
        r = c.post("/v1/deployments/kv/get", json={"key": "a"})
        reader.join(10)
        print(f"\n  first read {first['value']!r} ({first['cache']}); read after the put: "
              f"{r.json()['value']!r} ({r.headers[CACHE]})")
        require(first["value"] == "old" and first["at"] > put_done,
                "the put (on the other replica) returned while the first read was computing")
        assert r.json()["value"] == "new"


def test_invalidations_missed_while_l2_was_down_do_not_leave_stale_l1_entries(
        shared_redis: tuple[str, str], serve: Serve, tmp_path: Path) -> None:
    url, prefix = shared_redis
    parts = urlsplit(url)
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 6379))
    proxy.start()
    try:
        via_proxy = urlunsplit(parts._replace(netloc=f"127.0.0.1:{proxy.port}"))
        settings = f"redis_prefix = {_toml(prefix)}\nredis_timeout_s = 0.5\nredis_retry_s = 0.2"
        a = serve(["--config", str(echo_config(tmp_path / "a.toml", tmp_path / "a", "CacheEcho",
                                               cache=f"redis_url = {_toml(url)}\n{settings}"))])
        b = serve(["--config", str(echo_config(tmp_path / "b.toml", tmp_path / "b", "CacheEcho",
                                               cache=f"redis_url = {_toml(via_proxy)}\n{settings}"))])
        text = f"outage-{uuid.uuid4().hex[:8]}"
        with a.client() as ca, b.client() as cb:
            require(cb.post("/v1/deployments/echo/echo", json={"text": text}).headers[CACHE] == "miss",
                    "B computes and keeps the answer in its L1")
            proxy.stop()  # B loses Redis (A keeps it)
            try:
                wait_for("B's L2 down", lambda: samples(b, "steadyserve_cache_l2_up")[""] == 0, 10, 0.1)
                inv = ca.post("/v1/cache/invalidate", json={"tags": [f"text:{text}"]},
                              headers=a.admin_headers())
                require(inv.status_code == 200 and inv.json()["l2"] == "up", inv.text)
                proxy.start()
                wait_for("B's L2 back", lambda: samples(b, "steadyserve_cache_l2_up")[""] == 1, 10, 0.1)
            except AssertionError as exc:
                raise RuntimeError(f"precondition: {exc}") from exc
            r = cb.post("/v1/deployments/echo/echo", json={"text": text})
            print(f"\n  B after its L2 outage, for a key A invalidated meanwhile: {r.headers[CACHE]}")
            assert r.headers[CACHE] == "miss"
    finally:
        proxy.stop()
