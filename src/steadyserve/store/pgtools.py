"""PostgreSQL's client tools for backups (store.backup): pg_dump, pg_restore and psql.

Each is found on PATH or under /usr/lib/postgresql/*/bin, given a libpq connection string
built from the database URL (its query parameters included) with the password in PGPASSWORD,
never on a command line, and bounded in time. A failure is `ToolFailed` carrying the tool's
last line of stderr.

A dump is of one schema. Restoring it under another schema name (a fresh schema per test,
or a move) rewrites the schema-qualified names of pg_restore's SQL script on its way to psql,
outside COPY data, and psql runs the script as one transaction that stops at the first error.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from sqlalchemy.engine import URL

TOOL_TIMEOUT_S = 6 * 3600.0  # generous, but bounded
LOCK_WAIT_MS = 30_000  # pg_dump waits this long for a table lock (a migration) at most


class ToolFailed(subprocess.SubprocessError):
    """A PostgreSQL tool is missing, failed or ran out of time; the message says which."""


def tool(name: str) -> str:
    """The path of pg_dump, pg_restore or psql: on PATH, else the newest installed one."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
                        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if not candidates:
        raise ToolFailed(f"{name} was not found on PATH nor under /usr/lib/postgresql/*/bin; "
                         "install the PostgreSQL client tools")
    return str(candidates[-1])


def conninfo(url: URL) -> tuple[str, dict[str, str]]:
    """A libpq connection string for `url` and the tools' environment (PGPASSWORD)."""
    def quoted(value: object) -> str:
        return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"

    parts: dict[str, object] = {"host": url.host, "port": url.port, "user": url.username,
                                "dbname": url.database}
    for key, value in url.query.items():
        parts[key] = value[-1] if isinstance(value, tuple) else value
    env = dict(os.environ)
    if url.password is not None:
        env["PGPASSWORD"] = str(url.password)
    return " ".join(f"{k}={quoted(v)}" for k, v in parts.items() if v is not None), env


def _failed(name: str, err: IO[bytes], code: int) -> ToolFailed:
    err.seek(0)
    lines = [ln for ln in err.read().decode(errors="replace").splitlines() if ln.strip()]
    return ToolFailed(f"{name} failed (exit {code}): {lines[-1] if lines else 'no message'}")


def _end(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@contextmanager
def dumping(url: URL, schema: str, snapshot: str, out: Path) -> Iterator[None]:
    """Run `pg_dump --format=custom` of `schema` in the exported `snapshot` into `out` while
    the body runs (the exporting transaction must stay open until it ends); wait for it."""
    info, env = conninfo(url)
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [tool("pg_dump"), "--format=custom", f'--schema="{schema}"', "--no-owner",
             "--no-privileges", f"--snapshot={snapshot}", f"--lock-wait-timeout={LOCK_WAIT_MS}",
             f"--file={out}", f"--dbname={info}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env)
        try:
            yield
            proc.wait(TOOL_TIMEOUT_S)
        finally:
            _end(proc)
        if proc.returncode != 0:
            raise _failed("pg_dump", err, proc.returncode)


def check_archive(payload: Path) -> None:
    """pg_restore can read the archive's table of contents."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.run([tool("pg_restore"), "--list", str(payload)], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=err, timeout=TOOL_TIMEOUT_S,
                              check=False)
        if proc.returncode != 0:
            raise _failed("pg_restore --list", err, proc.returncode)


def rename_schema(lines: Iterable[str], old: str, new: str) -> Iterator[str]:
    """pg_restore's SQL script with schema `old` renamed `new` in qualified names (also the
    sequence names in nextval / setval literals); COPY data passes untouched. `CREATE SCHEMA
    old;` is dropped: the restore creates the target's schema itself."""
    qualified = re.compile(r'(?<![\w"$.])(?:' + re.escape(old) + r'|"' + re.escape(old) + r'")\.')
    creates = {f"CREATE SCHEMA {old};", f'CREATE SCHEMA "{old}";'}
    in_copy = False
    for line in lines:
        if in_copy:
            in_copy = line.rstrip("\r\n") != "\\."
            yield line
            continue
        if line.strip() in creates:
            continue
        if old != new:
            line = qualified.sub(lambda _m: f'"{new}".', line)
        in_copy = line.startswith("COPY ") and line.rstrip().endswith("FROM stdin;")
        yield line


def restore(payload: Path, prelude: list[str], old: str, new: str, url: URL) -> None:
    """pg_restore's script of `payload`, schema `old` renamed `new`, after `prelude`, into
    `url` through psql, streamed, in one transaction: a failed restore changes nothing."""
    info, env = conninfo(url)
    with tempfile.TemporaryFile() as restore_err, tempfile.TemporaryFile() as psql_err:
        reader = subprocess.Popen(
            [tool("pg_restore"), "--no-owner", "--no-privileges", "--no-comments", "-f", "-",
             str(payload)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=restore_err,
            env=env)
        try:
            writer = subprocess.Popen(
                [tool("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction",
                 "-f", "-", f"--dbname={info}"],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=psql_err, env=env)
            try:
                assert reader.stdout is not None and writer.stdin is not None
                deadline = time.monotonic() + TOOL_TIMEOUT_S
                _pipe(reader.stdout, writer.stdin, prelude, old, new)
                reader.stdout.close()  # psql stopped early: pg_restore must not block on us
                writer.wait(max(1.0, deadline - time.monotonic()))
                reader.wait(max(1.0, deadline - time.monotonic()))
            finally:
                _end(writer)
        finally:
            _end(reader)
        if writer.returncode != 0:  # psql's error first: pg_restore then only lost its pipe
            raise _failed("psql", psql_err, writer.returncode)
        if reader.returncode != 0:
            raise _failed("pg_restore", restore_err, reader.returncode)


def _pipe(source: IO[bytes], sink: IO[bytes], prelude: list[str], old: str, new: str) -> None:
    try:
        for line in prelude:
            sink.write(line.encode())
        text = (raw.decode("utf-8", errors="surrogateescape") for raw in source)
        for line in rename_schema(text, old, new):
            sink.write(line.encode("utf-8", errors="surrogateescape"))
    except BrokenPipeError:
        pass  # psql stopped at an error: its exit status and message tell which
    finally:
        try:
            sink.close()
        except BrokenPipeError:
            pass
