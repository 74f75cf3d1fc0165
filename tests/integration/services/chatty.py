"""A service that logs as it works, and fails on request: for `steadyserve logs`."""

from __future__ import annotations

import logging
from typing import Any

import steadyserve

log = logging.getLogger("chatty")


class Chatty(steadyserve.Service):
    @steadyserve.handler
    def say(self, text: str, fail: bool = False) -> dict[str, Any]:
        log.info("saying %s", text, extra={"chars": len(text)})  # in the model thread
        if fail:
            raise ValueError(f"cannot say {text!r}")
        return {"said": text}
