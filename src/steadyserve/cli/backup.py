"""`steadyserve backup PATH` and `steadyserve restore PATH`: the state database (the same
`database_url` / `data_dir` as `steadyserve run`) to and from a backup directory
(store.backup). A backup is taken while gateways serve; a restore goes into a database no
gateway uses."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError, SteadyError
from ..settings import load_config
from . import exit_codes

_TARGET = ("The database is the one `steadyserve run` would use: --config (default "
           "./steadyserve.toml), STEADYSERVE_DATABASE_URL, else <data_dir>/steadyserve.db.")


_BACKUP = ("Write a backup of the state database (API keys, feedback, alert history, "
           "rollout state, usage, and a service's tables in the same database, e.g. the risk "
           "example's features) into PATH, a new or empty directory: manifest.json (schema "
           "version, row counts and SHA-256 per table) and the payload (SQLite: the online "
           "backup API; PostgreSQL: pg_dump of the URL's schema). Gateways keep serving. ")
_RESTORE = ("Verify the backup in PATH (the manifest's checksum, the payload's SHA-256, the "
            "schema version, the dialect), refuse a mismatch, then restore it into the target "
            "and check every table's row count and checksum read back from it. The target "
            "must hold no data (--force replaces it) and no gateway may be using it. The data "
            "directory's admin.key is not in a backup: a gateway started on a new data "
            "directory writes its own; the keys made with `steadyserve keys` are restored. ")


def add_parser(verbs: Any) -> None:
    examples = argparse.RawDescriptionHelpFormatter
    bk = verbs.add_parser(
        "backup", help="write a consistent backup of the state database while gateways serve",
        description=textwrap.fill(_BACKUP + _TARGET, 88), formatter_class=examples,
        epilog="examples:\n  steadyserve backup backups/2026-12-02\n"
               "  steadyserve backup /srv/backups/ss-$(date +%F) --config steadyserve.toml\n"
               "  STEADYSERVE_DATABASE_URL=postgresql://ss@db/ss steadyserve backup "
               "/srv/backups/nightly --json")
    bk.add_argument("path", help="a new or empty directory")
    _common(bk)
    rs = verbs.add_parser(
        "restore", help="verify a backup, then restore it into a fresh data directory or "
                        "database",
        description=textwrap.fill(_RESTORE + _TARGET, 88), formatter_class=examples,
        epilog="examples:\n  steadyserve restore backups/2026-12-02 --data-dir /srv/steadyserve\n"
               "  steadyserve restore backups/2026-12-02 --verify-only\n"
               "  STEADYSERVE_DATABASE_URL=postgresql://ss@db2/ss steadyserve restore "
               "/srv/backups/nightly\n"
               "  steadyserve restore backups/2026-12-02 --config steadyserve.toml --force")
    rs.add_argument("path", help="a directory written by `steadyserve backup`")
    rs.add_argument("--force", action="store_true",
                    help="replace a target that holds data (its tables named in the backup)")
    rs.add_argument("--verify-only", dest="verify_only", action="store_true",
                    help="only check the backup; change nothing")
    _common(rs)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="steadyserve.toml naming the database (default: "
                        "./steadyserve.toml, STEADYSERVE_DATABASE_URL, or .steadyserve/)")
    parser.add_argument("--data-dir", dest="data_dir",
                        help="the data directory (its steadyserve.db unless a database_url "
                             "is configured)")
    parser.add_argument("--json", action="store_true", help="print the manifest and timings "
                        "as JSON")


def _url(args: argparse.Namespace) -> str | None:
    try:
        config = load_config(config_path=args.config, flags={"data_dir": args.data_dir},
                             env=os.environ)
    except ConfigError as exc:
        print(f"steadyserve: {exc.message}", file=sys.stderr)
        return None
    return config.database


def _shown(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _totals(manifest: dict[str, Any]) -> str:
    tables = manifest["tables"]
    rows = sum(int(t["rows"]) for t in tables.values())
    return (f"{len(tables)} tables, {rows:,} rows, {manifest['payload']['bytes']:,} bytes "
            f"({manifest['dialect']}, schema v{manifest['schema_version']})")


def _report(args: argparse.Namespace, manifest: dict[str, Any], seconds: float, line: str) -> None:
    if args.json:
        print(json.dumps({**manifest, "seconds": round(seconds, 3)}, indent=2))
    else:
        print(line)


def backup(args: argparse.Namespace) -> int:
    from ..store import backup as store  # SQLAlchemy: imported only when the verb runs

    url = _url(args)
    if url is None:
        return exit_codes.CONFIG
    started = time.monotonic()
    try:
        manifest = store.backup(url, Path(args.path))
    except SteadyError as exc:
        print(f"steadyserve: backup not written: {exc.message}", file=sys.stderr)
        return exit_codes.CONFIG if isinstance(exc, ConfigError) else exit_codes.FAILURE
    seconds = time.monotonic() - started
    _report(args, manifest, seconds,
            f"backed up {_shown(url)} to {args.path}: {_totals(manifest)} in {seconds:.2f} s")
    return exit_codes.OK


def restore(args: argparse.Namespace) -> int:
    from ..store import backup as store

    started = time.monotonic()
    try:
        if args.verify_only:
            manifest = store.verify(Path(args.path))
            seconds = time.monotonic() - started
            _report(args, manifest, seconds,
                    f"{args.path} verifies: {_totals(manifest)}, written "
                    f"{manifest['created_at_utc']} ({seconds:.2f} s)")
            return exit_codes.OK
        url = _url(args)
        if url is None:
            return exit_codes.CONFIG
        manifest = store.restore(Path(args.path), url, force=args.force)
    except SteadyError as exc:
        print(f"steadyserve: restore refused: {exc.message}"
              if isinstance(exc, store.BackupRefused)
              else f"steadyserve: restore failed: {exc.message}", file=sys.stderr)
        return exit_codes.CONFIG if isinstance(exc, ConfigError) else exit_codes.FAILURE
    seconds = time.monotonic() - started
    _report(args, manifest, seconds,
            f"restored {args.path} into {_shown(url)}: {_totals(manifest)}, every table's "
            f"count and checksum verified, in {seconds:.2f} s")
    return exit_codes.OK
