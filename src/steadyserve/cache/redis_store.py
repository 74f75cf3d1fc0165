"""The one wrapper around Redis: the shared L2 response cache and cross-gateway invalidation.

Every call is bounded by `timeout_s`; any Redis or socket error marks L2 down, logs it once,
and returns "nothing" to the caller, which goes on with L1 alone: no client ever sees a Redis
error. While down, calls return at once (no per-request timeouts), and a background loop pings
every `retry_s` until Redis answers again. Invalidations made while L2 was down are replayed
when it returns (a bounded set, `max_pending_invalidations`; beyond it every tagged entry is
dropped), so a stale answer cannot reappear from L2 after an outage.

Layout under the prefix `P` (default "steadyserve:"):
    P e:<key>     an entry: msgpack [payload, fresh_until, keep_until, tags, generation],
                  expires at keep_until
    P t:<tag>     set of entry keys carrying the tag (expires with its longest-lived entry)
    P v:<tag>     the tag's version, bumped by every invalidation
    P v:*         the generation of tagged entries (ALL_TAGS' version): invalidating ALL_TAGS
                  bumps it, and a tagged entry written under an older generation reads as
                  absent, so "drop every tagged entry" is one INCR, not a scan
    P inval       pub/sub channel: {"o": origin gateway, "t": [tags], "id": message id}
    P ack:<id>    list the other gateways push to once they dropped their copies; the sender
                  waits for as many as PUBLISH reached (at most ack_timeout_s), so on healthy
                  gateways an invalidation is everywhere before the writer's client hears back
Writes go through a script that checks the tag versions (and the generation) read before the
load began: an answer computed from data that was invalidated meanwhile is refused, on every
gateway.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import msgpack
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .invalidation import ALL_TAGS

log = logging.getLogger("steadyserve.cache.redis")

T = TypeVar("T")

VERSION_TTL_MS = 86_400_000  # tag versions outlive any load by far
MAX_PENDING_INVALIDATIONS = 100_000  # the default; the gateway passes [cache] max_tracked_invalidations
TIMEOUTS_FOR_OUTAGE = 3
WATCH_POLL_S = 0.25  # the watcher checks for messages, and for stop(), this often

# KEYS: entry, n tag versions, n tag sets, the generation; ARGV: body, ttl_ms, n, n versions,
# the generation the body carries. Untagged entries depend on no data: no generation check.
_WRITE = """
local n = tonumber(ARGV[3])
if n > 0 and (redis.call('GET', KEYS[2 + 2 * n]) or '0') ~= ARGV[4 + n] then return 0 end
for i = 1, n do
  local v = redis.call('GET', KEYS[1 + i]) or '0'
  if v ~= ARGV[3 + i] then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
for i = 1, n do
  local s = KEYS[1 + n + i]
  redis.call('SADD', s, KEYS[1])
  if redis.call('PTTL', s) < tonumber(ARGV[2]) then redis.call('PEXPIRE', s, ARGV[2]) end
end
return 1
"""

_INVALIDATE = """
local n = tonumber(ARGV[1])
local dropped = 0
for i = 1, n do
  redis.call('INCR', KEYS[i])
  redis.call('PEXPIRE', KEYS[i], ARGV[2])
  for _, key in ipairs(redis.call('SMEMBERS', KEYS[n + i])) do
    dropped = dropped + redis.call('UNLINK', key)
  end
  redis.call('DEL', KEYS[n + i])
end
return dropped
"""

_ERRORS = (RedisError, OSError, TimeoutError, ConnectionError)


class RedisStore:
    def __init__(
        self, url: str, *, origin: str, prefix: str = "steadyserve:", timeout_s: float = 0.05,
        retry_s: float = 1.0, on_invalidate: Callable[[list[str]], Awaitable[object]] | None = None,
        on_state: Callable[[bool], None] | None = None, ack_timeout_s: float = 1.0,
        max_pending_invalidations: int = MAX_PENDING_INVALIDATIONS,
    ) -> None:
        self.url = url
        self.origin = origin
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.on_invalidate = on_invalidate
        self.on_state = on_state
        self.up = False
        self.errors = 0
        self.outages = 0
        self._client = aioredis.Redis.from_url(
            url, socket_timeout=max(1.0, timeout_s * 4), socket_connect_timeout=1.0,
            health_check_interval=0, retry_on_timeout=False)
        self._write = self._client.register_script(_WRITE)
        self._invalidate = self._client.register_script(_INVALIDATE)
        self._pending: set[str] = set()  # tags invalidated while down: replayed on reconnect
        self.max_pending_invalidations = max_pending_invalidations
        self._lost = False  # more than that: drop every tagged entry on reconnect instead
        self._task: asyncio.Task[None] | None = None
        self._timeouts = 0  # consecutive timed-out calls
        self._stopping = False
        self._subscribed = False  # our own subscriber counts among PUBLISH's receivers
        self.ack_timeout_s = ack_timeout_s
        self.ack_timeouts = 0  # invalidations not acknowledged by every other gateway in time
        self.last_acks = (0, 0)  # (acknowledged, expected) of the last invalidation
        self._channel = (prefix + "inval").encode()

    # lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        await self._reconnect()
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="redis-l2")

    async def stop(self) -> None:
        # a flag, not only cancel(): redis-py's pubsub.get_message can swallow a cancellation
        self._stopping = True
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), WATCH_POLL_S * 4)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
            except Exception:
                log.exception("redis L2 watcher failed while stopping")
        try:
            await self._client.aclose()
        except _ERRORS:
            pass

    # data -----------------------------------------------------------------------------------
    async def lookup(self, keys: Sequence[str], tags: Sequence[str]) -> tuple[list[Any], list[str]] | None:
        """(entries as decoded [payload, fresh_until, keep_until, tags] or None, each tag's
        version) in one round trip; None if down. Pass ALL_TAGS among the tags to get the
        generation that `write` needs for tagged entries."""
        if not self.up or not (keys or tags):
            return None

        # the generation rides along: tagged entries of an older one read as absent
        names = list(tags) if ALL_TAGS in tags else [*tags, ALL_TAGS]

        async def run() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            if keys:
                pipe.mget([self._entry(k) for k in keys])
            pipe.mget([self._version(t) for t in names])
            return list(await pipe.execute())

        replies = await self._call(run)
        if replies is None:
            return None
        raw = replies[0] if keys else []
        values = [v.decode() if v is not None else "0" for v in replies[-1]]
        versions, generation = values[:len(tags)], values[names.index(ALL_TAGS)]
        entries = [_current(msgpack.unpackb(r, raw=False), generation) if r is not None else None
                   for r in raw]
        return entries, versions

    async def write(
        self, key: str, payload: bytes, fresh_until: float, keep_until: float,
        tags: Sequence[str], versions: Sequence[str], generation: str = "0",
    ) -> bool:
        """Store unless a tag's version, or the generation (ALL_TAGS' version, read with
        `versions`), moved since they were read (a racing update)."""
        if not self.up:
            return False
        ttl_ms = max(1, int((keep_until - time.time()) * 1000))
        body = msgpack.packb([payload, fresh_until, keep_until, list(tags), generation],
                             use_bin_type=True)
        keys = [self._entry(key), *(self._version(t) for t in tags), *(self._tagset(t) for t in tags),
                self._version(ALL_TAGS)]
        args = [body, ttl_ms, len(tags), *versions, generation]
        result = await self._call(lambda: self._write(keys=keys, args=args))
        return bool(result)

    async def forget(self, keys: Sequence[str]) -> int | None:
        """Delete these entries; None when L2 is down (they then live out their TTL)."""
        if not keys or not self.up:
            return 0 if not keys else None
        result = await self._call(lambda: self._client.delete(*(self._entry(k) for k in keys)))
        return None if result is None else int(result)

    async def invalidate(self, tags: Sequence[str]) -> int | None:
        """Drop L2 entries with these tags and tell the other gateways; None when L2 is down
        (the tags are then replayed when it comes back)."""
        if not tags:
            return 0
        if not self.up:
            self._remember(tags)
            return None
        dropped = await self._drop(tags)
        if dropped is None:
            self._remember(tags)
            return None
        msg_id = uuid.uuid4().hex
        message = msgpack.packb({"o": self.origin, "t": list(tags), "id": msg_id}, use_bin_type=True)
        receivers = await self._call(lambda: self._client.publish(self._channel, message))
        others = max(0, int(receivers or 0) - (1 if self._subscribed else 0))
        self.last_acks = (await self._await_acks(msg_id, others), others)
        return dropped

    async def _await_acks(self, msg_id: str, expected: int) -> int:
        """Wait (at most ack_timeout_s) until the other gateways say they dropped their copies:
        each pushes to a list once its replicas and its L1 are done."""
        if expected <= 0 or self.ack_timeout_s <= 0:
            return 0
        key = f"{self.prefix}ack:{msg_id}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ack_timeout_s
        got = 0
        try:
            while got < expected:
                remaining = deadline - loop.time()
                if remaining <= 0.001:
                    break
                async with asyncio.timeout(remaining + 0.25):
                    reply = await self._client.blpop([key], timeout=remaining)
                if reply is None:
                    break
                got += 1
        except (*_ERRORS, TimeoutError) as exc:
            log.warning("waiting for invalidation acknowledgements failed: %s", exc)
        if got < expected:
            self.ack_timeouts += 1
            log.warning("invalidation acknowledged by %d of %d other gateways within %.1fs; the "
                        "rest drop their copies when the message reaches them", got, expected,
                        self.ack_timeout_s)
        return got

    # internals --------------------------------------------------------------------------------
    def _entry(self, key: str) -> str:
        return f"{self.prefix}e:{key}"

    def _version(self, tag: str) -> str:
        return f"{self.prefix}v:{tag}"

    def _tagset(self, tag: str) -> str:
        return f"{self.prefix}t:{tag}"

    async def _drop(self, tags: Sequence[str]) -> int | None:
        keys = [*(self._version(t) for t in tags), *(self._tagset(t) for t in tags)]
        result = await self._call(lambda: self._invalidate(keys=keys, args=[len(tags), VERSION_TTL_MS]),
                                  critical=True)
        return None if result is None else int(result)

    def _remember(self, tags: Sequence[str]) -> None:
        if self._lost:
            return
        self._pending.update(tags)
        if len(self._pending) > self.max_pending_invalidations:
            # too many to replay one by one (and to hold): bumping the generation on reconnect
            # drops every tagged entry, which covers them all
            self._pending.clear()
            self._lost = True

    async def _call(self, fn: Callable[[], Awaitable[T]], *, critical: bool = False) -> T | None:
        """None on failure. A connection error marks L2 down at once; timeouts only after
        TIMEOUTS_FOR_OUTAGE in a row (a busy event loop makes single calls look slow), or at
        once for `critical` calls (an invalidation that may not have landed is replayed)."""
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await fn()
        except TimeoutError as exc:
            self._timeouts += 1
            if critical or self._timeouts >= TIMEOUTS_FOR_OUTAGE:
                self._set_down(exc)
            else:
                self.errors += 1
            return None
        except _ERRORS as exc:
            self._set_down(exc)
            return None
        self._timeouts = 0
        return result

    def _set_down(self, exc: BaseException) -> None:
        self.errors += 1
        self._timeouts = 0
        if self.up:
            self.up = False
            self.outages += 1
            log.warning("redis L2 cache unavailable, serving from L1 only: %s: %s",
                        type(exc).__name__, exc or "timeout", extra={"redis": self._safe_url()})
            if self.on_state is not None:
                self.on_state(False)

    def _safe_url(self) -> str:
        return self.url.split("@")[-1]

    async def _reconnect(self) -> bool:
        try:
            if not self.up:  # pooled connections to a Redis that went away are dead: each
                # would fail once and mark L2 down again (a flap per connection after a restart)
                await self._client.connection_pool.disconnect()
            async with asyncio.timeout(max(1.0, self.timeout_s)):
                await self._client.ping()
            if self._lost:
                async with asyncio.timeout(max(1.0, self.timeout_s)):
                    await self._invalidate(keys=[self._version(ALL_TAGS), self._tagset(ALL_TAGS)],
                                           args=[1, VERSION_TTL_MS])
            elif self._pending:
                pending = sorted(self._pending)
                for i in range(0, len(pending), 500):
                    async with asyncio.timeout(5.0):
                        await self._invalidate(keys=[*(self._version(t) for t in pending[i:i + 500]),
                                                     *(self._tagset(t) for t in pending[i:i + 500])],
                                               args=[len(pending[i:i + 500]), VERSION_TTL_MS])
        except _ERRORS as exc:
            if self.up:
                self._set_down(exc)
            return False
        self._pending.clear()
        self._lost = False
        if not self.up:
            self.up = True
            log.info("redis L2 cache connected", extra={"redis": self._safe_url()})
            if self.on_state is not None:
                self.on_state(True)
        return True

    async def _watch(self) -> None:
        """Reconnect while down; while up, listen for other gateways' invalidations."""
        pubsub: Any = None
        while not self._stopping:
            try:
                if not self.up:
                    await _close_pubsub(pubsub)
                    pubsub = None
                    self._subscribed = False
                    if not await self._reconnect():
                        await asyncio.sleep(self.retry_s)
                        continue
                if pubsub is None:
                    pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                    await pubsub.subscribe(self._channel)
                    self._subscribed = True
                message = await pubsub.get_message(timeout=WATCH_POLL_S)
                if message is not None and message.get("type") == "message":
                    await self._received(message["data"])
            except asyncio.CancelledError:
                await _close_pubsub(pubsub)
                raise
            except _ERRORS as exc:
                self._set_down(exc)
                await asyncio.sleep(self.retry_s)
            except Exception:  # a bad message or a bug: log, keep the loop alive
                log.exception("redis L2 watcher iteration failed")
                await asyncio.sleep(self.retry_s)
        await _close_pubsub(pubsub)

    async def _received(self, data: bytes) -> None:
        try:
            body = msgpack.unpackb(data, raw=False)
            origin, tags = body["o"], [str(t) for t in body["t"]]
            msg_id = str(body.get("id", ""))
        except (ValueError, KeyError, TypeError, AttributeError, msgpack.UnpackException):
            log.warning("ignoring a malformed invalidation message on %s", self._channel)
            return
        if origin == self.origin:
            return
        if self.on_invalidate is not None:
            await self.on_invalidate(tags)
        if msg_id:  # the sender waits for this before its client hears back
            key = f"{self.prefix}ack:{msg_id}"

            async def ack() -> None:
                pipe = self._client.pipeline(transaction=False)
                pipe.rpush(key, self.origin)
                pipe.pexpire(key, 60_000)
                await pipe.execute()

            await self._call(ack)


def _current(entry: Any, generation: str) -> Any:
    """An entry as [payload, fresh_until, keep_until, tags], or None when it is tagged and was
    written under an older generation (ALL_TAGS was invalidated since). An entry without a
    generation (written before it existed) counts as generation "0"."""
    if not isinstance(entry, list) or len(entry) < 4:
        return entry  # malformed: the caller's parser refuses it
    if entry[3] and (str(entry[4]) if len(entry) > 4 else "0") != generation:
        return None
    return entry[:4]


async def _close_pubsub(pubsub: Any) -> None:
    if pubsub is not None:
        try:
            await pubsub.aclose()
        except _ERRORS:
            pass
