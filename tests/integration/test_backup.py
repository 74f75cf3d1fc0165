"""Backups end to end (store.backup, `steadyserve backup` / `restore`): a backup of a live
gateway's SQLite database under load fails no request; restored into a fresh data directory,
a new gateway serves the same keys and feedback, and every table (alert history and the risk
example's features included) has the manifest's row count and checksum. PostgreSQL: backup of
one schema, restored into another. A tampered backup is refused with one line. A schema
migration is preceded by a backup. The timings are printed (`pytest -s` shows them)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from steadyserve.auth import manage
from steadyserve.auth.keys import parse_spec
from steadyserve.store import SCHEMA_VERSION, Database
from steadyserve.store import backup as bk
from steadyserve.store.feedback import FeedbackStore
from steadyserve.store.keys import KeyStore

from .conftest import ECHO, STEADYSERVE, Running, fresh_schema_url, start

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None,
        ok: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([*STEADYSERVE, *args], capture_output=True, text=True, timeout=120,
                         cwd=cwd, env={"PATH": "/usr/bin:/bin", **(env or {})})
    if ok:
        assert out.returncode == 0, out.stderr
    return out


def digests(url: str) -> dict[str, bk.TableDigest]:
    from sqlalchemy import create_engine

    from steadyserve.store.database import _normalise_url

    engine = create_engine(_normalise_url(url))
    try:
        with engine.connect() as conn:
            schema = conn.exec_driver_sql("SELECT current_schema()").scalar_one() \
                if conn.dialect.name == "postgresql" else None
            return bk.read_digests(conn, schema)
    finally:
        engine.dispose()


def as_manifest(got: dict[str, bk.TableDigest]) -> dict[str, dict[str, Any]]:
    return {name: {"rows": d.rows, "sha256": d.sha256} for name, d in got.items()}


def seed_features(url: str, accounts: int) -> None:
    from steadyserve.examples.risk import data
    from steadyserve.examples.risk.features import FeatureStore

    store = FeatureStore(url)
    try:
        assert store.ensure_seeded(lambda: data.generate_accounts(accounts)) == accounts
    finally:
        store.close()


def seed_history(db: Database, points: int) -> None:
    db.add_transitions([{"rule": "HighErrorRate", "labels": {"deployment": "echo", "n": i},
                         "fingerprint": f"f{i}", "from_state": "pending", "to_state": "firing",
                         "at": 1_796_000_000.0 + i, "value": i / 10} for i in range(20)])
    db.put_silence({"id": "s1", "matchers": {"deployment": "echo"}, "starts_at": 0.0,
                    "ends_at": 4e9, "created_by": "test", "comment": "migration"})
    db.add_series_points([("rps", {"deployment": "echo"}, 1_796_000_000.0 + i, i % 97 / 7)
                          for i in range(points)])


def wait_admin(gw: Running, timeout_s: float = 60) -> dict[str, str]:
    """Keys exist: /v1/deployments needs one, so wait with the local admin key (written by
    the gateway at start) until the replica is in rotation."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert gw.proc.poll() is None, gw.log.read_text()[-4000:]
        try:
            admin = gw.admin_headers()
            listing = httpx.get(f"{gw.url}/v1/deployments", headers=admin, timeout=2).json()
            if all(d["ready_replicas"] == d["desired_replicas"] >= 1
                   for d in listing["deployments"]):
                return admin
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        assert time.monotonic() < deadline, gw.log.read_text()[-4000:]
        time.sleep(0.2)


class Load(threading.Thread):
    """Requests one after another until stopped: inference, and feedback on every fifth
    answer (a write to the database being backed up)."""

    def __init__(self, url: str, infer: dict[str, str], rater: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.url, self.infer, self.rater = url, infer, rater
        self.stop = threading.Event()
        self.ok = 0
        self.failed: list[str] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as c:
            n = 0
            while not self.stop.is_set():
                n += 1
                try:
                    r = c.post("/v1/deployments/echo/echo", headers=self.infer,
                               json={"text": f"load {n}"})
                    if r.status_code != 200:
                        self.failed.append(f"{r.status_code} {r.text[:200]}")
                        continue
                    self.ok += 1
                    if n % 5 == 0:
                        f = c.post("/v1/feedback", headers=self.rater, json={
                            "request_id": r.headers["x-request-id"], "score": n % 3})
                        if f.status_code not in (201, 202):
                            self.failed.append(f"feedback {f.status_code} {f.text[:200]}")
                        else:
                            self.ok += 1
                except httpx.HTTPError as exc:
                    self.failed.append(repr(exc))


def test_backup_under_load_then_a_fresh_gateway_serves_the_restored_data(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (tmp_path / "steadyserve.toml").write_text(f"""
data_dir = "{state}"
[alerting]
enabled = false
[feedback]
record_flush_s = 0.2
[deployments.echo]
service = "{ECHO}"
replicas = 1
""")
    url = f"sqlite:///{state}/steadyserve.db"
    gw = start([], tmp_path)
    load: Load | None = None
    try:
        gw.wait_ready(60)
        admin = gw.admin_headers()
        with httpx.Client(base_url=gw.url, timeout=10) as c:
            made = {}
            for name, scopes in (("web-app", ["infer"]), ("rater", ["feedback"])):
                r = c.post("/v1/admin/keys", headers=admin, json={"name": name, "scopes": scopes})
                assert r.status_code == 201, r.text
                made[name] = r.json()
            infer = {"authorization": f"Bearer {made['web-app']['key']}"}
            rater = {"authorization": f"Bearer {made['rater']['key']}"}
            time.sleep(1.0)  # the gateway has read the new keys ([auth] key_refresh_s)
            answered = []
            for i in range(10):
                r = c.post("/v1/deployments/echo/echo", headers=infer, json={"text": str(i)})
                assert r.status_code == 200, r.text
                answered.append(r.headers["x-request-id"])
            for i, rid in enumerate(answered):
                for key, score in (("rating", i % 5), ("correct", i % 2)):
                    r = c.post("/v1/feedback", headers=rater, json={
                        "request_id": rid, "id": f"fb-{i}-{key}", "key": key, "score": score,
                        "comment": f"item {i}"})
                    assert r.status_code == 201, r.text
            before = {rid: c.get(f"/v1/feedback/{rid}", headers=admin).json()["feedback"]
                      for rid in answered}
            keys_before = {k["id"]: k for k in c.get("/v1/admin/keys", headers=admin)
                           .json()["keys"]}
        db = Database(url)  # the alert history and the series beside the gateway's writes
        try:
            seed_history(db, 30_000)
        finally:
            db.close()
        seed_features(url, 3000)
        steady = digests(url)  # tables nobody writes during the load

        load = Load(gw.url, infer, rater)
        load.start()
        time.sleep(1.0)
        started = time.monotonic()
        out = cli("backup", str(tmp_path / "bk"), "--json", cwd=tmp_path)
        backup_s = time.monotonic() - started
        time.sleep(1.0)
        load.stop.set()
        load.join(15)
        assert load.failed == [] and load.ok > 50, (load.ok, load.failed[:5])
        manifest = json.loads(out.stdout)
    finally:
        if load is not None:
            load.stop.set()
        gw.stop()
    for table in ("risk_accounts", "risk_meta", "alert_transitions", "silences",
                  "series_points", "api_keys"):
        assert manifest["tables"][table] == as_manifest(steady)[table], table
    assert manifest["tables"]["risk_accounts"]["rows"] == 3000
    assert manifest["tables"]["feedback"]["rows"] >= 20

    # into a fresh data directory; the CLI compares every table read back with the manifest
    restored = tmp_path / "restored"
    started = time.monotonic()
    out = cli("restore", str(tmp_path / "bk"), "--data-dir", str(restored), "--json",
              cwd=tmp_path)
    restore_s = time.monotonic() - started
    assert json.loads(out.stdout)["tables"] == manifest["tables"]
    assert as_manifest(digests(f"sqlite:///{restored}/steadyserve.db")) == manifest["tables"]
    again = cli("restore", str(tmp_path / "bk"), "--data-dir", str(restored), cwd=tmp_path,
                ok=False)
    assert again.returncode == 1 and again.stderr.count("\n") == 1, again.stderr
    assert "already holds data" in again.stderr and "--force" in again.stderr

    print(f"\nbackup (SQLite, under load, {load.ok} requests answered meanwhile, 0 failed): "
          f"{manifest['payload']['bytes']:,} bytes, "
          f"{sum(t['rows'] for t in manifest['tables'].values()):,} rows, "
          f"{manifest['seconds']:.3f} s in the CLI ({backup_s:.2f} s with its start); "
          f"restore: {json.loads(out.stdout)['seconds']:.3f} s ({restore_s:.2f} s)")

    (tmp_path / "restored.toml").write_text(f"""
data_dir = "{restored}"
[alerting]
enabled = false
[deployments.echo]
service = "{ECHO}"
replicas = 1
""")
    fresh = start(["--config", str(tmp_path / "restored.toml")], tmp_path)
    try:
        new_admin = wait_admin(fresh)
        assert new_admin != admin  # a new data directory: its own local admin key
        with httpx.Client(base_url=fresh.url, timeout=10) as c:
            keys_after = {k["id"]: k for k in c.get("/v1/admin/keys", headers=new_admin)
                          .json()["keys"]}
            for key_id, key in keys_before.items():
                assert keys_after[key_id] == key
            for rid in answered:
                got = c.get(f"/v1/feedback/{rid}", headers=new_admin)
                assert got.json()["feedback"] == before[rid]
            # the restored keys work: the old secrets were never in the backup, their digests
            r = c.post("/v1/deployments/echo/echo", headers=infer, json={"text": "restored"})
            assert r.status_code == 200, r.text
            assert c.get(f"/v1/feedback/{answered[0]}", headers=admin).status_code == 200
            assert c.get(f"/v1/feedback/{answered[0]}", headers=infer).status_code == 403
    finally:
        fresh.stop()


@pytest.fixture
def pg_url_2(pg_admin: psycopg.Connection[tuple[object, ...]]) -> Iterator[str]:
    """A second fresh schema, made as conftest's pg_url makes its own."""
    yield from fresh_schema_url(pg_admin)


def test_postgresql_backup_restored_into_another_schema(pg_url: str, pg_url_2: str,
                                                        tmp_path: Path) -> None:
    db = Database(pg_url)
    try:
        seed_history(db, 20_000)
        keys = KeyStore(db, max_keys=100)
        for name in ("web-app", "nightly"):
            manage.create(keys, parse_spec({"name": name, "scopes": ["infer"]}),
                          created_by="test")
        fb = FeedbackStore(db, 20)
        for i in range(30):
            assert fb.add({"id": f"fb-{i}", "request_id": f"r{i % 7}", "key": "rating",
                           "score": float(i % 5), "value": {"n": i}, "correction": None,
                           "comment": "ünïcode\tand\\tabs", "key_id": None,
                           "created_at": 1_796_000_000.0 + i})
    finally:
        db.close()
    seed_features(pg_url, 2000)
    source = digests(pg_url)

    started = time.monotonic()
    out = cli("backup", str(tmp_path / "bk"), "--json", cwd=tmp_path,
              env={"STEADYSERVE_DATABASE_URL": pg_url})
    backup_s = time.monotonic() - started
    manifest = json.loads(out.stdout)
    assert manifest["dialect"] == "postgresql" and manifest["tables"] == as_manifest(source)
    assert manifest["pg_schema"] in pg_url
    assert (tmp_path / "bk" / "database.pgdump").stat().st_size == manifest["payload"]["bytes"]

    started = time.monotonic()
    out = cli("restore", str(tmp_path / "bk"), "--json", cwd=tmp_path,
              env={"STEADYSERVE_DATABASE_URL": pg_url_2})
    restore_s = time.monotonic() - started
    assert as_manifest(digests(pg_url_2)) == manifest["tables"]
    assert as_manifest(digests(pg_url)) == manifest["tables"]  # the source is untouched
    restored = Database(pg_url_2)
    try:
        assert restored.schema_version() == SCHEMA_VERSION
        assert {k.name for k in KeyStore(restored, max_keys=100).load()} == {"web-app", "nightly"}
        assert FeedbackStore(restored, 20).of_request("r3")[0]["comment"] == "ünïcode\tand\\tabs"
        # sequences came along: the next row gets a new id, not a taken one
        restored.add_transitions([{"rule": "r", "labels": {}, "fingerprint": "new",
                                   "from_state": "ok", "to_state": "firing", "at": 2e9}])
        assert restored.recent_transitions(limit=1)[0]["fingerprint"] == "new"
    finally:
        restored.close()

    again = cli("restore", str(tmp_path / "bk"), cwd=tmp_path, ok=False,
                env={"STEADYSERVE_DATABASE_URL": pg_url_2})
    assert again.returncode == 1 and again.stderr.count("\n") == 1
    assert "already holds data" in again.stderr, again.stderr
    forced = cli("restore", str(tmp_path / "bk"), "--force", cwd=tmp_path,
                 env={"STEADYSERVE_DATABASE_URL": pg_url_2})
    assert "every table's count and checksum verified" in forced.stdout
    assert as_manifest(digests(pg_url_2)) == manifest["tables"]
    sqlite_target = cli("restore", str(tmp_path / "bk"), "--data-dir", str(tmp_path / "d"),
                        cwd=tmp_path, ok=False)
    assert sqlite_target.returncode == 1
    assert "postgresql database and the target is sqlite" in sqlite_target.stderr
    print(f"\nbackup (PostgreSQL): {manifest['payload']['bytes']:,} bytes, "
          f"{sum(t['rows'] for t in manifest['tables'].values()):,} rows, "
          f"{manifest['seconds']:.3f} s ({backup_s:.2f} s with the CLI's start); "
          f"restore into another schema: {json.loads(out.stdout)['seconds']:.3f} s "
          f"({restore_s:.2f} s)")


def test_a_tampered_backup_is_refused_with_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/live/steadyserve.db"
    db = Database(url)
    try:
        seed_history(db, 100)
    finally:
        db.close()
    cli("backup", str(tmp_path / "bk"), "--data-dir", str(tmp_path / "live"), cwd=tmp_path)
    payload = tmp_path / "bk" / "database.sqlite3"
    good = payload.read_bytes()
    bad = bytearray(good)
    bad[-1] ^= 0x40
    payload.write_bytes(bytes(bad))
    for args in (["--verify-only"], ["--data-dir", str(tmp_path / "new")]):
        out = cli("restore", str(tmp_path / "bk"), *args, cwd=tmp_path, ok=False)
        assert out.returncode == 1 and out.stdout == ""
        assert out.stderr.count("\n") == 1, out.stderr
        assert out.stderr.startswith("steadyserve: restore refused: ")
        assert "does not match its checksum in manifest.json" in out.stderr
    assert not (tmp_path / "new" / "steadyserve.db").exists()
    payload.write_bytes(good)
    manifest = tmp_path / "bk" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"rows": 20', '"rows": 21'))
    out = cli("restore", str(tmp_path / "bk"), "--data-dir", str(tmp_path / "new"), cwd=tmp_path,
              ok=False)
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert "manifest.json was changed after the backup was written" in out.stderr
    out = cli("restore", str(tmp_path / "nowhere"), "--verify-only", cwd=tmp_path, ok=False)
    assert out.returncode == 1 and "holds no manifest.json" in out.stderr


def test_a_schema_migration_is_preceded_by_a_backup(tmp_path: Path) -> None:
    from steadyserve.gateway.assemble import open_database
    from steadyserve.settings import load_config

    (tmp_path / "steadyserve.toml").write_text(f'data_dir = "{tmp_path / "state"}"\n')
    config = load_config(env={}, cwd=tmp_path)
    db = Database(config.database)
    try:
        seed_history(db, 500)
    finally:
        db.close()
    old = SCHEMA_VERSION - 1
    with sqlite3.connect(tmp_path / "state" / "steadyserve.db") as conn:
        conn.execute("UPDATE schema_version SET version = ?", (old,))
    opened = open_database(config)  # as the gateway opens it: backup_dir from the config
    assert opened is not None
    try:
        assert opened.schema_version() == SCHEMA_VERSION
    finally:
        opened.close()
    made = list((tmp_path / "state" / "backups").iterdir())
    assert len(made) == 1 and made[0].name.startswith(
        f"pre-migration-v{old}-to-v{SCHEMA_VERSION}-"), made
    manifest = bk.verify(made[0])
    assert manifest["schema_version"] == old
    assert manifest["tables"]["series_points"]["rows"] == 500
    # migrated now: the next open takes none; nor does a new, empty database
    Database(config.database, backup_dir=tmp_path / "state" / "backups").close()
    Database(f"sqlite:///{tmp_path}/empty.db", backup_dir=tmp_path / "other").close()
    assert len(list((tmp_path / "state" / "backups").iterdir())) == 1
    assert not (tmp_path / "other").exists()
    # the backup restores (an older schema is fine: the gateway migrates it again)
    cli("restore", str(made[0]), "--data-dir", str(tmp_path / "restored"), cwd=tmp_path)


def test_a_schema_migration_on_postgresql_is_preceded_by_a_backup(
        pg_url: str, pg_admin: psycopg.Connection[tuple[object, ...]], tmp_path: Path) -> None:
    db = Database(pg_url)
    try:
        seed_history(db, 200)
        with db.connect("schema") as conn:
            schema = conn.exec_driver_sql("SELECT current_schema()").scalar_one()
    finally:
        db.close()
    pg_admin.execute(f'UPDATE "{schema}".schema_version SET version = {SCHEMA_VERSION - 1}')
    Database(pg_url, backup_dir=tmp_path / "backups").close()
    (made,) = list((tmp_path / "backups").iterdir())
    manifest = bk.verify(made)
    assert manifest["dialect"] == "postgresql" and manifest["schema_version"] == SCHEMA_VERSION - 1
    assert manifest["tables"]["alert_transitions"]["rows"] == 20
