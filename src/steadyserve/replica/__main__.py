"""Replica process entry: `python -m steadyserve.replica --service X --fd N ...`.

Started by the gateway's supervisor with the listening socket already bound (passed as an
inherited fd, so the gateway knows the port with no race). Dies with its parent: Linux's
PR_SET_PDEATHSIG, plus a parent-pid check for the window before it was set.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from types import FrameType

from ..process import die_with_parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="steadyserve-replica")
    parser.add_argument("--service", required=True)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--name", default="replica")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parent-pid", type=int, default=0)
    parser.add_argument("--drain-timeout-s", type=float, default=10.0)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-format", default="json")
    parser.add_argument("--log-file", default=None, help="also write JSON lines here (rotated)")
    parser.add_argument("--log-file-bytes", type=int, default=8 * 1024 * 1024)
    parser.add_argument("--log-file-backups", type=int, default=2)
    parser.add_argument("--flight-recorder", default=None, help="file of the keys being executed")
    parser.add_argument("--nice", type=int, default=0,
                        help="lower this process's CPU priority by this much (inherited by "
                             "every thread it starts): the gateway stays responsive")
    args = parser.parse_args(argv)
    die_with_parent(args.parent_pid)

    # thread counts must be in the environment before torch/tokenizers are imported
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    if args.nice > 0:
        # before any thread exists (torch, tokenizers, the model thread), so all inherit it
        os.nice(args.nice)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from ..observe.logs import FileSink, configure_logging

    sink = FileSink(args.log_file, args.log_file_bytes, args.log_file_backups) \
        if args.log_file else None
    deployment = os.environ.get("STEADYSERVE_DEPLOYMENT")
    configure_logging(args.log_level, args.log_format, file=sink, replica=args.name,
                      **({"deployment": deployment} if deployment else {}))
    log = logging.getLogger("steadyserve.replica")

    import uvicorn

    from ..loader import load_service_class
    from ..netutil import NoDelayHttpToolsProtocol
    from ..service import handler_specs
    from .blackbox import FlightRecorder
    from .server import ReplicaApp

    try:
        cls = load_service_class(args.service)
        specs = handler_specs(cls)
    except Exception as exc:
        log.error("cannot load service %s: %s", args.service, exc)
        return 3
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        torch.set_num_threads(args.threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
    app = ReplicaApp(cls(), specs, name=args.name, recorder=FlightRecorder(args.flight_recorder))

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            app.draining = True  # /readyz says so at once; in-flight work finishes
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app, fd=args.fd, loop="auto", http=NoDelayHttpToolsProtocol, lifespan="on", access_log=False,
        log_config=None, timeout_graceful_shutdown=int(args.drain_timeout_s), timeout_keep_alive=75,
    )
    _Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
