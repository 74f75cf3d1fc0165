"""Child-call credentials (gateway.compose), pure: who may call what, on whose behalf.

A replica's handler calls other deployments back through the gateway. Two credentials, both
HMACs under a secret derived from the gateway's local admin key (so every process of the
gateway derives the same one and nothing more is stored):

    the token   ssc_<mac>_<deployment>   in the replica's environment: which deployment's
                replica is calling. The gateway lets it call the deployments that one
                declares (`[deployments.NAME] calls`), inference routes only.
    the grant   <key id>.<hops>.<expires ms>.<mac>   sent with each request to a replica of a
                deployment that declares calls (X-Steadyserve-Grant) and handed back
                unchanged with its child calls (X-Steadyserve-On-Behalf-Of): the key the
                request acts for (empty: none), how deep it already is, and until when
                (that attempt's timeout + GRANT_SLACK_S). The mac binds them to the
                deployment it was sent to.

Why a grant and not the key id: a replica asserting a key id could act for any key — a
service with a bug, or one steered by its input, could call every deployment that any key
may, at any depth, at no key's rate. With grants it acts only for the keys of requests it
was sent, until their attempts end, at their depth, and only towards the deployments it
declared. Within that a grant serves a handler's several calls, at most [gateway]
max_child_calls_per_request of them (`GrantUses`, per gateway process), and child calls are
not charged to the key's rate: the parent request paid.

What it does not contain: code running as the gateway's user can read the data directory,
and with it the admin key this all derives from. Run services you do not trust under
another user.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

TOKEN_PREFIX = "ssc_"
MAC_HEX = 32  # 128 bits of HMAC-SHA256
MAX_GRANT_CHARS = 160  # what the gateway and a replica accept (a grant is about 65)
GRANT_SLACK_S = 5.0  # a grant outlives its request's deadline by this (clock steps, queues)


class BadCredential(ValueError):
    """A child-call token or grant that is malformed, forged, or expired (the message)."""


@dataclass(frozen=True)
class Grant:
    key_id: str | None  # the key the parent request acts for; None: it had none
    hops: int  # the parent request's depth (0: a client's request)
    expires_at: float  # unix seconds


def secret_from(admin_token: str) -> bytes:
    return hmac.new(admin_token.encode(), b"steadyserve child calls", hashlib.sha256).digest()


def _mac(secret: bytes, *parts: str) -> str:
    return hmac.new(secret, "\0".join(parts).encode(), hashlib.sha256).hexdigest()[:MAC_HEX]


def token_for(secret: bytes, deployment: str) -> str:
    return f"{TOKEN_PREFIX}{_mac(secret, 'token', deployment)}_{deployment}"


def caller_of(secret: bytes, token: str) -> str:
    """The deployment whose replicas hold `token`."""
    mac, sep, deployment = token.removeprefix(TOKEN_PREFIX).partition("_")
    if not sep or not deployment or len(mac) != MAC_HEX or not hmac.compare_digest(
            mac.encode(), _mac(secret, "token", deployment).encode()):
        raise BadCredential("unknown child-call credential")
    return deployment


def issue(secret: bytes, deployment: str, key_id: str | None, hops: int,
          expires_at: float) -> str:
    fields = (key_id or "", str(hops), str(int(expires_at * 1000)))
    return ".".join((*fields, _mac(secret, "grant", deployment, *fields)))


def check(secret: bytes, deployment: str, grant: str, now: float) -> Grant:
    """The grant `deployment`'s replica handed back, verified and in time."""
    parts = grant.split(".")
    if len(grant) > MAX_GRANT_CHARS or len(parts) != 4:
        raise BadCredential("malformed X-Steadyserve-On-Behalf-Of")
    key_id, hops, expires_ms, mac = parts
    if not hmac.compare_digest(mac.encode(), _mac(secret, "grant", deployment, key_id, hops,
                                                  expires_ms).encode()):
        raise BadCredential(f"X-Steadyserve-On-Behalf-Of was not issued to deployment "
                            f"{deployment!r}")
    expires_at = int(expires_ms) / 1000  # the mac held: these are the gateway's own digits
    if now >= expires_at:
        raise BadCredential("X-Steadyserve-On-Behalf-Of has expired: its request's deadline "
                            "passed")
    return Grant(key_id or None, int(hops), expires_at)


class GrantUses:
    """How many child calls each live grant has made (pure: the time is passed in). At most
    `max_entries` grants are tracked: expired ones are dropped when it is full, then the
    oldest tracked."""

    def __init__(self, limit: int, max_entries: int = 100_000) -> None:
        self.limit = limit
        self.max_entries = max_entries
        self._uses: dict[str, list[float]] = {}  # grant → [uses, expires_at]

    def take(self, grant: str, expires_at: float, now: float) -> bool:
        """One more call under `grant`; False (and not counted) past the limit."""
        entry = self._uses.get(grant)
        if entry is None:
            if len(self._uses) >= self.max_entries:
                self._make_room(now)
            entry = self._uses[grant] = [0, expires_at]
        if entry[0] >= self.limit:
            return False
        entry[0] += 1
        return True

    def _make_room(self, now: float) -> None:
        for grant in [g for g, (_, expires) in self._uses.items() if expires <= now]:
            del self._uses[grant]
        while len(self._uses) >= self.max_entries:
            del self._uses[next(iter(self._uses))]

    def __len__(self) -> int:
        return len(self._uses)

