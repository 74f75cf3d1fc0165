"""`steadyserve status` and `steadyserve rollout`: talk to a running gateway's HTTP API.

stdlib urllib on purpose: these run once per command, and the runtime needs no HTTP client.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from typing import Any

from . import exit_codes


def _call(method: str, url: str, body: dict[str, Any] | None, timeout_s: float) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"null")
        except ValueError:
            return exc.code, {"error": {"message": exc.reason}}


def get_json(url: str, path: str) -> Any:
    """GET a gateway API path; None (after saying why on stderr) when it fails."""
    try:
        code, body = _call("GET", f"{url}{path}", None, 10)
    except OSError as exc:
        print(f"steadyserve: cannot reach {url}: {exc}", file=sys.stderr)
        return None
    if code != 200:
        print(json.dumps(body, indent=2), file=sys.stderr)
        return None
    return body


def status(args: argparse.Namespace) -> int:
    body = get_json(args.url, "/v1/deployments")
    if body is None:
        return exit_codes.FAILURE
    for d in body["deployments"]:
        print(f"{d['name']}: {d['ready_replicas']}/{d['desired_replicas']} ready, "
              f"version {d['version'] or '-'}")
        for r in d["replicas"]:
            print(f"  {r['id']:<16} {r['state']:<10} pid {r.get('pid') or '-':<8} "
                  f"restarts {r.get('restarts', 0)}")
    return exit_codes.OK


def rollout(args: argparse.Namespace) -> int:
    changes: dict[str, Any] = {}
    if args.service:
        changes["service"] = args.service
    if args.replicas is not None:
        changes["replicas"] = args.replicas
    for item in args.env or []:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"steadyserve: --env takes KEY=VALUE, got {item!r}", file=sys.stderr)
            return exit_codes.USAGE
        changes.setdefault("env", {})[key] = value
    print(f"rolling out {args.deployment}: {json.dumps(changes) or 'restart every replica'}",
          file=sys.stderr)
    try:
        code, body = _call("POST", f"{args.url}/v1/admin/deployments/{args.deployment}/rollout",
                           changes, args.timeout_s)
    except OSError as exc:
        print(f"steadyserve: cannot reach {args.url}: {exc}", file=sys.stderr)
        return exit_codes.FAILURE
    if code != 200:
        message = (body or {}).get("error", {}).get("message", body)
        print(f"steadyserve: rollout failed ({code}): {message}", file=sys.stderr)
        return exit_codes.FAILURE
    print(f"revision {body['revision']} of {body['deployment']} is serving "
          f"({len(body['replicas'])} replicas, {body['duration_s']} s)")
    return exit_codes.OK
