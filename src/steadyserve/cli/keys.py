"""`steadyserve keys create|list|rotate|revoke`: API keys, straight in the database the
gateways read (the same `database_url` / `data_dir` as `steadyserve run`), so keys can be
made before the first gateway starts on a public address. Every gateway sharing the
database sees a change within `[auth] key_refresh_s`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from ..auth.keys import SCOPES, ApiKey, parse_spec
from ..errors import ConfigError, SteadyError
from ..settings import load_config
from . import exit_codes
from .alerts import parse_duration

if TYPE_CHECKING:
    from ..store.keys import KeyStore


def add_parser(verbs: Any) -> None:
    keys = verbs.add_parser(
        "keys", help="create, list, rotate and revoke API keys",
        description=("API keys, sent as 'Authorization: Bearer <key>'. Scopes: infer (call "
                     "models), feedback, admin (everything). Examples:\n"
                     "  steadyserve keys create web-app --scope infer --rate-limit 50\n"
                     "  steadyserve keys create nightly --priority batch --deployment minilm\n"
                     "  steadyserve keys list\n"
                     "  steadyserve keys rotate web-app --grace 1h\n"
                     "  steadyserve keys revoke web-app\n"
                     "  steadyserve keys usage --days 30"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    keys.add_argument("--config", help="steadyserve.toml naming the database (default: "
                      "./steadyserve.toml, STEADYSERVE_DATABASE_URL, or .steadyserve/)")
    sub = keys.add_subparsers(dest="keys_verb", metavar="ACTION", required=True)
    examples = argparse.RawDescriptionHelpFormatter
    create = sub.add_parser(
        "create", help="make a key; its secret is printed once", formatter_class=examples,
        epilog="examples:\n  steadyserve keys create web-app --scope infer --rate-limit 50\n"
               "  steadyserve keys create nightly --priority batch --deployment minilm\n"
               "  steadyserve keys create ops --scope admin --expires-in 30d --json")
    create.add_argument("name")
    create.add_argument("--scope", action="append", choices=SCOPES, dest="scopes",
                        help="repeat for several (default: infer)")
    create.add_argument("--rate-limit", type=float, default=0.0, dest="rate_limit_per_s",
                        help="requests per second (default: no limit)")
    create.add_argument("--burst", type=int, help="requests at once (default: one second's worth)")
    create.add_argument("--priority", choices=("interactive", "batch"), default="interactive",
                        help="batch: its requests are shed first under overload")
    create.add_argument("--deployment", action="append", dest="deployments",
                        help="only these deployments (repeat; default: all)")
    create.add_argument("--expires-in", dest="expires_in", help="e.g. 30d, 12h (default: never)")
    create.add_argument("--json", action="store_true")
    listing = sub.add_parser(
        "list", help="keys and their settings (never their secrets)", formatter_class=examples,
        epilog="examples:\n  steadyserve keys list\n  steadyserve keys list --all --json")
    listing.add_argument("--all", action="store_true", help="include revoked and expired keys")
    listing.add_argument("--json", action="store_true")
    rotate = sub.add_parser(
        "rotate", help="a new secret for a key (same id and settings)", formatter_class=examples,
        epilog="examples:\n  steadyserve keys rotate web-app --grace 1h\n"
               "  steadyserve keys rotate ss_3f9a2c_ --json")
    rotate.add_argument("key", help="id, ss_<id>_ prefix, or name")
    rotate.add_argument("--grace", default="0s", help="how long the old secret still works "
                        "(e.g. 1h; default: not at all)")
    rotate.add_argument("--json", action="store_true")
    revoke = sub.add_parser(
        "revoke", help="refuse a key from now on (every gateway, within 1 s)",
        formatter_class=examples,
        epilog="examples:\n  steadyserve keys revoke web-app\n  steadyserve keys revoke ss_3f9a2c_")
    revoke.add_argument("key", help="id, ss_<id>_ prefix, or name")
    usage = sub.add_parser(
        "usage", help="requests, 5xx and 4xx per key and deployment (as stored: the gateways "
        "add theirs every [auth] usage_flush_s)", formatter_class=examples,
        epilog="examples:\n  steadyserve keys usage\n  steadyserve keys usage --days 30 --json")
    usage.add_argument("--days", type=int, default=7, help="UTC days back, today included "
                       "(default 7)")
    usage.add_argument("--json", action="store_true")


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _row(k: ApiKey) -> str:
    limits = f"{k.rate_limit_per_s:g}/s burst {k.burst}" if k.rate_limit_per_s else "no limit"
    state = "revoked" if k.revoked_at is not None else (
        "expired" if k.expires_at is not None and k.expires_at <= time.time() else "active")
    return (f"ss_{k.id}_…  {k.name:<20} {','.join(sorted(k.scopes)):<16} {state:<8} "
            f"{k.priority:<11} {limits:<20} {','.join(k.deployments) or 'all':<12} "
            f"created {_when(k.created_at)}  expires {_when(k.expires_at)}")


def keys(args: argparse.Namespace) -> int:
    from ..store import Database  # SQLAlchemy: imported only when the verb runs
    from ..store.keys import KeyStore

    try:
        config = load_config(config_path=args.config, env=os.environ)
        db = Database(config.database)
    except SteadyError as exc:
        print(f"steadyserve: {exc.message}", file=sys.stderr)
        return exit_codes.CONFIG if isinstance(exc, ConfigError) else exit_codes.FAILURE
    store = KeyStore(db, max_keys=config.auth.max_keys)
    try:
        return _do(args, store)
    except SteadyError as exc:
        print(f"steadyserve: {exc.message}", file=sys.stderr)
        return exit_codes.USAGE if exc.status < 500 and exc.status != 409 else exit_codes.FAILURE
    finally:
        db.close()


def _do(args: argparse.Namespace, store: KeyStore) -> int:
    from ..auth import manage

    out: dict[str, Any]
    if args.keys_verb == "create":
        body: dict[str, Any] = {"name": args.name, "scopes": args.scopes or ["infer"],
                                "rate_limit_per_s": args.rate_limit_per_s,
                                "priority": args.priority, "deployments": args.deployments or []}
        if args.burst is not None:
            body["burst"] = args.burst
        if args.expires_in:
            try:
                body["expires_in_s"] = parse_duration(args.expires_in)
            except ValueError as exc:
                print(f"steadyserve: --expires-in: {exc}", file=sys.stderr)
                return exit_codes.USAGE
        key, token = manage.create(store, parse_spec(body), created_by=f"cli:{_user()}")
        out = {**key.public(), "key": token}
        if args.json:
            print(json.dumps(out, indent=2))
        else:
            print(token)
            print(f"created {key.name} (ss_{key.id}_…, scopes {','.join(sorted(key.scopes))}); "
                  "the secret above is shown only now", file=sys.stderr)
        return exit_codes.OK
    if args.keys_verb == "usage":
        return _usage(args, store)
    if args.keys_verb == "list":
        now = time.time()
        listed = [k for k in store.load() if args.all or k.active(now)]
        if args.json:
            print(json.dumps([k.public() for k in listed], indent=2))
        else:
            for k in listed:
                print(_row(k))
        return exit_codes.OK
    if args.keys_verb == "rotate":
        try:
            grace = parse_duration(args.grace)
        except ValueError as exc:
            print(f"steadyserve: --grace: {exc}", file=sys.stderr)
            return exit_codes.USAGE
        key, token = manage.rotate(store, args.key, grace_s=grace)
        if args.json:
            print(json.dumps({**key.public(), "key": token}, indent=2))
        else:
            print(token)
            until = f"until {_when(key.previous_valid_until)}" if key.previous_valid_until \
                else "no longer"
            print(f"rotated {key.name} (ss_{key.id}_…); the old secret works {until}",
                  file=sys.stderr)
        return exit_codes.OK
    key = manage.revoke(store, args.key)
    print(f"revoked {key.name} (ss_{key.id}_…)")
    return exit_codes.OK


def _user() -> str:
    try:
        return os.getlogin()
    except OSError:
        return str(os.getuid())


def _usage(args: argparse.Namespace, store: KeyStore) -> int:
    from ..store.usage import DAY_S, UsageStore

    if not 1 <= args.days <= 366:
        print("steadyserve: --days must be from 1 to 366", file=sys.stderr)
        return exit_codes.USAGE
    rows = UsageStore(store.db).totals(time.time() - (args.days - 1) * DAY_S, 1000)
    names = {k.id: k.name for k in store.load()}
    rows = [{**r, "name": names.get(r["key_id"])} for r in rows]
    if args.json:
        print(json.dumps(rows, indent=2))
        return exit_codes.OK
    print(f"{'key':<18} {'name':<20} {'deployment':<16} {'requests':>10} {'5xx':>8} {'4xx':>8}"
          "  last seen")
    for r in rows:
        print(f"ss_{r['key_id']}_…  {r['name'] or '-':<20} {r['deployment']:<16} "
              f"{r['requests']:>10} {r['errors']:>8} {r['rejected']:>8}  {_when(r['last_seen'])}")
    return exit_codes.OK
