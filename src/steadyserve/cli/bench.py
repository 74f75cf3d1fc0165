"""`steadyserve bench`: an open-loop load against a running deployment's handler, with a
progress bar, then throughput, latency percentiles and errors (by status and error code).

Bounded: `--rate` × `--duration-s` requests at most (10,000 req/s, 10 minutes), each with a
timeout; the URL is the gateway's. The deployment and handler are asked for first: an
unreachable gateway or an unknown name is one line and exit 1, not a table of failures.
The generator is steadyserve.testing.load.run_load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any
from urllib.parse import quote

from . import exit_codes
from .admin import call_json
from .credentials import auth_headers

MAX_RATE = 10_000.0
MAX_DURATION_S = 600.0


def summary(result: Any) -> dict[str, Any]:
    ok = [r for r in result.records if r.ok]

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 3)

    return {
        "requests": result.total, "sent": result.sent, "ok": len(ok),
        "errors": dict(result.errors()), "error_codes": dict(result.error_codes()),
        "ok_per_s": round(len(ok) / result.wall_s, 1) if result.wall_s else 0.0,
        "p50_ms": ms(result.latency(50)), "p90_ms": ms(result.latency(90)),
        "p99_ms": ms(result.latency(99)),
        "max_ms": ms(max(result.latencies(), default=None)),
    }


def _check_target(base: str, deployment: str, handler: str) -> str | None:
    """Why a load against deployment.handler would be pointless (None: go): the gateway
    cannot be reached, or has no such deployment or handler. Asked once, before any load."""
    try:
        code, body = call_json("GET", f"{base}/v1/deployments/{quote(deployment, safe='')}",
                               None, 10)
    except OSError as exc:
        return f"cannot reach {base}: {exc}"
    if code != 200 or not isinstance(body, dict):
        err = body.get("error") if isinstance(body, dict) else None
        message = err.get("message") if isinstance(err, dict) else json.dumps(body)[:200]
        return f"deployment {deployment!r} refused ({code}): {message}"
    handlers = body.get("handlers") or {}
    if handlers and handler not in handlers:  # none yet: scaled to zero, they come with a replica
        return f"deployment {deployment!r} has no handler {handler!r} (it has: " \
               f"{', '.join(sorted(handlers))})"
    return None


def bench(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from ..testing.load import run_load

    if not 0 < args.rate <= MAX_RATE or not 0 < args.duration_s <= MAX_DURATION_S:
        print(f"steadyserve: --rate must be in (0, {MAX_RATE:g}] and --duration-s in "
              f"(0, {MAX_DURATION_S:g}]", file=sys.stderr)
        return exit_codes.USAGE
    try:
        body = json.loads(args.body)
    except ValueError as exc:
        print(f"steadyserve: --body is not JSON: {exc}", file=sys.stderr)
        return exit_codes.USAGE
    problem = _check_target(args.url, args.deployment, args.handler)
    if problem is not None:
        print(f"steadyserve: {problem}", file=sys.stderr)
        return exit_codes.FAILURE
    url = f"{args.url}/v1/deployments/{quote(args.deployment, safe='')}/" \
          f"{quote(args.handler, safe='')}"
    headers = auth_headers(args.url)
    console = Console(stderr=True)

    async def go() -> Any:
        load = asyncio.ensure_future(run_load(
            url, args.rate, args.duration_s, body_fn=lambda i: body,
            headers_fn=lambda i: headers, timeout_s=args.timeout_s))
        started = time.monotonic()
        with Progress(TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task(f"{args.rate:g} req/s to {args.deployment}.{args.handler}",
                                total=args.duration_s)
            while not load.done():
                bar.update(task, completed=min(args.duration_s, time.monotonic() - started))
                await asyncio.sleep(0.1)
        return load.result()

    result = asyncio.run(go())
    figures = summary(result)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        table = Table(title=f"steadyserve bench — {url}", title_justify="left")
        table.add_column("measure")
        table.add_column("value", justify="right")
        for name, value in figures.items():
            table.add_row(name.replace("_", " "), json.dumps(value) if isinstance(value, dict)
                          else str(value))
        Console().print(table)
    if result.sent == 0:
        print(f"steadyserve: no request reached {url}", file=sys.stderr)
        return exit_codes.FAILURE
    return exit_codes.OK if result.error_count() == 0 else exit_codes.FAILURE
