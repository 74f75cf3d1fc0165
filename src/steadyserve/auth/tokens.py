"""The API key token: `ss_<id>_<secret>`, where the 12-hex-digit id is public (listed,
logged, shown as the key's prefix) and the 64-hex-digit secret is 256 random bits.

Only a SHA-256 digest of the whole token is stored. A fast hash is right here, unlike for
passwords: the secret is random and long, so there is nothing to guess from its digest
(GitHub's and Stripe's tokens are stored the same way).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable

_TOKEN = re.compile(r"ss_([0-9a-f]{12})_([0-9a-f]{64})")
MAX_TOKEN_CHARS = 80  # anything longer is not a token of ours: refused before any work


def new_token(random_bytes: Callable[[int], bytes] = os.urandom) -> tuple[str, str]:
    """(key id, token)."""
    key_id = random_bytes(6).hex()
    return key_id, f"ss_{key_id}_{random_bytes(32).hex()}"


def new_secret_for(key_id: str, random_bytes: Callable[[int], bytes] = os.urandom) -> str:
    """A fresh token for an existing key id (rotation keeps the id)."""
    return f"ss_{key_id}_{random_bytes(32).hex()}"


def key_id_of(token: str) -> str | None:
    """The id of a well-formed token, else None."""
    if len(token) > MAX_TOKEN_CHARS:
        return None
    m = _TOKEN.fullmatch(token)
    return m.group(1) if m else None


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("ascii", errors="replace")).hexdigest()
