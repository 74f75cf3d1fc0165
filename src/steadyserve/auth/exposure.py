"""When may inference go without a key, and when must a gateway refuse to start? (pure)

    listening on          keys besides the local admin one    inference
    loopback              none                                open (today's behaviour)
    loopback              some                                a key with `infer`
    another address       none                                refuse to start, unless
                                                              allow_unauthenticated: open
    another address       some                                a key with `infer`
    [auth] inference = "required": a key, always.

Admin routes need an admin key in every row, loopback included.
"""

from __future__ import annotations

from ..config import Config, is_loopback


def inference_open(config: Config, user_keys: bool) -> bool:
    if config.auth.inference == "required" or user_keys:
        return False
    return is_loopback(config.gateway.host) or config.auth.allow_unauthenticated


def exposure_problem(config: Config, user_keys: bool) -> str | None:
    """One line saying why this gateway must not start as configured, or None."""
    gw = config.gateway
    if is_loopback(gw.host) or user_keys or config.auth.inference == "required" \
            or config.auth.allow_unauthenticated:
        return None
    return (f"refusing to serve on {gw.host}:{gw.port} with no API keys: anyone who can reach "
            "it could run inference. Create a key (`steadyserve keys create NAME`) or pass "
            "--allow-unauthenticated.")
