"""What a steadyserve process does at its start: die with its parent, run on uvloop, and
keep what it built at start out of the garbage collector's way."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import os
import signal
import sys


def die_with_parent(parent_pid: int) -> None:
    """Linux's PR_SET_PDEATHSIG, plus a parent-pid check for the window before it was set
    (the parent died first: exit now)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass
    if parent_pid and os.getppid() != parent_pid:
        os._exit(0)


def event_loop_runner() -> asyncio.Runner:
    """An asyncio runner on uvloop where it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def freeze_startup_heap() -> None:
    """Everything built so far (modules, config, the app) lives as long as the process: move
    it out of the collector's reach. A full collection otherwise walks those hundreds of
    thousands of objects in one ~0.2 s pause of the event loop, soon after the start (seen
    with PYTHONASYNCIODEBUG in the gateway; it failed EventLoopLag's 0.1 s)."""
    gc.collect()
    gc.freeze()
