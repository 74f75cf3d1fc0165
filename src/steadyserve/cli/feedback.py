"""`steadyserve feedback`: what users said of each deployment and model version
(GET /v1/feedback/summary) as a table, or the API's JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any
from urllib.parse import urlencode

from . import exit_codes
from .admin import get_json


def add_parser(verbs: Any, url_help: str) -> None:
    fb = verbs.add_parser(
        "feedback", help="feedback per deployment and model version: rate, scores, label "
                         "accuracy and calibration",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  steadyserve feedback\n  steadyserve feedback --deployment risk "
               "--days 30\n  steadyserve feedback --json | jq '.summary[0].labels'")
    fb.add_argument("--deployment", help="only this deployment")
    fb.add_argument("--days", type=int, default=7, help="days back (default 7)")
    fb.add_argument("--json", action="store_true", help="print the API's JSON")
    fb.add_argument("--url", default="http://127.0.0.1:8000", help=url_help)


def _interval(x: dict[str, Any] | None, key: str) -> str:
    if not x or x.get(key) is None:
        return "-"
    if x.get("low") is None:
        return f"{x[key]:.3f}"
    return f"{x[key]:.3f} [{x['low']:.3f}, {x['high']:.3f}]"


def feedback(args: argparse.Namespace) -> int:
    query = {"days": args.days, **({"deployment": args.deployment} if args.deployment else {})}
    body = get_json(args.url, f"/v1/feedback/summary?{urlencode(query)}")
    if body is None:
        return exit_codes.FAILURE
    if args.json:
        print(json.dumps(body, indent=2))
        return exit_codes.OK
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"feedback, last {body['days']} day(s)"
                  + (f" — {body['spooled']} item(s) spooled, waiting for the database"
                     if body.get("spooled") else ""))
    for column in ("deployment", "version", "answers", "feedback", "rate", "scores (mean, 95 %)",
                   "accuracy (95 %)", "precision", "recall", "Brier"):
        table.add_column(column)
    for row in body["summary"]:
        labels = row.get("labels") or {}
        scores = "; ".join(f"{k} {_interval(v, 'mean')} n={v['n']}"
                           for k, v in row["scores"].items()) or "-"
        rate = row.get("feedback_rate")

        def num(v: Any) -> str:
            return "-" if v is None else f"{v:.3f}"

        table.add_row(row["deployment"], row["version"] or "-", str(row["answers"]),
                      str(row["feedback_items"]), "-" if rate is None else f"{rate:.1%}",
                      scores, _interval(labels.get("accuracy"), "rate") if labels else "-",
                      num(labels.get("precision")), num(labels.get("recall")),
                      num(labels.get("brier")))
    Console(highlight=False).print(table)
    return exit_codes.OK
