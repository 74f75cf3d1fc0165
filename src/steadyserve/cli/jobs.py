"""`steadyserve jobs submit|get|cancel|list`: asynchronous jobs of a running gateway
(POST/GET/DELETE /v1/jobs). Errors are one line on stderr and exit status 1."""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from typing import Any
from urllib.parse import urlencode

from . import exit_codes
from .admin import call_json

FINAL = ("succeeded", "failed", "dead", "cancelled", "expired")
STATES = ("queued", "running", *FINAL)
CALL_TIMEOUT_S = 30.0


def add_parser(verbs: Any, url_help: str) -> None:
    jb = verbs.add_parser(
        "jobs", help="asynchronous jobs: submit a handler call, follow it, cancel it",
        description=("Queue a handler call as a job (stored before the gateway answers, run "
                     "on spare capacity at batch priority, retried, at most one result), read "
                     "its state and result, cancel it, or list your jobs. A job belongs to "
                     "the API key that made it (on this machine, the local admin key)."),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  steadyserve jobs submit risk score --body '{\"transactions\": [...]}' --wait\n"
               "  steadyserve jobs submit minilm embed --body '{\"texts\": [\"hi\"]}' "
               "--webhook-url http://127.0.0.1:9000/hook\n"
               "  steadyserve jobs get job_0f3c…\n"
               "  steadyserve jobs cancel job_0f3c…\n"
               "  steadyserve jobs list --state dead --limit 20")
    jb.add_argument("action", choices=["submit", "get", "cancel", "list"])
    jb.add_argument("target", nargs="*", metavar="ARG",
                    help="submit: DEPLOYMENT HANDLER; get, cancel: JOB_ID; list: none")
    jb.add_argument("--body", help="submit: the handler's parameters as a JSON object")
    jb.add_argument("--webhook-url", dest="webhook_url",
                    help="submit: told when the job is final (a host in [jobs] webhook_hosts)")
    jb.add_argument("--idempotency-key", dest="idempotency_key",
                    help="submit: the same key returns the same job (default: a new one)")
    jb.add_argument("--timeout-s", type=float, dest="timeout_s",
                    help="submit: the job's deadline in seconds ([jobs] default_timeout_s)")
    jb.add_argument("--wait", action="store_true",
                    help="submit, get: poll until the job is final; exit 1 unless it succeeded")
    jb.add_argument("--wait-s", type=float, default=600.0, dest="wait_s",
                    help="give up waiting after this long (default 600)")
    jb.add_argument("--state", choices=STATES, help="list: only jobs in this state")
    jb.add_argument("--limit", type=int, default=50, help="list: at most this many (default 50)")
    jb.add_argument("--json", action="store_true", help="print the API's JSON")
    jb.add_argument("--url", default="http://127.0.0.1:8000", help=url_help)


def _call(method: str, url: str, body: bytes | None,
          headers: dict[str, str]) -> tuple[int, Any]:
    return call_json(method, url, body, CALL_TIMEOUT_S, headers)


def _fail(what: str, code: int, body: Any) -> int:
    err = body.get("error") if isinstance(body, dict) else None
    message = err.get("message") if isinstance(err, dict) else json.dumps(body)[:300]
    print(f"steadyserve: {what} refused ({code}): {message}", file=sys.stderr)
    return exit_codes.FAILURE


def _usage(message: str) -> int:
    print(f"steadyserve jobs: {message}", file=sys.stderr)
    return exit_codes.USAGE


def jobs(args: argparse.Namespace) -> int:
    want = {"submit": 2, "get": 1, "cancel": 1, "list": 0}[args.action]
    if len(args.target) != want:
        return _usage(f"{args.action} takes {want} argument(s) "
                      f"({'DEPLOYMENT HANDLER' if want == 2 else 'JOB_ID' if want else 'none'})")
    try:
        return _run(args)
    except OSError as exc:
        print(f"steadyserve: cannot reach {args.url}: {exc}", file=sys.stderr)
        return exit_codes.FAILURE


def _run(args: argparse.Namespace) -> int:
    base = args.url.rstrip("/")
    if args.action == "submit":
        if args.body is None:
            return _usage("submit needs --body (the handler's parameters as a JSON object)")
        try:
            params = json.loads(args.body)
        except ValueError as exc:
            return _usage(f"--body is not JSON: {exc}")
        headers = {"content-type": "application/json",
                   "idempotency-key": args.idempotency_key or uuid.uuid4().hex}
        if args.webhook_url:
            headers["x-webhook-url"] = args.webhook_url
        if args.timeout_s is not None:
            headers["x-job-timeout-s"] = repr(args.timeout_s)
        deployment, handler = args.target
        code, body = _call("POST", f"{base}/v1/jobs/{deployment}/{handler}",
                           json.dumps(params).encode(), headers)
        if code not in (200, 202):
            return _fail("the job", code, body)
        if not args.wait:
            _show(body, args.json)
            return exit_codes.OK
        return _wait(base, body["id"], args)
    if args.action == "list":
        query = {"limit": args.limit, **({"state": args.state} if args.state else {})}
        code, body = _call("GET", f"{base}/v1/jobs?{urlencode(query)}", None, {})
        if code != 200:
            return _fail("/v1/jobs", code, body)
        if args.json:
            print(json.dumps(body, indent=2))
        else:
            for job in body["jobs"]:
                print(_line(job))
            if body.get("counts"):
                print("all jobs: " + ", ".join(f"{k} {v}" for k, v in sorted(body["counts"].items())))
        return exit_codes.OK
    job_id = args.target[0]
    if args.action == "get" and args.wait:
        return _wait(base, job_id, args)
    code, body = _call("GET" if args.action == "get" else "DELETE", f"{base}/v1/jobs/{job_id}",
                       None, {})
    if code != 200:
        return _fail(f"job {job_id[:64]}", code, body)
    _show(body, args.json)
    return exit_codes.OK


def _wait(base: str, job_id: str, args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.wait_s
    while True:
        code, body = _call("GET", f"{base}/v1/jobs/{job_id}", None, {})
        if code != 200:
            return _fail(f"job {job_id[:64]}", code, body)
        if body["state"] in FINAL:
            _show(body, args.json)
            return exit_codes.OK if body["state"] == "succeeded" else exit_codes.FAILURE
        if time.monotonic() > deadline:
            print(f"steadyserve: job {job_id} is still {body['state']} after {args.wait_s:g} s",
                  file=sys.stderr)
            return exit_codes.FAILURE
        time.sleep(0.5)


def _line(job: dict[str, Any]) -> str:
    total = (job.get("timings") or {}).get("total_s")
    took = f"{total:.3f}s" if total is not None else "-"
    return (f"{job['id']}  {job['state']:<9}  {job['deployment']}/{job['handler']}  attempt "
            f"{job['attempt']}  failures {job['failures']}  {took}")


def _show(job: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(job, indent=2))
        return
    print(_line(job))
    if job.get("error"):
        print(f"  error: {job['error'].get('code')}: {job['error'].get('message')}")
    if job.get("result") is not None:
        print("  result: " + json.dumps(job["result"])[:2000])
    if job.get("webhook"):
        hook = job["webhook"]
        print(f"  webhook: {hook.get('state')}"
              + (f" after {hook['attempts']} tries" if hook.get("attempts") else "")
              + (f" ({hook['error']})" if hook.get("error") else ""))
