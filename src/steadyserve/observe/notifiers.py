"""Alert notifiers and the non-blocking queue that delivers to them.

A notification is a plain dict made by the alert engine:

    {"group_key": str, "group_labels": {str: str}, "status": "firing" | "resolved",
     "alerts": [{"labels": {...}, "annotations": {...}, "status": str, "starts_at": epoch s,
                 "ends_at": epoch s | None, "fingerprint": str, "value": float}]}

`webhook_payload` and `alertmanager_payload` turn it into the two wire shapes (pure functions).
The notifiers are the one wrapper around each outside receiver: they map aiohttp and HTTP
errors to `NotifierError` (`raise … from exc`), which says whether a retry may help.

`DeliveryQueue` decouples the alert engine from slow receivers: `submit` never blocks nor
raises; `run()` (one background task) keeps one lane per notifier, each with its own bounded
FIFO, retries and backoff, so a dead webhook never delays the log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
import orjson

from ..errors import SteadyError
from ..policies.backoff import Backoff

log = logging.getLogger(__name__)

Notification = Mapping[str, Any]
"""The dict described in the module docstring."""

ZERO_TIME = "0001-01-01T00:00:00Z"  # Go's zero time: Alertmanager's endsAt while firing
RECEIVER = "steadyserve"
_ERROR_BODY_BYTES = 512  # how much of a failed response we keep for the log
_RESOLVED_WORDS = frozenset({"resolved", "inactive", "ok", "normal"})


class NotifierError(SteadyError):
    """A receiver did not take a notification. `retryable` is False when trying again cannot
    help (a 4xx other than 408/429, or a notification we could not encode)."""

    status = 502
    code = "notifier_failed"

    def __init__(self, message: str, *, retryable: bool = True,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after_s = retry_after_s


# ---- pure payload builders ---------------------------------------------------------------

def rfc3339(epoch_s: float) -> str:
    """Epoch seconds as RFC 3339 in UTC with milliseconds, e.g. 2024-05-01T12:00:00.250Z."""
    stamp = datetime.fromtimestamp(float(epoch_s), tz=UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def alert_status(alert: Mapping[str, Any]) -> str:
    """"firing" or "resolved". Known words map directly; anything else is resolved once it
    has an end time, firing before."""
    status = str(alert.get("status", "")).lower()
    if status == "firing":
        return "firing"
    if status in _RESOLVED_WORDS:
        return "resolved"
    return "resolved" if alert.get("ends_at") is not None else "firing"


def group_status(notification: Notification) -> str:
    """Alertmanager's rule: the group fires while any of its alerts fires. With no alerts,
    the notification's own status."""
    alerts = list(notification.get("alerts") or ())
    if not alerts:
        return "firing" if str(notification.get("status")) == "firing" else "resolved"
    return "firing" if any(alert_status(a) == "firing" for a in alerts) else "resolved"


def _str_map(obj: Mapping[str, Any] | None) -> dict[str, str]:
    """Alertmanager's labels and annotations are string → string."""
    return {str(k): str(v) for k, v in (obj or {}).items()}


def common_pairs(maps: Sequence[Mapping[str, str]]) -> dict[str, str]:
    """The key/value pairs present, with the same value, in every map (empty for none)."""
    if not maps:
        return {}
    common = dict(maps[0])
    for other in maps[1:]:
        common = {k: v for k, v in common.items() if k in other and other[k] == v}
    return common


def _ends_at(alert: Mapping[str, Any], status: str) -> str:
    ends_at = alert.get("ends_at")
    if status == "firing" or ends_at is None:
        return ZERO_TIME
    return rfc3339(ends_at)


def webhook_payload(notification: Notification, external_url: str) -> dict[str, Any]:
    """The body Alertmanager POSTs to a webhook receiver (version "4")."""
    alerts_in = list(notification.get("alerts") or ())
    alerts: list[dict[str, Any]] = []
    for alert in alerts_in:
        status = alert_status(alert)
        alerts.append({
            "status": status,
            "labels": _str_map(alert.get("labels")),
            "annotations": _str_map(alert.get("annotations")),
            "startsAt": rfc3339(alert["starts_at"]),
            "endsAt": _ends_at(alert, status),
            "generatorURL": external_url,
            "fingerprint": str(alert.get("fingerprint", "")),
        })
    return {
        "version": "4",
        "groupKey": str(notification.get("group_key", "")),
        "truncatedAlerts": 0,
        "status": group_status(notification),
        "receiver": RECEIVER,
        "groupLabels": _str_map(notification.get("group_labels")),
        "commonLabels": common_pairs([a["labels"] for a in alerts]),
        "commonAnnotations": common_pairs([a["annotations"] for a in alerts]),
        "externalURL": external_url,
        "alerts": alerts,
    }


def alertmanager_payload(notification: Notification, generator_url: str) -> list[dict[str, Any]]:
    """The body of Alertmanager's `POST /api/v2/alerts` (a list of postable alerts).

    A resolved alert carries its endsAt. A firing one carries none, which Alertmanager reads as
    "firing until resolve_timeout (default 5 min) passes without hearing of it again": the alert
    engine must re-send firing alerts more often than that, as Prometheus does.
    """
    out: list[dict[str, Any]] = []
    for alert in notification.get("alerts") or ():
        item: dict[str, Any] = {
            "labels": _str_map(alert.get("labels")),
            "annotations": _str_map(alert.get("annotations")),
            "startsAt": rfc3339(alert["starts_at"]),
            "generatorURL": generator_url,
        }
        if alert_status(alert) == "resolved" and alert.get("ends_at") is not None:
            item["endsAt"] = rfc3339(max(float(alert["ends_at"]), float(alert["starts_at"])))
        out.append(item)
    return out


# ---- notifiers ---------------------------------------------------------------------------

class Notifier(Protocol):
    """Delivers one notification or raises NotifierError. `name` keys the queue's stats."""

    name: str

    async def send(self, notification: Notification, session: aiohttp.ClientSession) -> None: ...


def _redact(url: str) -> str:
    """scheme://host:port only: webhook paths and queries often hold secrets."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _retry_after(headers: Mapping[str, str]) -> float | None:
    raw = headers.get("Retry-After")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        return None  # an HTTP date: ignore it, our own backoff applies


async def _post_json(
    session: aiohttp.ClientSession, url: str, body: Any, *, timeout_s: float,
    headers: Mapping[str, str] | None,
) -> None:
    """POST a JSON body; any failure becomes NotifierError. 2xx is success."""
    try:
        data = orjson.dumps(body)
    except TypeError as exc:
        raise NotifierError(f"notification is not JSON-serialisable: {exc}", retryable=False) from exc
    send_headers = {"Content-Type": "application/json", **(headers or {})}
    where = _redact(url)
    try:
        async with session.post(
            url, data=data, headers=send_headers, timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as resp:
            if 200 <= resp.status < 300:
                return
            detail = (await resp.content.read(_ERROR_BODY_BYTES)).decode("utf-8", "replace")
            retryable = resp.status >= 500 or resp.status in (408, 429)
            raise NotifierError(
                f"{where} answered {resp.status}: {detail.strip()[:200]}",
                retryable=retryable,
                retry_after_s=_retry_after(resp.headers),
            )
    except NotifierError:
        raise
    except TimeoutError as exc:
        raise NotifierError(f"{where} did not answer within {timeout_s:g} s") from exc
    except aiohttp.ClientError as exc:
        raise NotifierError(f"{where} failed: {type(exc).__name__}: {exc}") from exc
    except OSError as exc:
        raise NotifierError(f"{where} failed: {type(exc).__name__}: {exc}") from exc


class WebhookNotifier:
    """POSTs Alertmanager's webhook body (version 4) to `url`."""

    def __init__(self, url: str, timeout_s: float = 5, headers: Mapping[str, str] | None = None, *,
                 external_url: str = "", name: str = "webhook") -> None:
        self.url = url
        self.timeout_s = float(timeout_s)
        self.headers = dict(headers or {})
        self.external_url = external_url
        self.name = name

    async def send(self, notification: Notification, session: aiohttp.ClientSession) -> None:
        try:
            body = webhook_payload(notification, self.external_url)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise NotifierError(f"malformed notification: {exc!r}", retryable=False) from exc
        await _post_json(session, self.url, body, timeout_s=self.timeout_s, headers=self.headers)

    def __repr__(self) -> str:
        return f"WebhookNotifier({_redact(self.url)!r}, name={self.name!r})"


class AlertmanagerNotifier:
    """Hands alerts to a real Alertmanager (`POST {base_url}/api/v2/alerts`), which then does
    the grouping, silencing and routing."""

    def __init__(self, base_url: str, timeout_s: float = 5, headers: Mapping[str, str] | None = None,
                 *, generator_url: str = "", name: str = "alertmanager") -> None:
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/api/v2/alerts"
        self.timeout_s = float(timeout_s)
        self.headers = dict(headers or {})
        self.generator_url = generator_url
        self.name = name

    async def send(self, notification: Notification, session: aiohttp.ClientSession) -> None:
        try:
            body = alertmanager_payload(notification, self.generator_url)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise NotifierError(f"malformed notification: {exc!r}", retryable=False) from exc
        if not body:
            return  # nothing to tell; Alertmanager would accept an empty list anyway
        await _post_json(session, self.url, body, timeout_s=self.timeout_s, headers=self.headers)

    def __repr__(self) -> str:
        return f"AlertmanagerNotifier({_redact(self.base_url)!r}, name={self.name!r})"


class LogNotifier:
    """One structured log line per notification: WARNING while firing, INFO once resolved."""

    def __init__(self, logger: logging.Logger | None = None, *, name: str = "log") -> None:
        self.logger = logger or logging.getLogger("steadyserve.alerts")
        self.name = name

    async def send(self, notification: Notification, session: aiohttp.ClientSession) -> None:
        alerts = list(notification.get("alerts") or ())
        status = group_status(notification)
        self.logger.log(
            logging.WARNING if status == "firing" else logging.INFO,
            "alert %s: %s (%d alert%s)", status, notification.get("group_key", ""), len(alerts),
            "" if len(alerts) == 1 else "s",
            extra={
                "alert_status": status,
                "alert_group": str(notification.get("group_key", "")),
                "alert_group_labels": _str_map(notification.get("group_labels")),
                "alerts": [
                    {"status": alert_status(a), "labels": _str_map(a.get("labels")),
                     "fingerprint": str(a.get("fingerprint", "")), "value": a.get("value")}
                    for a in alerts
                ],
            },
        )


# ---- the delivery queue ------------------------------------------------------------------

@dataclass
class _Lane:
    """One notifier's FIFO, counters and wake-up signal."""

    name: str
    notifier: Notifier
    pending: deque[Notification] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    in_flight: bool = False
    delivered: int = 0
    failed: int = 0
    dropped: int = 0
    retries: int = 0
    last_error: str | None = None
    last_delivered_at: float | None = None
    last_failed_at: float | None = None


class DeliveryQueue:
    """Non-blocking, bounded, retrying delivery of notifications to every notifier.

    Each notifier has its own lane: a FIFO of at most `max_queue` waiting notifications (when
    full, the OLDEST is dropped and counted), delivered in order, one at a time, each tried up
    to `max_attempts` times with exponential backoff and jitter (`Backoff`, honouring a
    receiver's Retry-After up to `backoff_cap_s`). Lanes run concurrently, so a dead receiver
    only delays its own lane. `clock` (epoch seconds) stamps the stats; `sleep` and `rand`
    are injectable for tests.
    """

    def __init__(
        self,
        notifiers: Iterable[Notifier],
        *,
        max_queue: int = 1000,
        max_attempts: int = 8,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 60,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self._lanes: list[_Lane] = []
        seen: dict[str, int] = {}
        for notifier in notifiers:
            base = str(getattr(notifier, "name", type(notifier).__name__))
            seen[base] = seen.get(base, 0) + 1
            name = base if seen[base] == 1 else f"{base}#{seen[base]}"
            self._lanes.append(_Lane(name, notifier))
        self.max_queue = max_queue
        self.max_attempts = max_attempts
        self.backoff = Backoff(base_s=backoff_base_s, cap_s=backoff_cap_s)
        self._clock = clock
        self._sleep = sleep
        self._rand = rand
        self._closing = False
        self._running = False
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()

    # -- producer side --

    def submit(self, notification: Notification) -> None:
        """Queue for every notifier. Never blocks, never raises."""
        try:
            for lane in self._lanes:
                if self._closing:
                    lane.dropped += 1
                    continue
                if len(lane.pending) >= self.max_queue:
                    lane.pending.popleft()
                    lane.dropped += 1
                    log.warning("alert notification dropped: queue full",
                                extra={"notifier": lane.name, "max_queue": self.max_queue})
                lane.pending.append(notification)
                lane.wake.set()
        except Exception:  # a bug here must not reach the alert engine
            log.exception("alert notification submit failed")

    def stats(self) -> dict[str, dict[str, int]]:
        """Per notifier: queued (waiting + in flight), delivered, failed (gave up), dropped
        (queue full or closed), retries (attempts after the first)."""
        return {
            lane.name: {
                "queued": len(lane.pending) + int(lane.in_flight),
                "delivered": lane.delivered,
                "failed": lane.failed,
                "dropped": lane.dropped,
                "retries": lane.retries,
            }
            for lane in self._lanes
        }

    def last_errors(self) -> dict[str, str | None]:
        """Per notifier, the message of the latest failed attempt (None if none yet)."""
        return {lane.name: lane.last_error for lane in self._lanes}

    # -- the background loop --

    async def run(self) -> None:
        """Deliver until closed (or cancelled). Start it once, as one task."""
        if self._running:
            raise RuntimeError("DeliveryQueue.run() is already running")
        self._running = True
        self._stopped.clear()
        try:
            async with aiohttp.ClientSession() as session:
                self._tasks = [
                    asyncio.create_task(self._lane_loop(lane, session), name=f"notify:{lane.name}")
                    for lane in self._lanes
                ]
                try:
                    # a lane ends only when drained after close(), or when close() cancels it
                    await asyncio.gather(*self._tasks, return_exceptions=True)
                finally:
                    for task in self._tasks:
                        task.cancel()
                    await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            self._tasks = []
            self._running = False
            self._stopped.set()

    async def _lane_loop(self, lane: _Lane, session: aiohttp.ClientSession) -> None:
        while True:
            try:
                if not lane.pending:
                    if self._closing:
                        return
                    lane.wake.clear()
                    await lane.wake.wait()
                    continue
                notification = lane.pending.popleft()
                lane.in_flight = True
                try:
                    await self._deliver(lane, notification, session)
                except asyncio.CancelledError:
                    lane.pending.appendleft(notification)  # not delivered: close() counts it
                    raise
                finally:
                    lane.in_flight = False
            except asyncio.CancelledError:
                raise
            except Exception:
                # only a bug lands here; keep the lane alive, but do not spin on it
                lane.failed += 1
                log.exception("alert delivery loop error", extra={"notifier": lane.name})
                with contextlib.suppress(Exception):
                    await self._sleep(self.backoff.base_s)

    async def _deliver(self, lane: _Lane, notification: Notification,
                       session: aiohttp.ClientSession) -> None:
        group = str(notification.get("group_key", "")) if isinstance(notification, Mapping) else "?"
        for attempt in range(1, self.max_attempts + 1):
            try:
                await lane.notifier.send(notification, session)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                retryable = exc.retryable if isinstance(exc, NotifierError) else False
                message = exc.message if isinstance(exc, NotifierError) else repr(exc)
                lane.last_error = message
                lane.last_failed_at = self._clock()
                last = attempt >= self.max_attempts or not retryable
                log.warning(
                    "alert notification attempt failed%s", "; giving up" if last else "",
                    exc_info=not isinstance(exc, NotifierError),
                    extra={"notifier": lane.name, "alert_group": group, "attempt": attempt,
                           "max_attempts": self.max_attempts, "error": message},
                )
                if last:
                    lane.failed += 1
                    return
                delay_s = self.backoff.delay(attempt - 1, self._rand())
                if isinstance(exc, NotifierError) and exc.retry_after_s is not None:
                    delay_s = min(max(delay_s, exc.retry_after_s), self.backoff.cap_s)
                lane.retries += 1
                await self._sleep(delay_s)
            else:
                lane.delivered += 1
                lane.last_delivered_at = self._clock()
                return

    # -- shutdown --

    async def close(self, timeout_s: float) -> int:
        """Stop taking notifications, deliver what is queued for at most `timeout_s`, then
        cancel. Returns how many deliveries were abandoned (0: fully drained)."""
        self._closing = True
        for lane in self._lanes:
            lane.wake.set()
        if not self._running:
            await asyncio.sleep(0)  # let a run() task created just before this call start
        if self._running:
            try:
                async with asyncio.timeout(max(0.0, timeout_s)):
                    await self._stopped.wait()
            except TimeoutError:
                for task in self._tasks:
                    task.cancel()
                await self._stopped.wait()
        abandoned = 0
        for lane in self._lanes:
            left = len(lane.pending) + int(lane.in_flight)
            if left:
                log.warning("alert notifications abandoned at shutdown",
                            extra={"notifier": lane.name, "count": left})
            abandoned += left
            lane.dropped += left
            lane.pending.clear()
            lane.in_flight = False
        return abandoned
