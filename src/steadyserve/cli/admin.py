"""`steadyserve status` and `steadyserve rollout`: talk to a running gateway's HTTP API.

stdlib urllib on purpose: these run once per command, and the runtime needs no HTTP client.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from . import exit_codes
from .credentials import auth_headers


def call_json(method: str, url: str, body: dict[str, Any] | bytes | None, timeout_s: float,
              headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """(status, decoded JSON answer) of one API call; `body` as a dict (sent as JSON) or
    bytes already encoded; the key the CLI found for `url` goes with it."""
    data = body if isinstance(body, bytes) else \
        json.dumps(body).encode() if body is not None else None
    headers = {"content-type": "application/json", **(headers or {}), **auth_headers(url)}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
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
        code, body = call_json("GET", f"{url}{path}", None, 10)
    except OSError as exc:
        print(f"steadyserve: cannot reach {url}: {exc}", file=sys.stderr)
        return None
    if code != 200:
        err = body.get("error") if isinstance(body, dict) else None
        message = err.get("message") if isinstance(err, dict) else json.dumps(body)[:300]
        print(f"steadyserve: {path.split('?')[0]} refused ({code}): {message}", file=sys.stderr)
        return None
    return body


def status(args: argparse.Namespace) -> int:
    """Deployments, replicas, autoscaling, alerts and the cluster: rich tables, or --json."""
    body = get_json(args.url, "/v1/deployments")
    if body is None:
        return exit_codes.FAILURE
    alerts = get_json(args.url, "/v1/alerts") or {}
    cluster = get_json(args.url, "/v1/cluster") or {}
    if args.json:
        print(json.dumps({"deployments": body["deployments"], "cluster": cluster,
                          "alerts": alerts.get("alerts", [])}, indent=2))
        return exit_codes.OK
    from rich.console import Console
    from rich.table import Table

    # soft_wrap: a long line stays one line (for grep); markup off: names are not markup
    console = Console(soft_wrap=True, markup=False, highlight=False)
    for d in body["deployments"]:
        table = Table(title=f"{d['name']}: {d['ready_replicas']}/{d['desired_replicas']} ready, "
                            f"version {d['version'] or '-'}, balancer {d['balancer']}",
                      title_justify="left")
        for col in ("replica", "state", "revision", "pid", "restarts", "ready for", "ejected"):
            table.add_column(col)
        for r in d["replicas"]:
            table.add_row(r["id"], r["state"] + (" (retiring)" if r.get("retiring") else ""),
                          str(r.get("revision", 0)), str(r.get("pid") or "-"),
                          str(r.get("restarts", 0)), f"{r.get('ready_for_s', 0):g}s",
                          "yes" if r.get("ejected") else "")
        console.print(table)
        scale = d.get("autoscale")
        if scale:
            console.print(f"  autoscale {scale['min_replicas']}..{scale['max_replicas']} "
                          f"replicas, target {scale['target_ongoing_requests']:g} ongoing each; "
                          f"demand now {scale['demand']:g}"
                          f"{', panicking' if scale['panicking'] else ''}")
            for e in scale["events"][:AUTOSCALE_EVENTS_SHOWN]:
                when = time.strftime("%H:%M:%S", time.localtime(e["at"]))
                console.print(f"    {when} {e['from']} -> {e['to']}: {e['reason']}")
    firing = [a for a in alerts.get("alerts", []) if a.get("state") == "firing"]
    console.print(f"alerts: {len(firing)} firing" + "".join(
        f"\n  {a['rule']} {a.get('labels', {}).get('deployment', '')} ({a.get('severity', '')})"
        for a in firing))
    if cluster.get("enabled"):
        leader = "this gateway leads" if cluster.get("leading") else \
            f"led by {cluster.get('leader')}"
        console.print(f"cluster: {leader}")
    return exit_codes.OK


AUTOSCALE_EVENTS_SHOWN = 5  # the newest scaling decisions under each deployment


ROLLOUT_POLL_S = 0.5
ROLLOUT_CALL_TIMEOUT_S = 30.0


def rollout(args: argparse.Namespace) -> int:
    """Post a new target (or cancel the running rollout), then follow it to its outcome."""
    path = f"{args.url}/v1/admin/deployments/{args.deployment}/rollout"
    changes: dict[str, Any] = {}
    if args.service:
        changes["service"] = args.service
    if args.replicas is not None:
        changes["replicas"] = args.replicas
    if args.balancer:
        changes["balancer"] = args.balancer
    if args.torch_threads is not None:
        changes["torch_threads"] = args.torch_threads
    for item in args.env or []:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"steadyserve: --env takes KEY=VALUE, got {item!r}", file=sys.stderr)
            return exit_codes.USAGE
        changes.setdefault("env", {})[key] = value
    if args.cancel and changes:
        print("steadyserve: --cancel takes no changes", file=sys.stderr)
        return exit_codes.USAGE
    try:
        if args.cancel:
            code, body = call_json("DELETE", path, None, ROLLOUT_CALL_TIMEOUT_S)
        else:
            print(f"rolling out {args.deployment}: "
                  f"{json.dumps(changes) if changes else 'restart every replica'}", file=sys.stderr)
            code, body = call_json("POST", path, changes, ROLLOUT_CALL_TIMEOUT_S)
    except OSError as exc:
        print(f"steadyserve: cannot reach {args.url}: {exc}", file=sys.stderr)
        return exit_codes.FAILURE
    if code not in (200, 202):
        message = body.get("error", {}).get("message", body) if isinstance(body, dict) else body
        print(f"steadyserve: rollout refused ({code}): {message}", file=sys.stderr)
        return exit_codes.FAILURE
    if args.cancel:
        print(f"cancelled revision {body['revision']} of {body['deployment']}; going back to "
              f"revision {body['good_revision']}")
    else:
        print(f"revision {body['revision']} of {body['deployment']} is rolling out")
    if args.no_wait:
        return exit_codes.OK
    return _follow(path, body, args.timeout_s)


def _progress_line(body: dict[str, Any]) -> str:
    p = body["progress"]
    return (f"revision {body['revision']} {body['state']}: target revision "
            f"{body['target']['revision']}, {p['ready']}/{p['desired']} ready, "
            f"{p['updated'] - p['ready']} starting, {p['old']} old, {p['draining']} draining")


def _follow(path: str, body: dict[str, Any], timeout_s: float) -> int:
    """Poll the rollout until it is done (0), failed or cancelled (1), or the wait ends."""
    revision = body["revision"]
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        line = _progress_line(body)
        if line != last:
            print(line)
            last = line
        state = body["state"]
        if body["revision"] != revision:
            print(f"steadyserve: revision {body['revision']} replaced revision {revision} "
                  "(another rollout)", file=sys.stderr)
            return exit_codes.FAILURE
        if state == "done":
            print(f"revision {revision} of {body['deployment']} is serving "
                  f"({body['progress']['ready']} replicas)")
            return exit_codes.OK
        if state in ("failed", "cancelled") and body["progress"]["converged"]:
            print(f"steadyserve: rollout of revision {revision} {state}: {body['reason']}; "
                  f"revision {body['good_revision']} serves again", file=sys.stderr)
            return exit_codes.FAILURE
        if time.monotonic() >= deadline:
            print(f"steadyserve: still {state} after {timeout_s:g}s; it goes on in the gateway "
                  f"(steadyserve rollout {body['deployment']} --cancel stops it)", file=sys.stderr)
            return exit_codes.FAILURE
        time.sleep(ROLLOUT_POLL_S)
        try:
            code, got = call_json("GET", path, None, ROLLOUT_CALL_TIMEOUT_S)
        except OSError as exc:  # a gateway restarting: it resumes the rollout; keep asking
            print(f"steadyserve: cannot reach the gateway ({exc}); retrying", file=sys.stderr)
            continue
        if code != 200:
            print(f"steadyserve: cannot read the rollout ({code}): {got}", file=sys.stderr)
            return exit_codes.FAILURE
        body = got
