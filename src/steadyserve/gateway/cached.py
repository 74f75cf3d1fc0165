"""The response cache on the request path, for handlers declared with `cache=True`.

    items (one, or each item of a batched request) ─► key + tags ─► lookup L1 → L2
      fresh        → answered from cache
      stale, within stale-while-revalidate → answered at once; one background refresh
      missing / older → singleflight: the first request for a key calls upstream, identical
                    concurrent ones wait for it; only the items nobody has go to a replica,
                    as one request (a batched list is served partly from cache)
      upstream failed (5xx, no replica, overload) and a stale copy is within
                    stale-if-error → the stale copy, marked `X-Steadyserve-Cache: stale-if-error`

An answer is stored only if the replica that computed it runs the model version the key
names, only if none of its tags was invalidated since the lookup (see `cache.memory`), and only
if its tags are within the [cache] limits (a tag that no invalidation may name would pin it).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .. import codec
from ..cache.invalidation import ALL_TAGS, tag_bytes
from ..cache.keys import affinity_value, cache_key, render_tags, template_fields
from ..cache.singleflight import LeaderGone, Singleflight
from ..cache.tiered import Cached, Tokens
from ..config import CacheConfig
from ..errors import ClientError, HandlerFailed, Overloaded, PayloadTooLarge, ReplicaError, ReplicaTimeout
from .dispatch import CallInfo
from .membership import Deployment, Handler

if TYPE_CHECKING:
    from .http import Request
    from .plane import DataPlane

log = logging.getLogger("steadyserve.cache")

CACHE_HEADER = b"x-steadyserve-cache"
MAX_ROUNDS = 3  # leaders per key a request waits on before it answers with their error
STALE_IF_ERROR = (ReplicaError, Overloaded)  # server-side failures a stale copy may stand in for


class _Request:
    """One client request's cacheable items and what became of each."""

    def __init__(self, gw: DataPlane, d: Deployment, h: Handler, args: dict[str, Any]) -> None:
        opts = h.spec.options
        self.batched = opts.batch
        self.values: list[Any] = list(args[h.item_param]) if opts.batch else [args]
        self.keys = [cache_key(d.name, h.name, d.version, v) for v in self.values]
        limits = gw.full_config.cache
        # a tag over the limits could never be invalidated by name: such an answer is not kept
        self.tags = [t if t is None or _tags_ok(t, limits) else None
                     for t in (render_tags(opts.cache_tags, v) for v in self.values)]
        self.version = d.version
        self.results: list[Any] = [None] * len(self.values)
        self.outcome: list[str] = [""] * len(self.values)


Dispatch = Callable[[dict[str, Any], "str | None"], Awaitable[tuple[Any, "str | None"]]]
"""Calls upstream: (args, affinity key) → (result, model version of the replica that answered)."""


async def cached_call(gw: DataPlane, req: Request, d: Deployment, h: Handler, args: dict[str, Any],
                      dispatch: Dispatch, *, timeout_s: float, reuse: bool = True) -> Any:
    """The handler's result, from cache where possible (`reuse=False`: computed afresh and
    stored, as `Cache-Control: no-cache` asks). `timeout_s` bounds waiting for others too."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    cache = gw.cache
    assert cache is not None
    r = _Request(gw, d, h, args)
    found, tokens = await cache.lookup(r.keys, [t or () for t in r.tags])
    if not reuse:
        found = [None] * len(found)
    now = cache.clock()
    swr = cache.cfg.stale_while_revalidate_s
    emergency = cache.serving_stale(d.name, now)  # the serve_stale automatic response
    todo: dict[str, list[int]] = {}
    refresh: dict[str, int] = {}
    for i, entry in enumerate(found):
        if entry is not None and r.tags[i] is not None:
            if entry.fresh(now):
                r.results[i], r.outcome[i] = codec.decode(entry.payload), "hit"
                continue
            if now < entry.fresh_until + swr:
                r.results[i], r.outcome[i] = codec.decode(entry.payload), "stale"
                if not emergency:
                    refresh.setdefault(r.keys[i], i)
                continue
            if emergency and now < entry.fresh_until + cache.cfg.stale_if_error_s:
                r.results[i], r.outcome[i] = codec.decode(entry.payload), "stale"
                continue
        todo.setdefault(r.keys[i], []).append(i)
    if refresh:
        # the refresh's child calls act for this request's key, at its depth
        lineage = CallInfo(principal=req.call.principal, hops=req.call.hops)
        gw.spawn(_revalidate(gw, d, h, r, refresh, tokens, lineage), name="cache-revalidate")
    if todo:
        await _fill(gw, h, r, todo, found, tokens, dispatch, deadline)
    _account(gw, req, d, h, r)
    return r.results if r.batched else r.results[0]


async def _fill(
    gw: DataPlane, h: Handler, r: _Request, todo: dict[str, list[int]], found: list[Cached | None],
    tokens: Tokens, dispatch: Dispatch, deadline: float,
) -> None:
    cache = gw.cache
    assert cache is not None
    loop = asyncio.get_running_loop()
    pending = todo
    last_error: Exception | None = None
    failed_rounds = 0
    while failed_rounds < MAX_ROUNDS:
        led_keys, joined = cache.flights.claim(pending)
        led = [str(k) for k in led_keys]
        if led:
            await _lead(gw, h, r, led, pending, found, tokens, dispatch)
        again: dict[str, list[int]] = {}
        leader_failed = False
        for flight_key, flight in joined.items():
            key = str(flight_key)
            try:
                item, since = await asyncio.wait_for(Singleflight.wait(flight),
                                                     max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise ReplicaTimeout("no answer within the request's deadline (it was waiting for "
                                     "an identical request's answer)") from None
            except LeaderGone as gone:
                if gone.attributable and isinstance(gone.error, ClientError):
                    raise gone.error from None  # the same input is refused the same way
                last_error = gone.error or last_error
                leader_failed = True
                again[key] = pending[key]
                continue
            tags = r.tags[pending[key][0]]
            if tags and cache.l1.stale_since(tags, since):
                # that call began before an update of its data: this request may have come
                # after the update, so it must not take the old answer; ask again
                again[key] = pending[key]
                continue
            for i in pending[key]:
                r.results[i], r.outcome[i] = item, "coalesced"
        if not again:
            return
        failed_rounds += leader_failed
        pending = again
    # the leaders of these keys kept failing: answer with their error (or a stale copy), rather
    # than each waiter calling upstream too
    error = last_error or Overloaded("identical requests kept being cancelled upstream", retry_after_s=1)
    if not _serve_stale(cache.clock(), cache.cfg.stale_if_error_s, error, list(pending), pending,
                        found, r):
        raise error


async def _lead(
    gw: DataPlane, h: Handler, r: _Request, led: list[str], pending: dict[str, list[int]],
    found: list[Cached | None], tokens: Tokens, dispatch: Dispatch,
) -> None:
    """Call upstream for the keys this request leads; store, and hand results to waiters."""
    cache = gw.cache
    assert cache is not None
    first = [pending[k][0] for k in led]
    args, affinity = _upstream(h, r, first)
    try:
        out, answered = await dispatch(args, affinity)
        items = _items(r, out, len(led))
    except BaseException as exc:
        cache.flights.abandon(led, error=exc if isinstance(exc, Exception) else None,
                              attributable=len(led) == 1)
        if isinstance(exc, Exception) and _serve_stale(cache.clock(), cache.cfg.stale_if_error_s, exc,
                                                       led, pending, found, r):
            return
        raise
    _keep(gw, h, r, led, first, items, answered, tokens)
    for key, item in zip(led, items, strict=True):
        for j in pending[key]:
            r.results[j], r.outcome[j] = item, "miss"


def _upstream(h: Handler, r: _Request, indices: list[int]) -> tuple[dict[str, Any], str | None]:
    """The upstream call's arguments for these items, and its routing key (the first item's)."""
    values = [r.values[i] for i in indices]
    args = {h.item_param: values} if r.batched else r.values[0]
    return args, affinity_value(h.spec.options.affinity, values[0])


def _items(r: _Request, out: Any, expected: int) -> list[Any]:
    items = list(out) if r.batched else [out]
    if len(items) != expected:
        raise HandlerFailed(f"batched handler returned {len(items)} results for {expected} inputs")
    return items


def _keep(gw: DataPlane, h: Handler, r: _Request, keys: list[str], indices: list[int],
          items: list[Any], answered: str | None, tokens: Tokens) -> None:
    """Store fresh answers (only from the model version the keys name) and hand them to the
    requests waiting on them, with the epoch their computation began at (see `_fill`)."""
    cache = gw.cache
    assert cache is not None
    version_ok = answered is None or answered == r.version
    for key, item, i in zip(keys, items, indices, strict=True):
        tags = r.tags[i]
        if version_ok and tags is not None:
            cache.store(key, codec.encode(item), ttl_s=h.spec.options.cache_ttl_s, tags=tags,
                        tokens=tokens)
        cache.flights.resolve(key, (item, tokens.l1))


def _serve_stale(
    now: float, window_s: float, exc: Exception, led: list[str], pending: dict[str, list[int]],
    found: list[Cached | None], r: _Request,
) -> bool:
    """stale-if-error: every failed item has a copy within the window → answer with them."""
    if not isinstance(exc, STALE_IF_ERROR) or window_s <= 0:
        return False
    copies: dict[str, Cached] = {}
    for key in led:
        entry = found[pending[key][0]]
        if entry is None or now >= entry.fresh_until + window_s or r.tags[pending[key][0]] is None:
            return False
        copies[key] = entry
    log.warning("upstream failed; serving stale cached answers: %s", exc,
                extra={"items": sum(len(pending[k]) for k in led)})
    for key, entry in copies.items():
        item = codec.decode(entry.payload)
        for i in pending[key]:
            r.results[i], r.outcome[i] = item, "stale_if_error"
    return True


async def _revalidate(gw: DataPlane, d: Deployment, h: Handler, r: _Request, refresh: dict[str, int],
                      tokens: Tokens, call: CallInfo) -> None:
    """stale-while-revalidate: one background call for the stale keys nobody is computing."""
    cache = gw.cache
    assert cache is not None
    led_keys, _ = cache.flights.claim(refresh)
    led = [str(k) for k in led_keys]
    if not led:
        return
    indices = [refresh[k] for k in led]
    args, affinity = _upstream(h, r, indices)
    try:
        out = await gw.dispatcher.invoke(
            d, h, args, request_id=f"revalidate-{uuid.uuid4().hex[:12]}",
            timeout_s=h.spec.options.timeout_s, priority="batch", call=call,
            affinity=affinity if gw.affinity else None)
        items = _items(r, out, len(led))
    except Exception as exc:
        cache.flights.abandon(led)
        log.info("background revalidation failed; the stale copy stays until it expires: %s", exc)
        return
    except BaseException:
        cache.flights.abandon(led)
        raise
    cache.counters.refreshes += 1
    _keep(gw, h, r, led, indices, items, call.version, tokens)


def _account(gw: DataPlane, req: Request, d: Deployment, h: Handler, r: _Request) -> None:
    counts = Counter(r.outcome)
    req.call.cache_keys = tuple(r.keys)
    for outcome, n in counts.items():
        gw.metrics.cache_items.labels(d.name, h.name, outcome).inc(n)
    if len(counts) == 1:
        req.call.cache = r.outcome[0].replace("_", "-")
    elif "stale_if_error" in counts:
        req.call.cache = "stale-if-error"
    else:
        req.call.cache = "partial"


def invalidation_tags(h: Handler, args: dict[str, Any], limits: CacheConfig) -> tuple[str, ...]:
    """The tags a successful call of an `invalidates=` handler drops everywhere. Called before
    the call runs: tags are filled from the input, so one over the [cache] limits (too long,
    or the reserved ALL_TAGS) refuses the call, naming the field, before it changes anything."""
    templates = h.spec.options.invalidates
    if not templates:
        return ()
    tags = render_tags(templates, args)
    if tags is None:
        log.warning("handler %s: invalidates=%s names a field the request lacks", h.name, templates)
        return ()
    if len(tags) > limits.max_invalidation_tags:  # the service's declaration, not the input
        raise PayloadTooLarge(f"handler {h.name} invalidates {len(tags)} tags per call; [cache] "
                              f"max_invalidation_tags is {limits.max_invalidation_tags}")
    for template, tag in zip(templates, tags, strict=True):  # one tag per template, in order
        problem = _tag_problem(tag, limits)
        if problem:
            fields = template_fields(template)
            raise ClientError(f"{', '.join(fields)}: filled into {template!r}, it makes a tag that "
                              f"{problem}", param=fields[0] if fields else None)
    return tags


def _tag_problem(tag: str, limits: CacheConfig) -> str | None:
    """Why a rendered tag may not name data (to store an answer under or to invalidate)."""
    if tag == ALL_TAGS:
        return f"is the reserved {ALL_TAGS!r} (every tagged entry)"
    size = tag_bytes(tag)
    if size > limits.max_tag_bytes:
        return f"is {size:,} bytes; a tag is at most {limits.max_tag_bytes:,} ([cache] max_tag_bytes)"
    return None


def _tags_ok(tags: tuple[str, ...], limits: CacheConfig) -> bool:
    return all(_tag_problem(t, limits) is None for t in tags)
