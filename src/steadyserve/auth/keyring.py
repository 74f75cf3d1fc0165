"""The keys one gateway checks requests against: in memory, refreshed from the database.

    start ─► bootstrap: the data directory's local admin key (file, mode 0600), made on the
             first start, recorded in the database ─► refresh loop: every key_refresh_s read
             one revision row; reload the table when it changed (revocations reach every
             gateway sharing the database within about that period)
    request ─► authenticate(token): the id part finds the key, the digest must match
             (constant-time), revoked / expired keys are refused ─► rate(key): token bucket

The database is the source of truth; when it is unreachable the ring keeps the last keys it
read (fail static, logged once per outage) and the local admin key from its file, so the
local CLI still works during a database outage.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import RateLimited, Unauthorized
from ..policies.ratelimit import Bucket, take
from ..store import DatabaseUnavailable
from ..store.keys import KeyStore
from ..tasks import cancel_and_wait
from . import childcalls
from .keys import LOCAL_ADMIN, ApiKey
from .tokens import digest, key_id_of, new_token

log = logging.getLogger("steadyserve.auth")

CHILD_TOKEN_PREFIX = childcalls.TOKEN_PREFIX  # never an API key's: no id part


class KeyRing:
    def __init__(
        self, store: KeyStore | None = None, *, admin_key_path: Path | None = None,
        refresh_s: float = 0.5, wall: Callable[[], float] = time.time,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.store = store
        self.admin_key_path = admin_key_path
        self.refresh_s = refresh_s
        self.wall = wall
        self.random_bytes = random_bytes
        self._keys: dict[str, ApiKey] = {}
        self._user_keys: tuple[bool, float] = (False, -math.inf)  # (answer, valid until)
        self._buckets: dict[str, Bucket] = {}
        self._revision: str | None = None
        self._db_down = False
        self._task: asyncio.Task[None] | None = None
        self._bootstrapped = False
        self.local_admin: ApiKey | None = None
        self.admin_token: str | None = None
        self._child: tuple[str | None, bytes] = (None, b"")  # (admin token, its child secret)
        if admin_key_path is None:
            # no data directory (tests, embedded use): an admin key that lives in memory only
            self._adopt_local_admin(*new_token(random_bytes))
            self._bootstrapped = True

    # lifecycle -------------------------------------------------------------------------------
    def bootstrap(self) -> None:
        """Read or create the local admin key and load every key. Blocking I/O: call before
        serving (or in a thread). Idempotent."""
        if self._bootstrapped:
            return
        assert self.admin_key_path is not None
        key_id, token = self._read_or_create_admin_file(self.admin_key_path)
        self._adopt_local_admin(key_id, token)
        self.refresh()
        local = self._keys.get(key_id)
        if local is not None and local.revoked_at is not None:
            # someone revoked this data directory's key: mint a new one for the local CLI
            log.warning("the local admin key was revoked; writing a new one",
                        extra={"path": str(self.admin_key_path)})
            key_id, token = new_token(self.random_bytes)
            _write_private(self.admin_key_path, token, replace=True)
            self._adopt_local_admin(key_id, token)
            self.refresh()
        self._bootstrapped = True

    async def start(self) -> None:
        if not self._bootstrapped:
            await asyncio.to_thread(self.bootstrap)
        if self.store is not None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="auth-keys")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await asyncio.to_thread(self.refresh)
            except Exception:  # never let the loop die: a key change would stop arriving
                log.exception("refreshing API keys failed; continuing")

    def refresh(self) -> None:
        """Reload the keys if the database says they changed (blocking)."""
        if self.store is None:
            return
        try:
            revision = self.store.revision()
            if revision is None or revision != self._revision or self._db_down:
                keys = self.store.load()
                self._keys = {k.id: k for k in keys}
                self._user_keys = (False, -math.inf)
                self._revision = revision
                if self.local_admin is not None and self.local_admin.id not in self._keys:
                    # a new database (or one that was down at bootstrap): record our key
                    if self.store.ensure(self.local_admin):
                        self._keys[self.local_admin.id] = self.local_admin
            if self._db_down:
                log.info("API keys reloaded: the database is back")
            self._db_down = False
        except DatabaseUnavailable as exc:
            if not self._db_down:
                log.error("cannot read API keys, keeping the last ones read: %s", exc)
            self._db_down = True

    # child calls (gateway.compose, auth.childcalls): a replica calling another deployment --
    @property
    def _child_secret(self) -> bytes | None:
        """Derived from the local admin key, so every process of this gateway derives the
        same one and nothing more is stored; None before the admin key is known."""
        if self.admin_token is None:
            return None
        if self._child[0] != self.admin_token:
            self._child = (self.admin_token, childcalls.secret_from(self.admin_token))
        return self._child[1]

    def child_token(self, deployment: str) -> str | None:
        """The credential `deployment`'s replicas send with their child calls."""
        secret = self._child_secret
        return None if secret is None else childcalls.token_for(secret, deployment)

    def grant(self, deployment: str, key_id: str | None, hops: int,
              remaining_s: float) -> str | None:
        """What a request sent to `deployment` hands its child calls: its key, its depth and
        its deadline (`remaining_s` from now), bound to that deployment."""
        secret = self._child_secret
        if secret is None:
            return None
        return childcalls.issue(secret, deployment, key_id, hops,
                                self.wall() + remaining_s + childcalls.GRANT_SLACK_S)

    def authenticate_child(self, token: str, grant: str | None, now: float
                           ) -> tuple[str, ApiKey | None, childcalls.Grant | None]:
        """A child call: (the calling deployment, the key it acts for, its grant). The token
        says which deployment's replica sent it; the grant, handed to that deployment with a
        request, says for which key, how deep and until when (none: a call of the
        deployment's own, outside any request — no key). The key must still be valid: a
        key revoked mid-pipeline stops its children too."""
        secret = self._child_secret
        try:
            if secret is None:
                raise childcalls.BadCredential("unknown child-call credential")
            caller = childcalls.caller_of(secret, token)
            if not grant:
                return caller, None, None
            granted = childcalls.check(secret, caller, grant, now)
        except childcalls.BadCredential as exc:
            raise Unauthorized(str(exc)) from None
        if granted.key_id is None:
            return caller, None, granted
        key = self._keys.get(granted.key_id)
        if key is None and self.local_admin is not None and \
                self.local_admin.id == granted.key_id:
            key = self.local_admin
        if key is None:
            raise Unauthorized("the parent request's API key is unknown")
        if not key.active(now):
            raise Unauthorized(f"API key ss_{key.id}_… is no longer valid")
        return caller, key, granted

    # the request path ----------------------------------------------------------------------
    def authenticate(self, token: str, now: float) -> ApiKey:
        key_id = key_id_of(token)
        if key_id is None:
            raise Unauthorized("malformed API key: expected 'Authorization: Bearer ss_…'")
        key = self._keys.get(key_id)
        if key is None and self.local_admin is not None and self.local_admin.id == key_id:
            key = self.local_admin
        if key is None:
            raise Unauthorized("unknown API key")
        given = digest(token)
        ok = hmac.compare_digest(given, key.digest) or (
            key.previous_digest is not None and key.previous_valid_until is not None
            and now < key.previous_valid_until and hmac.compare_digest(given, key.previous_digest))
        if not ok:
            raise Unauthorized("unknown API key")
        if key.revoked_at is not None:
            raise Unauthorized(f"API key ss_{key.id}_… was revoked")
        if key.expires_at is not None and now >= key.expires_at:
            raise Unauthorized(f"API key ss_{key.id}_… has expired")
        return key

    def rate(self, key: ApiKey, now: float) -> None:
        """Spend one request of the key's rate; RateLimited (429 + Retry-After) when empty."""
        if key.rate_limit_per_s <= 0:
            return
        allowed, retry_after, bucket = take(self._buckets.get(key.id),
                                            rate_per_s=key.rate_limit_per_s,
                                            burst=float(key.burst), now=now)
        self._buckets[key.id] = bucket
        if not allowed:
            raise RateLimited(f"API key ss_{key.id}_… is over its rate of "
                              f"{key.rate_limit_per_s:g} requests/s", retry_after_s=retry_after)

    def user_keys_exist(self) -> bool:
        """Does any usable key exist besides the local admin keys (which never open or close
        inference)? Asked on every open request: the answer is kept until the keys change or
        the first of the active keys expires."""
        now = self.wall()
        answer, until = self._user_keys
        if now < until:
            return answer
        active = [k for k in self._keys.values() if k.kind != LOCAL_ADMIN and k.active(now)]
        expiries = [k.expires_at for k in active if k.expires_at is not None]
        self._user_keys = (bool(active), min(expiries, default=math.inf))
        return bool(active)

    def keys(self) -> list[ApiKey]:
        return list(self._keys.values())

    def put(self, key: ApiKey) -> None:
        """A change this gateway just made: visible here at once, not after the next refresh."""
        self._keys[key.id] = key
        self._buckets.pop(key.id, None)
        self._user_keys = (False, -math.inf)

    # the local admin key ---------------------------------------------------------------------
    def _adopt_local_admin(self, key_id: str, token: str) -> None:
        self.local_admin = ApiKey(id=key_id, name=LOCAL_ADMIN, kind=LOCAL_ADMIN, digest=digest(token),
                                  scopes=frozenset({"admin"}), created_at=self.wall(),
                                  created_by="steadyserve run")
        self.admin_token = token

    def _read_or_create_admin_file(self, path: Path) -> tuple[str, str]:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            token = path.read_text().strip()
        except FileNotFoundError:
            key_id, token = new_token(self.random_bytes)
            if _write_private(path, token, replace=False):
                log.info("wrote the local admin key", extra={"path": str(path)})
                return key_id, token
            token = path.read_text().strip()  # another gateway on this directory won the race
        found = key_id_of(token)
        if found is None:
            log.warning("the local admin key file is malformed; writing a new one",
                        extra={"path": str(path)})
            key_id, token = new_token(self.random_bytes)
            _write_private(path, token, replace=True)
        else:
            key_id = found
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            log.warning("the local admin key file was readable by others (mode %o); now 0600",
                        mode, extra={"path": str(path)})
            os.chmod(path, 0o600)
        return key_id, token


def _write_private(path: Path, token: str, *, replace: bool) -> bool:
    """Write `token` to `path` with mode 0600 from the first byte (never world-readable, not
    even for a moment). replace=False: only if the file does not exist (False if it did)."""
    if not replace:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return True
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    return True
