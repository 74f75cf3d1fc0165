"""`steadyserve logs`: the gateway's and its replicas' recent log lines, filtered, and with
--follow the new ones as they come (GET /v1/logs, polled with `since`).

Lines are shown as `time level process message key=value …` (rich colours the level on a
terminal), or as the JSON lines themselves with --json. A follow that loses the gateway says so
once and goes on trying; Ctrl-C or SIGTERM ends it (exit status 0).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import Any
from urllib.parse import urlencode

from . import exit_codes
from .admin import call_json

SHOWN_FIRST = ("ts", "level", "logger", "msg", "process", "replica", "exc")
FOLLOW_PAGE = 500
LOOKBACK_S = 1.0  # how late a line may reach its file and still be shown (flushes: 0.25 s)
LEVEL_STYLE = {"debug": "dim", "info": "green", "warning": "yellow", "error": "bold red",
               "critical": "bold red"}


def add_parser(verbs: Any, url_help: str) -> None:
    lg = verbs.add_parser(
        "logs", help="the gateway's and replicas' log lines, filtered; --follow for new ones",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  steadyserve logs --follow\n"
               "  steadyserve logs --deployment risk --level warning\n"
               "  steadyserve logs --request-id 5f0c2a9e1b7d4c3a\n"
               "  steadyserve logs --replica minilm-1 --lines 50 --json")
    lg.add_argument("--deployment", help="only this deployment's lines")
    lg.add_argument("--replica", help="only this replica's lines, e.g. minilm-1")
    lg.add_argument("--level", choices=["debug", "info", "warning", "error"],
                    help="lowest level shown (default: all)")
    lg.add_argument("--request-id", dest="request_id",
                    help="only the lines of one request (its X-Request-ID)")
    lg.add_argument("--lines", type=int, default=100, help="recent lines first shown (default 100)")
    lg.add_argument("-f", "--follow", action="store_true", help="then show new lines as they come")
    lg.add_argument("--interval-s", type=float, default=1.0, dest="interval_s",
                    help="with --follow: seconds between polls (default 1)")
    lg.add_argument("--json", action="store_true", help="print the JSON lines as stored")
    lg.add_argument("--url", default="http://127.0.0.1:8000", help=url_help)


def render(rec: dict[str, Any]) -> tuple[str, str]:
    """(text, level) of one line: `HH:MM:SS.mmm LEVEL process message key=value …`."""
    ts = rec.get("ts")
    stamp = time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}" \
        if isinstance(ts, int | float) else "--:--:--.---"
    level = str(rec.get("level", "?"))
    who = rec.get("replica") or rec.get("process") or "?"
    extras = " ".join(f"{k}={v}" for k, v in rec.items() if k not in SHOWN_FIRST)
    text = f"{stamp} {level.upper():<7} {who} {rec.get('msg', '')}" + (f" {extras}" if extras else "")
    if rec.get("exc"):
        text += "\n" + str(rec["exc"])
    return text, level


class Follow:
    """Which lines a follow has shown, and where its next poll starts.

    Files are written through buffers (observe.logfiles.LogFile) by several processes, so a
    line may reach its file after a newer line of another process was shown: each poll asks
    again from `LOOKBACK_S` before the newest line shown, and lines already shown (remembered
    for that long) are not shown twice. A full page with nothing new (a busy gateway writes
    more than a page in the look-back) moves the start to the page's last line instead, so
    the follow always advances."""

    def __init__(self, lookback_s: float = LOOKBACK_S) -> None:
        self.lookback_s = lookback_s
        self.since: float | None = None  # where the next poll starts
        self.newest: float | None = None
        self.shown: dict[str, float] = {}  # line → its time stamp, within the look-back
        self.floor: float | None = None  # nothing older than the first page's newest line

    def new(self, lines: list[dict[str, Any]], full_page: bool = False) -> list[dict[str, Any]]:
        out = []
        last: float | None = None
        for rec in lines:
            ts = rec.get("ts")
            if not isinstance(ts, int | float):
                continue
            last = ts if last is None else max(last, ts)
            ident = json.dumps(rec, sort_keys=True)
            if ident in self.shown or (self.since is not None and ts < self.since) \
                    or (self.floor is not None and ts < self.floor):
                continue
            self.shown[ident] = ts
            self.newest = ts if self.newest is None else max(self.newest, ts)
            out.append(rec)
        if self.newest is not None:
            if self.floor is None:  # the lines first asked for are shown: only newer ones now
                self.floor = self.newest
            self.since = self.newest - self.lookback_s
            if full_page and not out and last is not None:
                self.since = max(self.since, last)
            self.shown = {k: t for k, t in self.shown.items() if t >= self.since}
        return out


def logs(args: argparse.Namespace) -> int:
    if args.lines < 1 or args.interval_s <= 0:
        print("steadyserve: --lines must be >= 1 and --interval-s > 0", file=sys.stderr)
        return exit_codes.USAGE
    if args.follow:  # a supervisor's (or a test's) SIGTERM ends a follow as Ctrl-C does
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return _show(args)
    except KeyboardInterrupt:
        return exit_codes.OK


def _show(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.text import Text

    console = Console(highlight=False, soft_wrap=True)
    filters = {k: getattr(args, k) for k in ("deployment", "replica", "level", "request_id")
               if getattr(args, k)}
    follow = Follow()
    limit, lost = args.lines, False
    lines: list[dict[str, Any]] = []
    shown: list[dict[str, Any]] = []
    while True:
        query = {**filters, "limit": limit}
        if follow.since is not None:
            query["since"] = repr(follow.since)
        try:
            code, body = call_json("GET", f"{args.url}/v1/logs?{urlencode(query)}", None, 10)
        except OSError as exc:
            if not args.follow:
                print(f"steadyserve: cannot reach {args.url}: {exc}", file=sys.stderr)
                return exit_codes.FAILURE
            if not lost:
                print(f"steadyserve: lost {args.url} ({exc}); retrying", file=sys.stderr)
            lost = True
        else:
            if code != 200:
                message = (body or {}).get("error", {}).get("message", body) \
                    if isinstance(body, dict) else body
                print(f"steadyserve: logs refused ({code}): {message}", file=sys.stderr)
                return exit_codes.FAILURE
            lost = False
            lines = body.get("lines", [])
            shown = follow.new(lines, full_page=len(lines) >= limit)
            for rec in shown:
                if args.json:
                    print(json.dumps(rec), flush=True)
                else:
                    text, level = render(rec)
                    console.print(Text(text, style=LEVEL_STYLE.get(level, "")))
        if not args.follow:
            return exit_codes.OK
        # then pages of new lines (from a second before the newest shown: see Follow)
        limit = max(args.lines, FOLLOW_PAGE)
        if lost or len(lines) < limit or not shown:  # a full new page: more may be waiting
            time.sleep(args.interval_s)
