"""Backups (store.backup, store.pgtools): the checksums and the manifest, every refusal, the
retention and schedule policies, the schema rename of a PostgreSQL script, the scheduler
driven by a fake clock; backup, verify and restore of small SQLite files."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy.engine import make_url

from steadyserve.cli.main import build_parser
from steadyserve.config import BackupConfig, Config, DeploymentConfig
from steadyserve.errors import ConfigError
from steadyserve.settings import load_config
from steadyserve.store import SCHEMA_VERSION, Database
from steadyserve.store import backup as bk
from steadyserve.store.pgtools import conninfo, rename_schema

EMPTY = hashlib.sha256(b"").hexdigest()


# ---- checksums and the manifest ------------------------------------------------------------

def test_a_digest_is_of_the_rows_in_their_order_and_types() -> None:
    rows = [(1, "a", 0.5, None), (2, "b\nc", 1e300, b"\x00\xff")]
    d = bk.digest_rows(rows)
    assert d.rows == 2
    assert d == bk.digest_rows(list(rows))
    assert d != bk.digest_rows(reversed(rows))  # primary-key order is part of it
    assert bk.digest_rows([]) == bk.TableDigest(0, EMPTY)
    assert bk.digest_rows([(1,)]) != bk.digest_rows([("1",)])  # types are kept apart
    assert bk.digest_rows([(1,)]) != bk.digest_rows([(1.0,)])
    assert bk.canonical_row([b"\x01", Decimal("1.10")]) == \
        b'[{"$bytes":"01"},{"$decimal":"1.10"}]'
    assert b"\n" not in bk.canonical_row(["line\nbreak"])  # rows cannot run into each other


def manifest(**over: Any) -> dict[str, Any]:
    values: dict[str, Any] = dict(
        dialect="sqlite", schema_version=SCHEMA_VERSION, payload_bytes=10, payload_sha256=EMPTY,
        tables={"feedback": bk.TableDigest(2, "a" * 64), "kv": bk.TableDigest(0, EMPTY)},
        created_at=1_796_000_000.0, label="manual")
    values.update(over)
    return bk.make_manifest(**values)


def resigned(m: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A manifest edited and given a matching checksum again (reaches the later checks)."""
    out = {**m, **changes}
    out["manifest_sha256"] = bk.manifest_checksum(out)
    return out


def test_a_manifest_round_trips_through_json_and_checks() -> None:
    m = manifest()
    again = orjson.loads(orjson.dumps(m, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    assert bk.check_manifest(again, dialect="sqlite") == m
    assert m["payload"]["file"] == "database.sqlite3"
    assert m["created_at_utc"] == "2026-11-30T00:53:20Z"
    assert m["tables"]["feedback"] == {"rows": 2, "sha256": "a" * 64}


@pytest.mark.parametrize(("change", "says"), [
    (lambda m: {**m, "schema_version": m["schema_version"]}, None),
    (lambda m: {**m, "tables": {**m["tables"], "kv": {"rows": 1, "sha256": EMPTY}}},
     "was changed after the backup was written"),
    (lambda m: {**m, "format": "tarball"}, "not a steadyserve backup"),
    (lambda m: [m], "not a steadyserve backup"),
    (lambda m: resigned(m, schema_version=SCHEMA_VERSION + 1),
     f"newer than this steadyserve understands ({SCHEMA_VERSION})"),
    (lambda m: resigned(m, format_version=2), "format version 2 is not one"),
    (lambda m: resigned(m, dialect="postgresql", pg_schema="public",
                        payload={**m["payload"], "file": "database.pgdump"}),
     "backup is of a postgresql database and the target is sqlite"),
    (lambda m: resigned(m, dialect="oracle"), "unknown dialect"),
    (lambda m: resigned(m, payload={**m["payload"], "file": "../../etc/passwd"}),
     "payload must be"),
    (lambda m: resigned(m, tables={"kv": {"rows": "many", "sha256": EMPTY}}), "tables must map"),
    (lambda m: resigned(m, dialect="postgresql", pg_schema='x"; DROP',
                        payload={**m["payload"], "file": "database.pgdump"}),
     None),  # dialect is checked against the target before the schema name: see below
])
def test_check_manifest_refuses_what_cannot_be_restored(change: Any, says: str | None) -> None:
    edited = change(manifest())
    if says is None:
        if edited.get("dialect") == "postgresql":
            with pytest.raises(bk.BackupRefused, match="not a plain schema name"):
                bk.check_manifest(edited, dialect=None)
        else:
            bk.check_manifest(edited, dialect="sqlite")
        return
    with pytest.raises(bk.BackupRefused, match=says.replace("(", r"\(").replace(")", r"\)")):
        bk.check_manifest(edited, dialect="sqlite")


def test_compare_tables_names_each_difference() -> None:
    expected = manifest()["tables"]
    same = {"feedback": bk.TableDigest(2, "a" * 64), "kv": bk.TableDigest(0, EMPTY),
            "risk_accounts": bk.TableDigest(5, "b" * 64)}  # tables beyond the manifest's: ok
    assert bk.compare_tables(expected, same) == []
    assert bk.compare_tables(expected, {"feedback": bk.TableDigest(1, "c" * 64)}) == [
        "feedback: 1 rows, sha256 cccccccccccc…; expected 2 rows, sha256 aaaaaaaaaaaa…",
        "kv: missing"]


# ---- retention and schedule (pure) ---------------------------------------------------------

@pytest.mark.parametrize(("names", "keep", "deleted"), [
    ([], 3, []),
    (["scheduled-20261201T000000Z", "scheduled-20261202T000000Z"], 3, []),
    (["scheduled-20261202T000000Z", "scheduled-20261130T120000Z", "scheduled-20261201T000000Z"],
     1, ["scheduled-20261130T120000Z", "scheduled-20261201T000000Z"]),
    # the same second twice: the suffix orders them (numerically: -10 after -2)
    (["scheduled-20261201T000000Z-10", "scheduled-20261201T000000Z-2",
      "scheduled-20261201T000000Z"], 2, ["scheduled-20261201T000000Z"]),
    (["scheduled-20261201T000000Z-10", "scheduled-20261201T000000Z-2"], 1,
     ["scheduled-20261201T000000Z-2"]),
    # never chosen: manual and pre-migration backups, strays, impossible dates
    (["nightly", "pre-migration-v3-to-v4-20261101T000000Z", "scheduled-20261301T000000Z",
      "scheduled-2026", ".scheduled-20261101T000000Z", "scheduled-20261201T000000Z"], 1, []),
])
def test_retention_deletes_the_oldest_scheduled_beyond_keep(names: list[str], keep: int,
                                                           deleted: list[str]) -> None:
    assert bk.expired(names, keep) == deleted


def test_names_and_when_the_next_backup_is_due() -> None:
    t = 1_796_227_200.0  # 2026-12-02T16:00:00Z
    assert bk.scheduled_name(t) == "scheduled-20261202T160000Z"
    assert bk.scheduled_time(bk.scheduled_name(t)) == (t, 0)
    assert bk.scheduled_time("scheduled-20261202T160000Z-3") == (t, 3)
    assert bk.next_due(None, t, 3600) == t  # none yet: at once
    assert bk.next_due(t - 600, t, 3600) == t + 3000  # a restart does not take an extra one
    assert bk.next_due(t - 7200, t, 3600) == t  # overdue: at once, not twice


def test_the_backup_section_of_the_config(tmp_path: Path) -> None:
    (tmp_path / "steadyserve.toml").write_text(
        '[backup]\ninterval_s = 3600\nkeep = 3\ndir = "/srv/backups"\n')
    config = load_config(env={}, cwd=tmp_path)
    assert config.backup == BackupConfig(interval_s=3600, keep=3, dir="/srv/backups")
    assert bk.backup_dir(config) == Path("/srv/backups")
    assert bk.backup_dir(Config(deployments=config.deployments, data_dir="/d")) == \
        Path("/d/backups")
    (tmp_path / "steadyserve.toml").write_text("[backup]\nevery = 5\n")
    with pytest.raises(ConfigError, match=r"\[backup\]: unknown setting 'every'"):
        load_config(env={}, cwd=tmp_path)
    (tmp_path / "steadyserve.toml").write_text("backup = 5\n")
    with pytest.raises(ConfigError, match=r"\[backup\] must be a table"):
        load_config(env={}, cwd=tmp_path)
    for bad in ({"interval_s": 0.5}, {"interval_s": -1}, {"keep": 0}, {"dir": ""}):
        with pytest.raises(ConfigError, match=r"\[backup\]"):
            BackupConfig(**bad)


# ---- PostgreSQL plumbing (pure) ------------------------------------------------------------

def test_rename_schema_rewrites_qualified_names_but_never_data() -> None:
    script = [
        "SELECT pg_catalog.set_config('search_path', '', false);\n",
        "CREATE SCHEMA ss_old;\n",
        "CREATE TABLE ss_old.feedback (\n",
        "    id text NOT NULL\n",
        ");\n",
        "CREATE SEQUENCE ss_old.alert_actions_id_seq\n",
        "ALTER TABLE ONLY ss_old.alert_actions ALTER COLUMN id SET DEFAULT "
        "nextval('ss_old.alert_actions_id_seq'::regclass);\n",
        "COPY ss_old.feedback (id, comment) FROM stdin;\n",
        "f1\tsee ss_old.feedback and \"ss_old\".x\n",
        "\\.\n",
        "SELECT pg_catalog.setval('ss_old.alert_actions_id_seq', 7, true);\n",
        "CREATE INDEX ix ON \"ss_old\".feedback USING btree (request_id);\n",
        "CREATE TABLE xss_old.t (a int);\n",  # another schema whose name ends the same way
    ]
    out = list(rename_schema(script, "ss_old", "ss_new"))
    assert out == [
        "SELECT pg_catalog.set_config('search_path', '', false);\n",
        'CREATE TABLE "ss_new".feedback (\n',
        "    id text NOT NULL\n",
        ");\n",
        'CREATE SEQUENCE "ss_new".alert_actions_id_seq\n',
        'ALTER TABLE ONLY "ss_new".alert_actions ALTER COLUMN id SET DEFAULT '
        "nextval('\"ss_new\".alert_actions_id_seq'::regclass);\n",
        'COPY "ss_new".feedback (id, comment) FROM stdin;\n',
        "f1\tsee ss_old.feedback and \"ss_old\".x\n",  # data: as it was
        "\\.\n",
        "SELECT pg_catalog.setval('\"ss_new\".alert_actions_id_seq', 7, true);\n",
        'CREATE INDEX ix ON "ss_new".feedback USING btree (request_id);\n',
        "CREATE TABLE xss_old.t (a int);\n",
    ]
    same = list(rename_schema(script, "ss_old", "ss_old"))
    assert "CREATE SCHEMA ss_old;\n" not in same and len(same) == len(script) - 1


def test_conninfo_keeps_the_password_off_the_command_line() -> None:
    url = make_url("postgresql+psycopg://ss:s3cr%27t@db.internal:5433/state"
                   "?options=-csearch_path%3Dtenant_1&sslmode=require")
    info, env = conninfo(url)
    assert "s3cr" not in info and env["PGPASSWORD"] == "s3cr't"
    assert info == ("host='db.internal' port='5433' user='ss' dbname='state' "
                    "options='-csearch_path=tenant_1' sslmode='require'")
    assert conninfo(make_url("postgresql://u@h/d?application_name=it%27s"))[0].endswith(
        "application_name='it\\'s'")


# ---- SQLite files: backup, verify, restore, refusals ---------------------------------------

def seeded(path: Path) -> str:
    url = f"sqlite:///{path}"
    db = Database(url)
    db.add_transitions([{"rule": "HighErrorRate", "labels": {"deployment": "risk"},
                         "fingerprint": "f1", "from_state": "pending", "to_state": "firing",
                         "at": 1_796_000_000.0, "value": 0.2}])
    db.put_state("alert_book", {"firing": ["f1"]})
    db.add_series_points([("rps", {"d": "risk"}, float(i), i / 3) for i in range(300)])
    db.close()
    return url


def test_backup_verify_and_restore_a_sqlite_file(tmp_path: Path) -> None:
    url = seeded(tmp_path / "live" / "state.db")
    m = bk.backup(url, tmp_path / "b1", wall=lambda: 1_796_227_200.0)
    assert sorted(p.name for p in (tmp_path / "b1").iterdir()) == ["database.sqlite3",
                                                                    "manifest.json"]
    assert (tmp_path / "b1").stat().st_mode & 0o777 == 0o700
    assert m["schema_version"] == SCHEMA_VERSION and m["label"] == "manual"
    assert m["tables"]["series_points"]["rows"] == 300
    assert m["tables"]["alert_transitions"]["rows"] == 1
    assert m["tables"]["schema_version"]["rows"] == 1
    assert bk.verify(tmp_path / "b1") == m

    target = tmp_path / "fresh" / "data" / "steadyserve.db"
    assert bk.restore(tmp_path / "b1", f"sqlite:///{target}") == m
    db = Database(f"sqlite:///{target}")
    try:
        assert db.get_state("alert_book") == {"firing": ["f1"]}
        assert db.recent_transitions()[0]["value"] == 0.2
        assert len(db.series_points("rps", 0, 1e9)) == 300
    finally:
        db.close()
    assert not list(target.parent.glob(".*restore*"))  # no temporary copy left


def test_refusals_leave_the_target_as_it_was(tmp_path: Path) -> None:
    url = seeded(tmp_path / "live.db")
    src = tmp_path / "b"
    bk.backup(url, src)
    target = tmp_path / "t" / "steadyserve.db"
    target_url = f"sqlite:///{target}"

    # a target that holds data (a restore into it already): refused unless forced
    bk.restore(src, target_url)
    before = target.read_bytes()
    with pytest.raises(bk.BackupRefused, match=r"already holds data .*pass --force"):
        bk.restore(src, target_url)
    bk.restore(src, target_url, force=True)

    # a payload changed by one bit
    payload = src / "database.sqlite3"
    good = payload.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 1
    payload.write_bytes(bytes(flipped))
    with pytest.raises(bk.BackupRefused, match="does not match its checksum"):
        bk.verify(src)
    with pytest.raises(bk.BackupRefused, match="does not match its checksum"):
        bk.restore(src, target_url, force=True)
    assert target.read_bytes() == before
    payload.write_bytes(good)

    # a manifest edited by hand (a row count), or one re-signed with a newer schema
    manifest_file = src / "manifest.json"
    original = orjson.loads(manifest_file.read_bytes())
    tables = {**original["tables"], "kv": {**original["tables"]["kv"], "rows": 5}}
    manifest_file.write_bytes(orjson.dumps({**original, "tables": tables}))
    with pytest.raises(bk.BackupRefused, match=r"manifest\.json was changed"):
        bk.restore(src, target_url, force=True)
    # re-signed (a forged manifest): the restore still compares the tables themselves
    manifest_file.write_bytes(orjson.dumps(resigned(original, tables=tables)))
    with pytest.raises(bk.BackupRefused, match=r"kv: 1 rows.*expected 5 rows"):
        bk.restore(src, target_url, force=True)
    assert target.read_bytes() == before
    manifest_file.write_bytes(orjson.dumps(resigned(original,
                                                    schema_version=SCHEMA_VERSION + 1)))
    with pytest.raises(bk.BackupRefused, match="newer than this steadyserve"):
        bk.restore(src, target_url, force=True)
    # another dialect: refused before connecting anywhere
    manifest_file.write_bytes(orjson.dumps(original))
    with pytest.raises(bk.BackupRefused, match="backup is of a sqlite database and the "
                                               "target is postgresql"):
        bk.restore(src, "postgresql://nobody@127.0.0.1:1/none")
    (src / "manifest.json").unlink()
    with pytest.raises(bk.BackupRefused, match=r"holds no manifest\.json"):
        bk.verify(src)
    assert target.read_bytes() == before


def test_a_backup_goes_into_a_new_or_empty_directory_only(tmp_path: Path) -> None:
    url = seeded(tmp_path / "live.db")
    (tmp_path / "empty").mkdir()
    bk.backup(url, tmp_path / "empty")
    with pytest.raises(bk.BackupRefused, match="is not empty"):
        bk.backup(url, tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(bk.BackupRefused, match="exists and is not a directory"):
        bk.backup(url, tmp_path / "file")
    with pytest.raises(bk.BackupError, match="no SQLite database at"):
        bk.backup(f"sqlite:///{tmp_path / 'absent.db'}", tmp_path / "b2")
    assert not (tmp_path / "b2").exists()  # a failed backup leaves nothing behind
    with pytest.raises(bk.BackupError, match="in-memory"):
        bk.backup("sqlite:///:memory:", tmp_path / "b3")


def test_the_backup_is_a_self_contained_file(tmp_path: Path) -> None:
    url = seeded(tmp_path / "live.db")
    live = sqlite3.connect(tmp_path / "live.db")
    live.execute("INSERT INTO kv (key, value) VALUES ('uncommitted', '1')")  # open write txn
    try:
        bk.backup(url, tmp_path / "b")  # WAL: a writer does not block the backup…
    finally:
        live.rollback()
        live.close()
    payload = sqlite3.connect(tmp_path / "b" / "database.sqlite3")
    try:
        assert payload.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert payload.execute("SELECT count(*) FROM kv WHERE key = 'uncommitted'").fetchone() \
            == (0,)  # …and only committed rows are in it
    finally:
        payload.close()


# ---- the scheduler -------------------------------------------------------------------------

class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t
        self.sleeps: list[float] = []

    def wall(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if len(self.sleeps) > 6:
            raise asyncio.CancelledError
        self.t += seconds


def test_the_scheduler_keeps_the_newest_and_never_dies(tmp_path: Path) -> None:
    url = seeded(tmp_path / "live.db")
    config = Config(deployments=(DeploymentConfig(name="x", service="m:C"),),
                    database_url=url, data_dir=str(tmp_path / "data"),
                    backup=BackupConfig(interval_s=3600, keep=2))
    clock = FakeClock(1_796_227_200.0)  # 2026-12-02T16:00:00Z
    (tmp_path / "data" / "backups").mkdir(parents=True)
    (tmp_path / "data" / "backups" / "nightly").mkdir()  # the operator's: never deleted
    scheduler = bk.BackupScheduler(config, wall=clock.wall, sleep=clock.sleep)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(scheduler.run())
    # at once, then every hour: 7 sleeps of an hour, 7 backups, the 2 newest kept
    assert clock.sleeps == [3600.0] * 7
    assert scheduler.written == 7 and scheduler.failures == 0
    assert sorted(p.name for p in (tmp_path / "data" / "backups").iterdir()) == [
        "nightly", "scheduled-20261202T210000Z", "scheduled-20261202T220000Z"]
    bk.verify(tmp_path / "data" / "backups" / "scheduled-20261202T220000Z")

    # a restart half an hour later waits for the rest of the hour, not a whole one
    clock = FakeClock(clock.t + 1800)
    again = bk.BackupScheduler(config, wall=clock.wall, sleep=clock.sleep)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(again.run())
    assert clock.sleeps[0] == 1800.0

    # the database gone: each failure is logged and tried again, the loop lives on
    broken = Config(deployments=config.deployments, database_url=f"sqlite:///{tmp_path}/no.db",
                    data_dir=str(tmp_path / "data2"),
                    backup=BackupConfig(interval_s=3600, keep=2))
    clock = FakeClock(clock.t)
    failing = bk.BackupScheduler(broken, wall=clock.wall, sleep=clock.sleep)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(failing.run())
    assert failing.failures == 7 and failing.written == 0
    assert clock.sleeps == [300.0] * 7
    assert list((tmp_path / "data2" / "backups").iterdir()) == []  # no unfinished ones left


def test_no_schedule_when_the_interval_is_zero(tmp_path: Path) -> None:
    config = Config(deployments=(DeploymentConfig(name="x", service="m:C"),),
                    data_dir=str(tmp_path))
    clock = FakeClock(0.0)
    asyncio.run(bk.BackupScheduler(config, wall=clock.wall, sleep=clock.sleep).run())
    assert clock.sleeps == [] and not (tmp_path / "backups").exists()


@pytest.mark.parametrize("verb", ["backup", "restore"])
def test_the_commands_show_examples(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([verb, "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and f"steadyserve {verb} " in out
    assert max(len(line) for line in out.splitlines()) <= 100


def test_no_migration_when_the_backup_before_it_fails(tmp_path: Path) -> None:
    from steadyserve.store import DatabaseUnavailable

    url = seeded(tmp_path / "old.db")
    with sqlite3.connect(tmp_path / "old.db") as conn:
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION - 1,))
    (tmp_path / "not-a-dir").write_text("")  # the backup directory cannot be made
    with pytest.raises(DatabaseUnavailable, match=f"not migrating the database schema from "
                                                  f"v{SCHEMA_VERSION - 1}"):
        Database(url, backup_dir=tmp_path / "not-a-dir" / "backups")
    with sqlite3.connect(tmp_path / "old.db") as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchone() == (
            SCHEMA_VERSION - 1,)
    db = Database(url, backup_dir=tmp_path / "backups")  # it can now: backed up, migrated
    db.close()
    (made,) = (tmp_path / "backups").iterdir()
    assert bk.verify(made)["schema_version"] == SCHEMA_VERSION - 1
