"""Run the real gateway with a fault proxy in front of every replica:

    python -m tests.chaos.gateway_proc --config path/to/steadyserve.toml --port N

Same set-up as `steadyserve run` (cli/run.py `run()`), with `ProxiedLauncher`. Needs
CHAOS_CONTROL_DIR in the environment and the repository root importable (cwd or PYTHONPATH).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from steadyserve.cli import exit_codes
from steadyserve.cli.run import serve
from steadyserve.errors import ConfigError
from steadyserve.observe.logs import configure_logging
from steadyserve.settings import load_config

from .proxied import ProxiedLauncher


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chaos-gateway")
    parser.add_argument("--config", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        config = load_config(config_path=args.config, flags={"port": args.port, "log_format": "json"},
                             env=os.environ)
        launcher = ProxiedLauncher(config)
    except ConfigError as exc:
        print(f"chaos gateway: {exc}", file=sys.stderr)
        return exit_codes.CONFIG
    configure_logging(config.log_level, config.log_format, process="gateway")
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        return runner.run(serve(config, launcher=launcher))


if __name__ == "__main__":
    sys.exit(main())
