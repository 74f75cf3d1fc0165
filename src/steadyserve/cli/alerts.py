"""`steadyserve alerts`, `steadyserve silence`, `steadyserve export prometheus-rules`."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

from ..errors import ConfigError
from ..observe.prom_rules import prometheus_rules
from ..settings import load_config
from . import exit_codes
from .admin import call_json, get_json

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    m = _DURATION.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"duration must look like 30m, 2h or 1d, got {text!r}")
    return float(m.group(1)) * _UNIT[m.group(2)]


def _when(t: float | None) -> str:
    return "-" if not t else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def alerts(args: argparse.Namespace) -> int:
    body = get_json(args.url, "/v1/alerts")
    if body is None:
        return exit_codes.FAILURE
    if args.json:
        print(json.dumps(body, indent=2))
        return exit_codes.OK
    print(f"active ({len(body['alerts'])}):")
    for a in body["alerts"]:
        muted = " (muted)" if a.get("silenced_by") or a.get("inhibited") else ""
        print(f"  {a['state']:<8} {a['labels'].get('severity', ''):<7} {a['key']}{muted}"
              f"  since {_when(a.get('active_since'))}")
    print(f"silences ({len(body['silences'])}):")
    for s in body["silences"]:
        print(f"  {s['id']}  {s['matchers']}  until {_when(s['ends_at'])}  {s['comment']}")
    print("recent automatic actions:")
    for r in body.get("actions", [])[:10]:
        print(f"  {_when(r['at'])}  {r['action']} {r['target']}: {r['outcome']} ({r['detail']})"
              f"  ← {r['rule']}")
    print("recent transitions:")
    for t in body.get("history", [])[:20]:
        print(f"  {_when(t['at'])}  {t['fingerprint']}: {t['from_state']} → {t['to_state']}")
    return exit_codes.OK


def silence(args: argparse.Namespace) -> int:
    matchers = {}
    if not args.match and not args.match_all:
        print("steadyserve: give --match LABEL=VALUE (repeatable), or --match-all",
              file=sys.stderr)
        return exit_codes.USAGE
    for item in args.match:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"steadyserve: --match takes LABEL=VALUE, got {item!r}", file=sys.stderr)
            return exit_codes.USAGE
        matchers[key] = value
    try:
        duration = parse_duration(args.duration)
    except ValueError as exc:
        print(f"steadyserve: {exc}", file=sys.stderr)
        return exit_codes.USAGE
    body = {"matchers": matchers, "duration_s": duration, "created_by": args.by,
            "comment": args.comment, "match_all": bool(args.match_all)}
    try:
        code, reply = call_json("POST", f"{args.url}/v1/silences", body, 10)
    except OSError as exc:
        print(f"steadyserve: cannot reach {args.url}: {exc}", file=sys.stderr)
        return exit_codes.FAILURE
    if code != 201:
        print(f"steadyserve: {reply}", file=sys.stderr)
        return exit_codes.FAILURE
    print(f"silence {reply['id']} until {_when(reply['ends_at'])}")
    return exit_codes.OK


def export(args: argparse.Namespace) -> int:
    try:
        config = load_config(config_path=args.config, env=os.environ)
    except ConfigError as exc:
        print(f"steadyserve: {exc}", file=sys.stderr)
        return exit_codes.CONFIG
    text = prometheus_rules(config.alerting)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return exit_codes.OK
