"""Creating, listing, rotating and revoking keys: the operations behind both
`steadyserve keys …` (straight to the database) and `/v1/admin/keys` (through a gateway).
Blocking (database I/O): the gateway runs them in a worker thread."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

from ..errors import Conflict, NotFound
from ..store.keys import KeyStore
from .keys import ApiKey, KeySpec, default_burst
from .tokens import digest, new_secret_for, new_token


def create(store: KeyStore, spec: KeySpec, *, created_by: str, now: float | None = None,
           random_bytes: Callable[[int], bytes] = os.urandom) -> tuple[ApiKey, str]:
    """(the stored key, its token: shown once, never stored)."""
    now = time.time() if now is None else now
    key_id, token = new_token(random_bytes)
    key = ApiKey(
        id=key_id, name=spec.name, digest=digest(token), scopes=spec.scopes,
        rate_limit_per_s=spec.rate_limit_per_s,
        burst=spec.burst or default_burst(spec.rate_limit_per_s), priority=spec.priority,
        deployments=spec.deployments, created_at=now, created_by=created_by[:100],
        expires_at=None if spec.expires_in_s is None else now + spec.expires_in_s,
    )
    store.add(key, now=now)
    return key, token


def find(store: KeyStore, ref: str) -> ApiKey:
    """A key by id, prefix (`ss_<id>_`) or name; NotFound, or Conflict when a name is shared."""
    ref = ref.strip()
    if ref.startswith("ss_"):
        ref = ref[3:].split("_", 1)[0]
    keys = store.load()
    by_id = [k for k in keys if k.id == ref]
    if by_id:
        return by_id[0]
    named = [k for k in keys if k.name == ref and k.revoked_at is None]
    if not named:
        raise NotFound(f"no API key with id or name {ref[:64]!r}")
    if len(named) > 1:
        raise Conflict(f"{len(named)} keys are named {ref!r}; use an id: "
                       + ", ".join(k.id for k in named))
    return named[0]


def revoke(store: KeyStore, ref: str, *, now: float | None = None) -> ApiKey:
    key = find(store, ref)
    now = time.time() if now is None else now
    if not store.revoke(key.id, now=now):
        raise Conflict(f"API key ss_{key.id}_… is already revoked")
    return dataclasses.replace(key, revoked_at=now)


def rotate(store: KeyStore, ref: str, *, grace_s: float = 0.0, now: float | None = None,
           random_bytes: Callable[[int], bytes] = os.urandom) -> tuple[ApiKey, str]:
    """A new token for the key (same id, scopes and limits); the old one keeps working for
    `grace_s` so clients can be moved over without an outage."""
    key = find(store, ref)
    if key.revoked_at is not None:
        raise Conflict(f"API key ss_{key.id}_… is revoked; create a new one")
    now = time.time() if now is None else now
    token = new_secret_for(key.id, random_bytes)
    grace_until = now + grace_s if grace_s > 0 else None
    if not store.rotate(key.id, digest(token), grace_until=grace_until):
        raise Conflict(f"API key ss_{key.id}_… was revoked meanwhile")
    rotated = dataclasses.replace(key, digest=digest(token),
                                  previous_digest=key.digest if grace_until else None,
                                  previous_valid_until=grace_until)
    return rotated, token
