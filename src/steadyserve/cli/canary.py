"""`steadyserve canary start|status|abort DEPLOYMENT`: a progressive rollout to the candidate
deployment the configuration names ([deployments.X.canary]), judged on the evidence
(control.canary). `status` shows the step, the share, the last verdict with each check's
figures, and the history of steps."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from . import exit_codes
from .admin import call_json, get_json


def add_parser(verbs: Any, url_help: str) -> None:
    ca = verbs.add_parser(
        "canary", help="progressive rollout to a candidate deployment: steps, statistical "
                       "verdicts, automatic promotion or rollback",
        description=("Start, follow or abort the canary of a deployment. The candidate gets "
                     "the plan's first share of traffic (sticky per session or user); each step "
                     "advances when the candidate is not worse than the baseline on errors, "
                     "latency and (with labels) feedback accuracy, and it rolls back at once "
                     "when it is clearly worse or an alert fires on it. 'Not enough data' "
                     "waits, and says so."),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  steadyserve canary start risk\n  steadyserve canary status risk\n"
               "  steadyserve canary status risk --json | jq .verdict\n"
               "  steadyserve canary abort risk")
    ca.add_argument("action", choices=["start", "status", "abort"])
    ca.add_argument("deployment")
    ca.add_argument("--json", action="store_true", help="print the API's JSON")
    ca.add_argument("--url", default="http://127.0.0.1:8000", help=url_help)


def canary(args: argparse.Namespace) -> int:
    path = f"/v1/admin/deployments/{args.deployment}/canary"
    if args.action == "status":
        body = get_json(args.url, path)
        if body is None:
            return exit_codes.FAILURE
    else:
        method = "POST" if args.action == "start" else "DELETE"
        try:
            code, body = call_json(method, f"{args.url}{path}", None, 10)
        except OSError as exc:
            print(f"steadyserve: cannot reach {args.url}: {exc}", file=sys.stderr)
            return exit_codes.FAILURE
        if code != 200:
            err = body.get("error") if isinstance(body, dict) else None
            message = err.get("message") if isinstance(err, dict) else json.dumps(body)[:300]
            print(f"steadyserve: canary {args.action} refused ({code}): {message}",
                  file=sys.stderr)
            return exit_codes.FAILURE
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        show(body)
    return exit_codes.OK


def show(body: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True, markup=False, highlight=False)
    steps = " → ".join(f"{s:g}%" for s in body["steps"]) + " → 100%"
    console.print(f"{body['deployment']} → {body['candidate']}: {body['state']}, step "
                  f"{body['step'] + 1}/{len(body['steps'])} at {body['percent']:g} % "
                  f"(plan {steps})")
    verdict = body.get("verdict")
    if body["state"] == "running" and verdict is not None:
        console.print(f"  now: {verdict['action']}: {verdict['reason']}")
    elif body.get("reason"):
        console.print(f"  {body['reason']}")
    base, cand = body["baseline"], body["candidate_arm"]
    console.print(f"  this step: baseline {base['requests']} requests ({base['errors']} errors, "
                  f"{base['labelled']} labels), candidate {cand['requests']} ({cand['errors']} "
                  f"errors, {cand['labelled']} labels, {cand['failovers']} answered by the "
                  f"baseline)")
    if verdict is not None and verdict["checks"]:
        table = Table(title="evidence (last look)", title_justify="left")
        for col in ("metric", "verdict", "baseline", "candidate", "test"):
            table.add_column(col)
        for c in verdict["checks"]:
            table.add_row(c["metric"], c["verdict"], *_figures(c))
        console.print(table)
    for h in body.get("history", [])[-10:]:
        when = time.strftime("%H:%M:%S", time.localtime(h["at"]))
        console.print(f"  {when} step {h['step'] + 1} ({h['percent']:g} %) {h['action']}: "
                      f"{h['reason']}")


def _figures(c: dict[str, Any]) -> tuple[str, str, str]:
    if c["verdict"] == "no data":
        return "-", "-", str(c.get("reason", ""))
    if c["metric"] == "latency":
        return (f"p50 {c['baseline_p50_ms']:g} ms, p95 {c['baseline_p95_ms']:g} ms",
                f"p50 {c['candidate_p50_ms']:g} ms, p95 {c['candidate_p95_ms']:g} ms",
                f"Mann-Whitney p_slower={c['p_slower']:.3g} p_within={c['p_within']:.3g} "
                f"(level {c['level']:.3g}, margin {c['margin']:g})")
    if c["metric"] == "errors":
        return (f"{c['baseline']:.2%}", f"{c['candidate']:.2%}",
                f"Fisher p={c['p_worse']:.3g}, difference in [{c['interval'][0]:.4f}, "
                f"{c['interval'][1]:.4f}] (margin {c['margin']:g})")
    return (f"{c['baseline_accuracy']:.2%}", f"{c['candidate_accuracy']:.2%}",
            f"Fisher p={c['p_worse']:.3g}, drop in [{c['interval'][0]:.4f}, "
            f"{c['interval'][1]:.4f}] (margin {c['margin']:g})")
