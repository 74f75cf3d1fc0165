"""What an API key is allowed to do, and the checks on what an operator may ask for.

    scopes     infer     call handlers (native and OpenAI routes)
               feedback  send feedback on answers
               admin     everything: every state change of the platform, and the others
    priority   the highest admission class its requests get: a `batch` key's requests are
               batch whatever X-Priority says; an `interactive` key may still ask for batch
    rate       requests per second and a burst (token bucket, per gateway); 0: none
    deployments  the deployments it may call; empty: all

Read-only routes (status, metrics, models) take any valid key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ClientError

SCOPES = ("infer", "feedback", "admin")
PRIORITIES = ("interactive", "batch")
LOCAL_ADMIN = "local-admin"
USER = "user"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@:-]{0,63}")
_DEPLOYMENT = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
MAX_DEPLOYMENTS_PER_KEY = 100
MAX_RATE_PER_S = 1_000_000.0


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    name: str
    digest: str
    scopes: frozenset[str]
    kind: str = USER
    rate_limit_per_s: float = 0.0
    burst: int = 1
    priority: str = "interactive"
    deployments: tuple[str, ...] = ()
    created_at: float = 0.0
    created_by: str = ""
    expires_at: float | None = None
    revoked_at: float | None = None
    previous_digest: str | None = None
    previous_valid_until: float | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes

    def active(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def may_call(self, deployment: str) -> bool:
        return not self.deployments or deployment in self.deployments

    def public(self) -> dict[str, Any]:
        """Everything but the digests: what listing a key shows."""
        return {
            "id": self.id, "name": self.name, "kind": self.kind, "prefix": f"ss_{self.id}_",
            "scopes": sorted(self.scopes), "rate_limit_per_s": self.rate_limit_per_s,
            "burst": self.burst, "priority": self.priority, "deployments": list(self.deployments),
            "created_at": self.created_at, "created_by": self.created_by,
            "expires_at": self.expires_at, "revoked_at": self.revoked_at,
            "rotated_grace_until": self.previous_valid_until,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class KeySpec:
    """What an operator asks for when creating a key: validated by `parse_spec`."""

    name: str
    scopes: frozenset[str]
    rate_limit_per_s: float = 0.0
    burst: int | None = None
    priority: str = "interactive"
    deployments: tuple[str, ...] = ()
    expires_in_s: float | None = None


def parse_spec(body: Mapping[str, Any]) -> KeySpec:
    """A key's settings from JSON or CLI values; a ClientError naming the field otherwise."""
    known = {"name", "scopes", "rate_limit_per_s", "burst", "priority", "deployments",
             "expires_in_s"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise ClientError(f"unknown field {unknown[0]!r}; known: {sorted(known)}", param=unknown[0])
    name = body.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ClientError("'name' must be 1-64 letters, digits or _.@:- (starting with a letter "
                          "or digit)", param="name")
    scopes = body.get("scopes", ["infer"])
    if not isinstance(scopes, list) or not scopes or not all(
            isinstance(s, str) and s in SCOPES for s in scopes):
        raise ClientError(f"'scopes' must be a non-empty list of {list(SCOPES)}", param="scopes")
    rate = body.get("rate_limit_per_s", 0.0)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) \
            or not 0 <= rate <= MAX_RATE_PER_S:
        raise ClientError(f"'rate_limit_per_s' must be a number in [0, {MAX_RATE_PER_S:.0f}] "
                          "(0: no limit)", param="rate_limit_per_s")
    burst = body.get("burst")
    if burst is not None and (isinstance(burst, bool) or not isinstance(burst, int)
                              or not 1 <= burst <= 1_000_000):
        raise ClientError("'burst' must be a whole number in [1, 1000000]", param="burst")
    priority = body.get("priority", "interactive")
    if priority not in PRIORITIES:
        raise ClientError(f"'priority' must be one of {list(PRIORITIES)}", param="priority")
    deployments = body.get("deployments", [])
    if not isinstance(deployments, list) or len(deployments) > MAX_DEPLOYMENTS_PER_KEY or not all(
            isinstance(d, str) and _DEPLOYMENT.fullmatch(d) for d in deployments):
        raise ClientError(f"'deployments' must be a list of at most {MAX_DEPLOYMENTS_PER_KEY} "
                          "deployment names", param="deployments")
    expires = body.get("expires_in_s")
    if expires is not None and (isinstance(expires, bool) or not isinstance(expires, (int, float))
                                or not math.isfinite(expires) or not 60 <= expires <= 10 * 365 * 86_400):
        raise ClientError("'expires_in_s' must be a number of seconds in [60, 10 years]",
                          param="expires_in_s")
    return KeySpec(name=name, scopes=frozenset(scopes), rate_limit_per_s=float(rate), burst=burst,
                   priority=str(priority), deployments=tuple(sorted(set(deployments))),
                   expires_in_s=None if expires is None else float(expires))


def spec_schema() -> dict[str, Any]:
    """JSON Schema of what `parse_spec` accepts (published in the OpenAPI document)."""
    return {
        "type": "object", "required": ["name"], "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "pattern": f"^{_NAME.pattern}$"},
            "scopes": {"type": "array", "minItems": 1, "items": {"enum": list(SCOPES)}},
            "rate_limit_per_s": {"type": "number", "minimum": 0, "maximum": MAX_RATE_PER_S},
            "burst": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 1_000_000},
                                {"type": "null"}]},
            "priority": {"enum": list(PRIORITIES)},
            "deployments": {"type": "array", "maxItems": MAX_DEPLOYMENTS_PER_KEY,
                            "items": {"type": "string", "pattern": f"^{_DEPLOYMENT.pattern}$"}},
            "expires_in_s": {"anyOf": [{"type": "number", "minimum": 60,
                                        "maximum": 10 * 365 * 86_400}, {"type": "null"}]},
        },
    }


ROTATE_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": True,
    "properties": {"grace_s": {"type": "number", "minimum": 0, "maximum": 30 * 86_400}},
}


def default_burst(rate_per_s: float) -> int:
    """One second of traffic, at least one request."""
    return max(1, math.ceil(rate_per_s))
