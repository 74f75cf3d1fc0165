"""Which API key the CLI sends to a gateway.

    STEADYSERVE_API_KEY (any gateway) ─► else, for a gateway on this machine (a loopback
    URL), the local admin key its `steadyserve run` wrote to <data_dir>/admin.key (mode 0600:
    reading it is the credential, as with Docker's socket) ─► else none.

The local key is never sent to a non-loopback URL: a typo in --url must not hand the
machine's admin key to another host.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from ..config import is_loopback
from ..errors import ConfigError
from ..settings import load_config

ENV_KEY = "STEADYSERVE_API_KEY"


def local_admin_key_path(env: Mapping[str, str]) -> Path:
    try:
        config = load_config(env=env)
        return Path(config.data_dir) / config.auth.admin_key_file
    except ConfigError:
        return Path(env.get("STEADYSERVE_DATA_DIR", ".steadyserve")) / "admin.key"


def auth_headers(url: str) -> dict[str, str]:
    """{"authorization": "Bearer <key>"} for the key `api_key_for` picks, or {}."""
    key = api_key_for(url)
    return {"authorization": f"Bearer {key}"} if key else {}


def api_key_for(url: str, env: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if env is None else env
    if env.get(ENV_KEY):
        return env[ENV_KEY].strip()
    host = urlsplit(url).hostname or ""
    if not is_loopback(host):
        return None
    try:
        return local_admin_key_path(env).read_text().strip() or None
    except OSError:
        return None
