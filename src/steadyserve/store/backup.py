"""Backups of the state database: one directory each, verified before it is restored.

    <dir>/manifest.json     format and versions, dialect, created_at, the payload's size and
                            SHA-256, per table its row count and SHA-256 (the rows in
                            primary-key order, one canonical JSON line each), and the
                            manifest's own SHA-256
    <dir>/database.sqlite3  SQLite: the online backup API, one step (one read snapshot: WAL
                            readers never block the gateways' writes)
    <dir>/database.pgdump   PostgreSQL: `pg_dump --format=custom` of the URL's schema, in the
                            same snapshot as the checksums (`pg_export_snapshot`)

The manifest is written last (atomically): a directory without one is an unfinished backup.

Restore checks before it touches the target: the manifest's checksum, format and schema
version (none newer than this steadyserve), the dialect, that the target holds no data
(unless forced), the payload's SHA-256 and, for SQLite, every table in the copy about to be
renamed over the target. It then restores (SQLite: that copy, renamed into place; PostgreSQL:
pg_restore's script with the schema renamed, through psql in one transaction) and reads the
counts and checksums back from the target: `read_digests` computes both sides.

Scheduled backups (`[backup] interval_s`) are `scheduled-<UTC time>` directories, and the
oldest beyond `keep` are deleted; the ones a `Database(backup_dir=…)` takes before migrating
its schema are `pre-migration-v<old>-to-v<new>-<UTC time>`. Only scheduled ones are ever
deleted. Paths come from the operator (CLI, config), never from the network.
"""

from __future__ import annotations

import asyncio
import calendar
import hashlib
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
from sqlalchemy import Connection, Engine, String, create_engine, inspect
from sqlalchemy.engine import URL
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from .. import __version__
from ..config import Config
from ..errors import SteadyError
from . import pgtools
from .database import SCHEMA_VERSION, _normalise_url, make_engine

log = logging.getLogger("steadyserve.backup")

FORMAT = "steadyserve-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PAYLOADS = {"sqlite": "database.sqlite3", "postgresql": "database.pgdump"}
SCHEDULED = re.compile(r"^scheduled-(\d{8}T\d{6}Z)(?:-(\d{1,4}))?$")
FETCH_ROWS = 1000  # rows per round trip while checksumming
_STAMP = "%Y%m%dT%H%M%SZ"
_PG_SCHEMA = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")  # names we pass to pg_dump as is
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class BackupError(SteadyError):
    """A backup or restore could not be done: a database or file error, a missing tool."""

    code = "backup_failed"


class BackupRefused(BackupError):
    """Refused before anything was changed: a backup that does not verify, is newer than this
    steadyserve or of the other dialect, a target that holds data, a non-empty directory."""

    status = 409
    code = "backup_refused"


# ---- checksums (pure) ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TableDigest:
    rows: int
    sha256: str


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$bytes": bytes(value).hex()}
    if isinstance(value, Decimal):
        return {"$decimal": str(value)}
    return str(value)


def canonical_row(row: Sequence[Any]) -> bytes:
    """One row as compact JSON (a list, in column order; bytes and decimals tagged). JSON
    escapes newlines, so rows joined by b"\\n" cannot run into each other."""
    return orjson.dumps(list(row), default=_json_default)


def digest_rows(rows: Iterable[Sequence[Any]]) -> TableDigest:
    """Count and SHA-256 of rows, in the order given."""
    sha = hashlib.sha256()
    count = 0
    for row in rows:
        sha.update(canonical_row(row))
        sha.update(b"\n")
        count += 1
    return TableDigest(count, sha.hexdigest())


def manifest_checksum(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def make_manifest(*, dialect: str, schema_version: int, tables: Mapping[str, TableDigest],
                  payload_bytes: int, payload_sha256: str, created_at: float, label: str,
                  pg_schema: str | None = None) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "steadyserve_version": __version__,
        "schema_version": schema_version, "dialect": dialect, "pg_schema": pg_schema,
        "label": label, "created_at": created_at,
        "created_at_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created_at)),
        "payload": {"file": PAYLOADS[dialect], "bytes": payload_bytes, "sha256": payload_sha256},
        "tables": {name: {"rows": d.rows, "sha256": d.sha256} for name, d in sorted(tables.items())},
    }
    manifest["manifest_sha256"] = manifest_checksum(manifest)
    return manifest


def check_manifest(manifest: Any, *, dialect: str | None,
                   newest_schema: int = SCHEMA_VERSION) -> dict[str, Any]:
    """The manifest if it can be restored here (`dialect` None: either), else BackupRefused
    saying why. Checks its shape too: nothing in it is trusted to name a path."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupRefused(f"not a steadyserve backup: {MANIFEST} does not say format {FORMAT!r}")
    if manifest.get("manifest_sha256") != manifest_checksum(manifest):
        raise BackupRefused(f"{MANIFEST} was changed after the backup was written "
                            "(its checksum does not match)")
    version = manifest.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise BackupRefused(f"backup format version {version!r} is not one this steadyserve "
                            f"reads (up to {FORMAT_VERSION}); upgrade steadyserve")
    schema = manifest.get("schema_version")
    if not isinstance(schema, int) or schema < 0:
        raise BackupRefused(f"{MANIFEST}: schema_version must be a whole number, got {schema!r}")
    if schema > newest_schema:
        raise BackupRefused(f"the backup's schema is version {schema}, newer than this "
                            f"steadyserve understands ({newest_schema}); upgrade steadyserve")
    kind = manifest.get("dialect")
    if kind not in PAYLOADS:
        raise BackupRefused(f"{MANIFEST}: unknown dialect {kind!r}")
    if dialect is not None and kind != dialect:
        raise BackupRefused(f"the backup is of a {kind} database and the target is {dialect}; "
                            "restore it into a database of the same kind")
    payload = manifest.get("payload")
    if not isinstance(payload, dict) or payload.get("file") != PAYLOADS[kind] \
            or not isinstance(payload.get("bytes"), int) \
            or not _HEX64.match(str(payload.get("sha256"))):
        raise BackupRefused(f"{MANIFEST}: payload must be {{file: {PAYLOADS[kind]!r}, bytes, "
                            "sha256}")
    tables = manifest.get("tables")
    if not isinstance(tables, dict) or not all(
            isinstance(t, dict) and isinstance(t.get("rows"), int)
            and _HEX64.match(str(t.get("sha256"))) for t in tables.values()):
        raise BackupRefused(f"{MANIFEST}: tables must map each name to {{rows, sha256}}")
    if kind == "postgresql" and not _PG_SCHEMA.match(str(manifest.get("pg_schema"))):
        raise BackupRefused(f"{MANIFEST}: pg_schema {manifest.get('pg_schema')!r} is not a "
                            "plain schema name")
    return manifest


def compare_tables(expected: Mapping[str, Mapping[str, Any]],
                   got: Mapping[str, TableDigest]) -> list[str]:
    """What differs between the manifest's tables and `got` (tables beyond the manifest's
    are not compared: a PostgreSQL target may hold others)."""
    problems = []
    for name, want in sorted(expected.items()):
        have = got.get(name)
        if have is None:
            problems.append(f"{name}: missing")
        elif (have.rows, have.sha256) != (want["rows"], want["sha256"]):
            problems.append(f"{name}: {have.rows} rows, sha256 {have.sha256[:12]}…; expected "
                            f"{want['rows']} rows, sha256 {str(want['sha256'])[:12]}…")
    return problems


# ---- names and retention (pure) -----------------------------------------------------------

def stamp(t: float) -> str:
    return time.strftime(_STAMP, time.gmtime(t))


def scheduled_name(t: float) -> str:
    return f"scheduled-{stamp(t)}"


def scheduled_time(name: str) -> tuple[float, int] | None:
    """(UTC time, tie-breaking suffix) of a scheduled backup's directory name, else None."""
    match = SCHEDULED.match(name)
    if match is None:
        return None
    try:
        t = calendar.timegm(time.strptime(match.group(1), _STAMP))
    except ValueError:
        return None
    return float(t), int(match.group(2) or 0)


def expired(names: Iterable[str], keep: int) -> list[str]:
    """The scheduled backups to delete, oldest first: all but the `keep` newest by the time
    in their names. Other names (manual, pre-migration) are never chosen."""
    dated = sorted((when, name) for name in names if (when := scheduled_time(name)) is not None)
    return [name for _, name in dated[:max(0, len(dated) - keep)]]


def next_due(last: float | None, now: float, interval_s: float) -> float:
    """When the next scheduled backup is due: `interval_s` after the newest one, at once when
    there is none (a restart neither skips one nor takes an extra one)."""
    return now if last is None else max(now, last + interval_s)


def backup_dir(config: Config) -> Path:
    """`[backup] dir`, by default `<data_dir>/backups`."""
    return Path(config.backup.dir or os.path.join(config.data_dir, "backups"))


# ---- the I/O shell ------------------------------------------------------------------------

@contextmanager
def _mapped(what: str) -> Iterator[None]:
    try:
        yield
    except (SQLAlchemyError, sqlite3.Error, OSError, subprocess.SubprocessError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackupError(f"{what} failed: {detail}") from exc


def _dialect(url: URL) -> str:
    return "postgresql" if url.drivername.startswith("postgresql") else "sqlite"


def _in_memory(url: URL) -> bool:
    database = url.database or ""
    return database in ("", ":memory:") or database.startswith("file:")


def _sqlite_path(url: URL) -> Path:
    if _in_memory(url):
        raise BackupError("an in-memory SQLite database has nothing to back up or restore into; "
                          "use a file (sqlite:///path.db)")
    return Path(url.database or "").expanduser()


def _sqlite_engine(path: Path, *, immutable: bool) -> Engine:
    """An engine on an existing SQLite file: `immutable` (read-only, no locks, no -wal or -shm
    made beside it) for a file nobody writes, a backup's payload; else read-write."""
    mode = "mode=ro&immutable=1" if immutable else "mode=rw"
    uri = f"file:{quote(str(path.resolve()))}?{mode}"
    return create_engine("sqlite://", poolclass=NullPool,
                         creator=lambda: sqlite3.connect(uri, uri=True, check_same_thread=False,
                                                         timeout=30.0))


@contextmanager
def _sqlite_conn(path: Path, *, immutable: bool) -> Iterator[Connection]:
    """A connection on an existing SQLite file (`_sqlite_engine`), its engine disposed after."""
    engine = _sqlite_engine(path, immutable=immutable)
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def _pg_engine(url: URL) -> Engine:
    # statements unbounded here (each transaction sets it): a checksum reads a whole table
    return make_engine(url, connect_timeout_s=10.0, busy_timeout_s=30.0,
                       statement_timeout_s=pgtools.TOOL_TIMEOUT_S, pool_size=1)


def _table_ref(conn: Connection, table: str, schema: str | None) -> str:
    q = conn.dialect.identifier_preparer
    return (q.quote_schema(schema) + "." if schema else "") + q.quote(table)


def _ordered_select(conn: Connection, table: str, schema: str | None) -> str:
    """SELECT every column in primary-key order (every column when there is no key). Text
    keys sort bytewise on both dialects (COLLATE "C" = SQLite's BINARY for UTF-8), so the
    order never depends on a server's locale."""
    insp = inspect(conn)
    q = conn.dialect.identifier_preparer
    columns = insp.get_columns(table, schema=schema)
    names = [str(c["name"]) for c in columns]
    texts = {str(c["name"]) for c in columns if isinstance(c["type"], String)}
    key = list(insp.get_pk_constraint(table, schema=schema).get("constrained_columns") or names)
    pg = conn.dialect.name == "postgresql"
    order = ", ".join(q.quote(c) + (' COLLATE "C"' if pg and c in texts else "") for c in key)
    return (f"SELECT {', '.join(q.quote(c) for c in names)} "
            f"FROM {_table_ref(conn, table, schema)} ORDER BY {order}")


def read_digests(conn: Connection, schema: str | None = None) -> dict[str, TableDigest]:
    """Count and checksum of every table (of `schema` on PostgreSQL): what a manifest records
    and what a restore is compared with. Streams: memory does not grow with a table."""
    out: dict[str, TableDigest] = {}
    streamed = conn.execution_options(stream_results=True, yield_per=FETCH_ROWS) \
        if conn.dialect.name == "postgresql" else conn
    for table in sorted(inspect(conn).get_table_names(schema=schema)):
        result = streamed.exec_driver_sql(_ordered_select(conn, table, schema))
        out[table] = digest_rows(tuple(row) for row in result)
    return out


def _stamped_version(conn: Connection, schema: str | None) -> int:
    if not inspect(conn).has_table("schema_version", schema=schema):
        return 0
    version = conn.exec_driver_sql(
        f"SELECT version FROM {_table_ref(conn, 'schema_version', schema)} WHERE id = 1"
    ).scalar_one_or_none()
    return int(version or 0)


def _tables_with_rows(conn: Connection, schema: str | None) -> list[str]:
    """Tables that hold rows, the schema stamp aside (a fresh database has that row)."""
    return [t for t in sorted(inspect(conn).get_table_names(schema=schema))
            if t != "schema_version" and conn.exec_driver_sql(
                f"SELECT 1 FROM {_table_ref(conn, t, schema)} LIMIT 1").first() is not None]


def _pg_schema(conn: Connection) -> str:
    schema = conn.exec_driver_sql("SELECT current_schema()").scalar_one_or_none()
    if schema is None:
        raise BackupRefused("the database URL's search_path names no existing schema; "
                            "create it first")
    if not _PG_SCHEMA.match(str(schema)):
        raise BackupRefused(f"schema {schema!r}: only plain names (letters, digits, _) are "
                            "backed up and restored")
    return str(schema)


def file_digest(path: Path) -> tuple[int, str]:
    sha = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_manifest(dest: Path, manifest: Mapping[str, Any]) -> None:
    tmp = dest / f".{MANIFEST}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dest / MANIFEST)
    _fsync(dest)


def _prepare_dir(dest: Path) -> bool:
    """Make `dest` (mode 0700) or accept it empty; True when this call made it."""
    if dest.exists() or dest.is_symlink():
        if not dest.is_dir():
            raise BackupRefused(f"{dest} exists and is not a directory")
        if any(dest.iterdir()):
            raise BackupRefused(f"{dest} is not empty; a backup goes into a new or empty "
                                "directory")
        return False
    dest.mkdir(parents=True, mode=0o700)
    return True


def _new_dir(parent: Path, stem: str) -> Path:
    """A directory of its own under `parent`: `stem`, else `stem-1`, `stem-2`…"""
    parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    for n in range(100):
        path = parent / (stem if n == 0 else f"{stem}-{n}")
        try:
            path.mkdir(mode=0o700)
            return path
        except FileExistsError:
            continue
    raise BackupError(f"no free directory name for {stem} under {parent}")


def backup(url: str, dest: Path, *, label: str = "manual",
           wall: Callable[[], float] = time.time) -> dict[str, Any]:
    """Write a backup of the database at `url` into `dest` (new, or an empty directory) while
    it is in use, and return its manifest. Nothing is left in `dest` when it fails."""
    parsed = _normalise_url(url)
    dialect = _dialect(parsed)
    if dialect == "sqlite":
        _sqlite_path(parsed)  # in-memory: refused before a directory is made
    created = _prepare_dir(dest)
    created_at = wall()
    try:
        with _mapped("backup"):
            pg_schema: str | None = None
            if dialect == "sqlite":
                version, tables = _dump_sqlite(parsed, dest)
            else:
                version, tables, pg_schema = _dump_pg(parsed, dest)
            size, sha = file_digest(dest / PAYLOADS[dialect])
            manifest = make_manifest(dialect=dialect, schema_version=version, tables=tables,
                                     payload_bytes=size, payload_sha256=sha,
                                     created_at=created_at, label=label, pg_schema=pg_schema)
            _write_manifest(dest, manifest)
        return manifest
    except BaseException:
        for child in list(dest.iterdir()) if dest.is_dir() else []:
            child.unlink(missing_ok=True)
        if created:
            dest.rmdir()
        raise


def _dump_sqlite(url: URL, dest: Path) -> tuple[int, dict[str, TableDigest]]:
    source = _sqlite_path(url)
    if not source.is_file():
        raise BackupError(f"no SQLite database at {source}")
    partial = dest / f"{PAYLOADS['sqlite']}.partial"
    src = sqlite3.connect(source, timeout=30.0)
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        dst = sqlite3.connect(partial)
        try:
            src.backup(dst)  # all pages in one step: one read snapshot, never restarted
            # a self-contained file: no -wal beside it, and opening it read-only needs nothing
            dst.execute("PRAGMA journal_mode = DELETE").fetchone()
        finally:
            dst.close()
    finally:
        src.close()
    _fsync(partial)
    payload = dest / PAYLOADS["sqlite"]
    os.replace(partial, payload)
    with _sqlite_conn(payload, immutable=True) as conn:
        return _stamped_version(conn, None), read_digests(conn)


def _dump_pg(url: URL, dest: Path) -> tuple[int, dict[str, TableDigest], str]:
    partial = dest / f"{PAYLOADS['postgresql']}.partial"
    engine = _pg_engine(url)
    try:
        with engine.connect().execution_options(isolation_level="REPEATABLE READ",
                                                postgresql_readonly=True) as conn:
            conn.exec_driver_sql("SET LOCAL statement_timeout = 0")
            snapshot = str(conn.exec_driver_sql("SELECT pg_export_snapshot()").scalar_one())
            schema = _pg_schema(conn)
            # pg_dump reads the exported snapshot while this transaction stays open: the dump
            # and the checksums see exactly the same rows
            with pgtools.dumping(url, schema, snapshot, partial):
                version = _stamped_version(conn, schema)
                tables = read_digests(conn, schema)
            conn.rollback()
    finally:
        engine.dispose()
    _fsync(partial)
    os.replace(partial, dest / PAYLOADS["postgresql"])
    return version, tables, schema


# ---- verify and restore -------------------------------------------------------------------

def read_manifest(src: Path, *, dialect: str | None = None) -> dict[str, Any]:
    """The backup's manifest, checked (`check_manifest`); BackupRefused if it is unusable."""
    try:
        raw = (src / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise BackupRefused(f"{src} holds no {MANIFEST}: not a backup, or an unfinished "
                            "one") from None
    except OSError as exc:
        raise BackupRefused(f"cannot read {src / MANIFEST}: {exc.strerror or exc}") from exc
    try:
        manifest = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BackupRefused(f"{src / MANIFEST} is not valid JSON") from None
    return check_manifest(manifest, dialect=dialect)


def _check_payload(src: Path, manifest: Mapping[str, Any]) -> Path:
    payload = src / str(manifest["payload"]["file"])
    try:
        size, sha = file_digest(payload)
    except FileNotFoundError:
        raise BackupRefused(f"the backup's payload {payload} is missing") from None
    except OSError as exc:
        raise BackupRefused(f"cannot read {payload}: {exc.strerror or exc}") from exc
    if (size, sha) != (manifest["payload"]["bytes"], manifest["payload"]["sha256"]):
        raise BackupRefused(f"{payload} does not match its checksum in {MANIFEST} "
                            f"({size} bytes, sha256 {sha[:12]}…; expected "
                            f"{manifest['payload']['bytes']} bytes, "
                            f"{str(manifest['payload']['sha256'])[:12]}…)")
    return payload


def _refuse_mismatch(where: str, problems: list[str]) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise BackupRefused(f"{where} does not match {MANIFEST}: {problems[0]}{more}")


def verify(src: Path) -> dict[str, Any]:
    """Check a backup without restoring it: manifest, payload checksum and, for SQLite,
    every table's count and checksum in the payload. Returns the manifest."""
    manifest = read_manifest(src)
    payload = _check_payload(src, manifest)
    with _mapped("verify"):
        if manifest["dialect"] == "sqlite":
            with _sqlite_conn(payload, immutable=True) as conn:
                got = read_digests(conn)
            _refuse_mismatch(str(payload), compare_tables(manifest["tables"], got))
        else:
            pgtools.check_archive(payload)
    return manifest


def restore(src: Path, url: str, *, force: bool = False) -> dict[str, Any]:
    """Restore the backup in `src` into the database at `url` (a new one, or one without data
    unless `force`). Every check that can be made before the target changes is made before;
    the restored tables are read back and compared with the manifest. Gateways using the
    target must be stopped. Returns the manifest."""
    parsed = _normalise_url(url)
    dialect = _dialect(parsed)
    manifest = read_manifest(src, dialect=dialect)
    with _mapped("restore"):
        if dialect == "sqlite":
            _restore_sqlite(src, manifest, parsed, force)
        else:
            _restore_pg(src, manifest, parsed, force)
    return manifest


def _refuse_data(where: str, holding: list[str]) -> None:
    raise BackupRefused(f"{where} already holds data (tables {', '.join(holding[:5])}"
                        f"{'…' if len(holding) > 5 else ''}); restore into a fresh data "
                        "directory or database, or pass --force to replace it")


def _restore_sqlite(src: Path, manifest: Mapping[str, Any], url: URL, force: bool) -> None:
    target = _sqlite_path(url)
    if target.exists():
        with _sqlite_conn(target, immutable=False) as conn:
            holding = _tables_with_rows(conn, None)
        if holding and not force:
            _refuse_data(str(target), holding)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.restore-{os.getpid()}")
    try:
        _copy_verified(src / str(manifest["payload"]["file"]), tmp, manifest)
        with _sqlite_conn(tmp, immutable=True) as conn:
            got = read_digests(conn)
        _refuse_mismatch(f"the backup's payload in {src}", compare_tables(manifest["tables"], got))
        if target.exists():
            # fold the old file's write-ahead log into it and remove it: a -wal file left
            # beside the new file would be replayed onto it
            old = sqlite3.connect(target, timeout=30.0)
            try:
                old.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            finally:
                old.close()
            for suffix in ("-wal", "-shm", "-journal"):
                Path(f"{target}{suffix}").unlink(missing_ok=True)
        os.replace(tmp, target)
        _fsync(target.parent)
    finally:
        tmp.unlink(missing_ok=True)
    with _sqlite_conn(target, immutable=False) as conn:
        got = read_digests(conn)
    _fail_mismatch(str(target), compare_tables(manifest["tables"], got))


def _copy_verified(payload: Path, tmp: Path, manifest: Mapping[str, Any]) -> None:
    """Copy the payload to `tmp`, checksumming the bytes written: what is renamed into place
    is what was verified."""
    sha = hashlib.sha256()
    size = 0
    try:
        src = payload.open("rb")
    except FileNotFoundError:
        raise BackupRefused(f"the backup's payload {payload} is missing") from None
    with src, os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
        while chunk := src.read(1 << 20):
            sha.update(chunk)
            size += len(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if (size, sha.hexdigest()) != (manifest["payload"]["bytes"], manifest["payload"]["sha256"]):
        raise BackupRefused(f"{payload} does not match its checksum in {MANIFEST} "
                            f"({size} bytes, sha256 {sha.hexdigest()[:12]}…; expected "
                            f"{manifest['payload']['bytes']} bytes, "
                            f"{str(manifest['payload']['sha256'])[:12]}…)")


def _fail_mismatch(where: str, problems: list[str]) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise BackupError(f"restored, but {where} does not match {MANIFEST}: {problems[0]}"
                          f"{more}; do not serve from it")


def _restore_pg(src: Path, manifest: Mapping[str, Any], url: URL, force: bool) -> None:
    engine = _pg_engine(url)
    try:
        with engine.connect() as conn:
            schema = _pg_schema(conn)
            holding = _tables_with_rows(conn, schema)
        if holding and not force:
            _refuse_data(f"schema {schema} of {url.render_as_string(hide_password=True)}",
                         holding)
        payload = _check_payload(src, manifest)
        prelude = [f'CREATE SCHEMA IF NOT EXISTS "{schema}";\n'] + [
            f'DROP TABLE IF EXISTS "{schema}".{_pg_quote(str(t))} CASCADE;\n'
            for t in manifest["tables"]]
        pgtools.restore(payload, prelude, str(manifest["pg_schema"]), schema, url)
        with engine.connect() as conn:
            conn.exec_driver_sql("SET LOCAL statement_timeout = 0")
            got = read_digests(conn, schema)
    finally:
        engine.dispose()
    _fail_mismatch(f"schema {schema}", compare_tables(manifest["tables"], got))


def _pg_quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# ---- before a schema migration ------------------------------------------------------------

def backup_before_migration(url: str, directory: Path, old: int, new: int, *,
                            wall: Callable[[], float] = time.time) -> Path | None:
    """A backup of a database that holds data, into `directory`/pre-migration-v<old>-to-
    v<new>-<time>, before its schema is migrated; None when there is nothing to keep."""
    parsed = _normalise_url(url)
    dialect = _dialect(parsed)
    if dialect == "sqlite" and _in_memory(parsed):
        return None
    with _mapped("checking for data before the migration"):
        engine = _sqlite_engine(_sqlite_path(parsed), immutable=False) if dialect == "sqlite" \
            else _pg_engine(parsed)
        try:
            with engine.connect() as conn:
                holding = _tables_with_rows(conn, _pg_schema(conn) if dialect != "sqlite"
                                            else None)
        finally:
            engine.dispose()
    if not holding:
        return None
    with _mapped("making the backup directory"):
        dest = _new_dir(directory, f"pre-migration-v{old}-to-v{new}-{stamp(wall())}")
    started = time.monotonic()
    try:
        manifest = backup(url, dest, label=f"before migrating the schema from v{old} to v{new}",
                          wall=wall)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    log.warning("backed up the database before migrating its schema",
                extra={"path": str(dest), "from_version": old, "to_version": new,
                       "bytes": manifest["payload"]["bytes"],
                       "seconds": round(time.monotonic() - started, 3)})
    return dest


# ---- scheduled backups --------------------------------------------------------------------

class BackupScheduler:
    """`[backup] interval_s`: a backup of the state database every interval into `[backup]
    dir`, then the oldest scheduled backups beyond `keep` deleted. Started by the gateway
    process as a task (`run()`); the backup itself runs in a thread. The loop never ends by
    itself: a failure is logged and tried again after min(interval, 5 min)."""

    def __init__(self, config: Config, *, wall: Callable[[], float] = time.time,
                 sleep: Callable[[float], Any] = asyncio.sleep) -> None:
        self.settings = config.backup
        self.url = config.database
        self.directory = backup_dir(config)
        self.wall = wall
        self.sleep = sleep
        self.written = 0
        self.failures = 0

    async def run(self) -> None:
        interval = self.settings.interval_s
        if interval <= 0:
            return
        while True:
            try:
                newest = await asyncio.to_thread(self.newest)
                delay = next_due(newest, self.wall(), interval) - self.wall()
                if delay > 0:
                    await self.sleep(delay)  # then look again: another gateway may have one
                    continue
                await asyncio.to_thread(self.run_once)
            except Exception:
                self.failures += 1
                retry_s = min(interval, 300.0)
                log.exception("scheduled backup failed; trying again in %.0f s", retry_s,
                              extra={"dir": str(self.directory)})
                await self.sleep(retry_s)

    def newest(self) -> float | None:
        """Time of the newest finished scheduled backup in the directory."""
        times = [when[0] for name in self._finished()
                 if (when := scheduled_time(name)) is not None]
        return max(times, default=None)

    def _finished(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return [p.name for p in self.directory.iterdir()
                if SCHEDULED.match(p.name) and (p / MANIFEST).is_file()]

    def run_once(self) -> Path:
        """One scheduled backup and the retention after it (blocking)."""
        with _mapped("making the backup directory"):
            dest = _new_dir(self.directory, scheduled_name(self.wall()))
        started = time.monotonic()
        try:
            manifest = backup(self.url, dest, label="scheduled", wall=self.wall)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        self.written += 1
        log.info("scheduled backup written",
                 extra={"path": str(dest), "bytes": manifest["payload"]["bytes"],
                        "seconds": round(time.monotonic() - started, 3)})
        for name in expired(self._finished(), self.settings.keep):
            shutil.rmtree(self.directory / name, ignore_errors=True)
            log.info("old scheduled backup deleted", extra={"path": str(self.directory / name)})
        return dest
