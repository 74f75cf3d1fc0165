"""`steadyserve` entry point: parse the verb, hand over to its module.

Every command but `run` ends with one line on stderr and a non-zero exit when it fails: a
--url that is not an http(s) URL is a usage error (2) before anything is sent; an
unexpected exception is one line naming it (1; STEADYSERVE_DEBUG=1 shows the traceback);
Ctrl-C is 130. `run` keeps its own handling (a crash at start needs its traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from urllib.parse import urlsplit

from .. import __version__
from ..policies.balancing import BALANCERS
from . import backup as backup_cli
from . import canary as canary_cli
from . import exit_codes
from . import feedback as feedback_cli
from . import jobs as jobs_cli
from . import keys as keys_cli
from . import logs as logs_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="steadyserve",
        description="Serve Python model classes as replicas behind a load-balancing gateway.",
    )
    parser.add_argument("--version", action="version", version=f"steadyserve {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND")
    run = verbs.add_parser(
        "run", help="serve a service class, a steadyserve.toml, or the built-in embedding example",
        description=(
            "Serve TARGET ('path/to/file.py:Class' or 'module:Class') as one deployment; or, "
            "with no TARGET, the deployments of --config (default ./steadyserve.toml if it "
            "exists); or else the built-in all-MiniLM-L6-v2 embedding example as 'minilm' "
            "with 2 replicas."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  steadyserve run\n  steadyserve run app.py:Model --replicas 2\n"
               "  steadyserve run --config steadyserve.toml --workers 2\n"
               "  steadyserve run --backend ray --ray-address 10.0.0.5:6379",
    )
    run.add_argument("target", nargs="?", help="file.py:Class or module:Class")
    run.add_argument("--config", help="steadyserve.toml with several deployments")
    run.add_argument("--name", help="deployment name (default: from the class name)")
    run.add_argument("--replicas", type=int, help="replica processes (default 1; 2 for the example)")
    run.add_argument("--balancer", choices=sorted(BALANCERS), help="default power_of_two")
    run.add_argument("--host", help="listen address (default 127.0.0.1)")
    run.add_argument("--port", type=int, help="listen port (default 8000)")
    run.add_argument("--workers", type=int,
                     help="processes serving the port (SO_REUSEPORT): the gateway and N-1 "
                          "data-plane workers fed by it (default 1)")
    run.add_argument("--redis-url", dest="redis_url",
                     help="redis://host:port/db: shared L2 response cache (default: L1 only)")
    run.add_argument("--backend", choices=["local", "ray"],
                     help="where replicas run: local processes (default) or Ray actors")
    run.add_argument("--ray-address", dest="ray_address",
                     help="with --backend ray: the cluster to join, e.g. 10.0.0.5:6379 "
                          "(default: start a local one)")
    run.add_argument("--max-body-bytes", type=int, dest="max_body_bytes",
                     help="largest request body accepted (default 1 MiB)")
    run.add_argument("--allow-unauthenticated", dest="allow_unauthenticated", action="store_true",
                     default=None, help="serve inference without API keys on a non-loopback "
                     "--host (refused otherwise); admin routes always need a key")
    run.add_argument("--log-level", dest="log_level",
                     choices=["debug", "info", "warning", "error"], help="default info")
    run.add_argument("--log-format", dest="log_format", choices=["json", "text", "auto"],
                     help="default auto: text on a terminal, JSON lines otherwise")
    url_help = "gateway URL (default http://127.0.0.1:8000)"
    examples = argparse.RawDescriptionHelpFormatter
    st = verbs.add_parser(
        "status", help="show a running gateway's deployments and replicas",
        formatter_class=examples,
        epilog="examples:\n  steadyserve status\n  steadyserve status --json | jq .cluster\n"
               "  steadyserve status --url http://gw-1.internal:8000")
    st.add_argument("--url", default="http://127.0.0.1:8000", help=url_help)
    st.add_argument("--json", action="store_true", help="print JSON (deployments, cluster, alerts)")
    tp = verbs.add_parser(
        "top", help="live: requests/s, errors, p50/p99, admission and cache per deployment",
        formatter_class=examples,
        epilog="examples:\n  steadyserve top\n  steadyserve top --interval-s 5")
    tp.add_argument("--url", default="http://127.0.0.1:8000", help=url_help)
    tp.add_argument("--interval-s", type=float, default=2.0, dest="interval_s",
                    help="seconds between scrapes (default 2)")
    tp.add_argument("--iterations", type=int, help="stop after this many refreshes")
    be = verbs.add_parser(
        "bench", help="load a running deployment (open loop), then throughput and latency",
        formatter_class=examples,
        epilog="examples:\n  steadyserve bench minilm embed --body '{\"texts\": [\"hi\"]}'\n"
               "  steadyserve bench risk account --body '{\"account_id\": 1}' --rate 200 "
               "--duration-s 30 --json")
    be.add_argument("deployment")
    be.add_argument("handler")
    be.add_argument("--body", required=True, help="the handler's parameters as a JSON object")
    be.add_argument("--rate", type=float, default=50.0, help="requests per second (default 50)")
    be.add_argument("--duration-s", type=float, default=10.0, dest="duration_s",
                    help="seconds of load (default 10)")
    be.add_argument("--timeout-s", type=float, default=10.0, dest="timeout_s",
                    help="per request (default 10)")
    be.add_argument("--json", action="store_true", help="print the figures as JSON")
    be.add_argument("--url", default="http://127.0.0.1:8000", help=url_help)
    ro = verbs.add_parser(
        "rollout", help="replace a deployment's replicas one by one with no downtime",
        description=("Set a new target for a deployment; the gateway starts a new replica, waits "
                     "until it is ready, retires an old one, and repeats. With no change, "
                     "restarts every replica (e.g. to load new code or weights). A new replica "
                     "that crash-loops or is never ready fails the rollout, and the deployment "
                     "goes back to its last good revision. Waits for the outcome (one line per "
                     "change of progress) unless --no-wait; exit status 0 only when it is done."),
        formatter_class=examples,
        epilog="examples:\n  steadyserve rollout minilm\n"
               "  steadyserve rollout risk --service app.py:RiskV2 --replicas 3\n"
               "  steadyserve rollout risk --env MODEL_TAG=v7 --no-wait\n"
               "  steadyserve rollout risk --cancel\n"
               "a progressive rollout to a candidate deployment, judged on its errors, latency "
               "and feedback: steadyserve canary --help",
    )
    ro.add_argument("deployment")
    ro.add_argument("--service", help="one of the deployment's configured targets "
                    "(`service` or an entry of `services`)")
    ro.add_argument("--replicas", type=int, help="new replica count (up to max_replicas)")
    ro.add_argument("--env", action="append", metavar="KEY=VALUE",
                    help="replica environment; KEY must be listed in the deployment's "
                    "rollout_env; KEY= (empty) sets an empty value")
    ro.add_argument("--balancer", choices=sorted(BALANCERS))
    ro.add_argument("--torch-threads", type=int, dest="torch_threads")
    ro.add_argument("--cancel", action="store_true",
                    help="cancel the running rollout: back to the last good revision")
    ro.add_argument("--no-wait", action="store_true", dest="no_wait",
                    help="start it (or cancel it) and return at once")
    ro.add_argument("--url", default="http://127.0.0.1:8000", help=url_help)
    ro.add_argument("--timeout-s", type=float, default=600.0, dest="timeout_s",
                    help="stop waiting for the outcome after this long (it goes on)")
    al = verbs.add_parser("alerts", help="active alerts, silences, recent actions and history",
                          formatter_class=examples,
                          epilog="examples:\n  steadyserve alerts\n  steadyserve alerts --json")
    al.add_argument("--url", default="http://127.0.0.1:8000", help=url_help)
    al.add_argument("--json", action="store_true", help="print the API's JSON")
    si = verbs.add_parser(
        "silence", help="mute matching alerts for a while", formatter_class=examples,
        epilog="examples:\n  steadyserve silence --match alertname=LatencyAnomaly --for 2h\n"
               "  steadyserve silence --match deployment=risk --for 30m --comment 'migration'")
    si.add_argument("--match-all", dest="match_all", action="store_true",
                    help="mute every alert (refused unless said: matchers that all read \"\" "
                    "would match everything)")
    si.add_argument("--match", action="append", default=[], metavar="LABEL=VALUE",
                    help="e.g. --match alertname=LatencyAnomaly --match deployment=minilm")
    si.add_argument("--for", dest="duration", default="1h", help="30m, 2h, 1d … (default 1h)")
    si.add_argument("--comment", default="")
    si.add_argument("--by", default="cli", help="who is silencing")
    si.add_argument("--url", default="http://127.0.0.1:8000", help=url_help)
    logs_cli.add_parser(verbs, url_help)
    feedback_cli.add_parser(verbs, url_help)
    jobs_cli.add_parser(verbs, url_help)
    canary_cli.add_parser(verbs, url_help)
    keys_cli.add_parser(verbs)
    backup_cli.add_parser(verbs)
    ex = verbs.add_parser(
        "export", help="export configuration for other systems", formatter_class=examples,
        epilog="examples:\n  steadyserve export prometheus-rules --out rules.yml\n"
               "  steadyserve export prometheus-rules --config steadyserve.toml")
    ex.add_argument("what", choices=["prometheus-rules"])
    ex.add_argument("--config", help="steadyserve.toml (for the SLO and rule settings)")
    ex.add_argument("--out", help="file to write (default: stdout)")
    return parser


def url_problem(url: str) -> str | None:
    """Why `url` cannot be a gateway's base URL (None: it can)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as exc:
        return str(exc)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "it needs http:// or https:// and a host, e.g. http://127.0.0.1:8000"
    if parts.query or parts.fragment:
        return "it must not carry a query or a fragment"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb == "run":
        from .run import run

        return run(args)
    url = getattr(args, "url", None)
    if isinstance(url, str):
        problem = url_problem(url)
        if problem is not None:
            print(f"steadyserve: --url {url[:200]!r} is not a gateway URL: {problem}",
                  file=sys.stderr)
            return exit_codes.USAGE
        args.url = url.rstrip("/")
    try:
        return dispatch(parser, args)
    except KeyboardInterrupt:
        return exit_codes.INTERRUPTED
    except Exception as exc:
        if os.environ.get("STEADYSERVE_DEBUG"):
            traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        print(f"steadyserve {args.verb}: failed: {type(exc).__name__}"
              f"{': ' + first if first else ''} (STEADYSERVE_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return exit_codes.FAILURE


def dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.verb == "status":
        from .admin import status

        return status(args)
    if args.verb == "rollout":
        from .admin import rollout

        return rollout(args)
    if args.verb == "top":
        from .top import top

        return top(args)
    if args.verb == "bench":
        from .bench import bench

        return bench(args)
    if args.verb == "feedback":
        return feedback_cli.feedback(args)
    if args.verb == "jobs":
        return jobs_cli.jobs(args)
    if args.verb == "canary":
        return canary_cli.canary(args)
    if args.verb == "logs":
        return logs_cli.logs(args)
    if args.verb == "keys":
        return keys_cli.keys(args)
    if args.verb == "backup":
        return backup_cli.backup(args)
    if args.verb == "restore":
        return backup_cli.restore(args)
    if args.verb in ("alerts", "silence", "export"):
        from . import alerts as alert_cli

        return int(getattr(alert_cli, args.verb)(args))
    parser.print_help()
    return exit_codes.USAGE


if __name__ == "__main__":
    sys.exit(main())
