"""Job completion webhooks: signing them and delivering them, retried with backoff.

A job's outcome and its webhook's due state are stored in one statement (store.jobs); the
sender claims due webhooks (`JobStore.claim_webhooks`, each held for `WEBHOOK_HOLD_FACTOR`
delivery timeouts, so one whose gateway died mid-try is tried again after that) and POSTs
each once per try: `{"event_id", "type": "job.<state>", "job": {…}}`, signed with HMAC-SHA256
over "<timestamp>.<body>" (`steadyserve.client.verify_webhook` checks it). What came of a try
(delivered, tried again after `policies.jobs.webhook_after`'s backoff, or given up) is
stored; delivery is at least once, and the event id is the job id. The gateway's job runner
(gateway.jobs.JobRunner) owns one sender and runs its loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import random
import secrets
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import httpx
import orjson

from ..config import Config, JobsConfig
from ..errors import ConfigError, DependencyUnavailable
from ..observe.metrics import JobMetrics
from ..policies.jobs import WebhookPolicy, webhook_after, webhook_problem
from ..store.jobs import JobStore

log = logging.getLogger("steadyserve.jobs")  # the jobs' logger, runner and webhooks alike

WEBHOOK_HOLD_FACTOR = 2.0  # a delivery try holds its webhook this many timeouts long
SIGNATURE_VERSION = "v1"


class WebhookSender:
    """Claims due webhooks while fewer than `webhook_concurrency` tries are in flight and
    makes one try of each; `run()` is its loop (logs and goes on after any error), `wake()`
    says there may be one due now, `close()` ends the tries in flight."""

    def __init__(self, cfg: JobsConfig, store: JobStore, metrics: JobMetrics, secret: bytes,
                 *, wall: Callable[[], float] = time.time,
                 rand: Callable[[], float] = random.random,
                 http: httpx.AsyncClient | None = None) -> None:
        self.cfg = cfg
        self.store = store
        self.metrics = metrics
        self.secret = secret
        self.wall = wall
        self.rand = rand
        self.policy = WebhookPolicy(cfg.webhook_max_attempts, cfg.webhook_retry_base_s,
                                    cfg.webhook_retry_cap_s)
        self.http = http or httpx.AsyncClient(follow_redirects=False)
        self.stopping = False
        self._wake = asyncio.Event()
        self._deliveries: set[asyncio.Task[None]] = set()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        cfg = self.cfg
        while not self.stopping:
            self._wake.clear()
            claimed = 0
            free = cfg.webhook_concurrency - len(self._deliveries)
            if free > 0 and not self.stopping:
                try:
                    rows = await asyncio.to_thread(
                        self.store.claim_webhooks, self.wall(), free,
                        cfg.webhook_timeout_s * WEBHOOK_HOLD_FACTOR)
                    for row in rows:
                        task = asyncio.get_running_loop().create_task(
                            self.deliver(row), name=f"webhook-{row['id']}")
                        self._deliveries.add(task)
                        task.add_done_callback(self._delivered)
                    claimed = len(rows)
                except DependencyUnavailable:
                    pass  # the runner's claim loop says the database is down
                except Exception:
                    log.exception("claiming webhooks failed; trying again")
            if not claimed or len(self._deliveries) >= cfg.webhook_concurrency:
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), cfg.poll_s)

    def _delivered(self, task: asyncio.Task[None]) -> None:
        self._deliveries.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook delivery failed", exc_info=task.exception())
        self._wake.set()

    async def close(self) -> None:
        """Cancel the tries in flight (a try cut short is tried again after its hold) and
        close the HTTP client."""
        for t in list(self._deliveries):
            t.cancel()
        await asyncio.gather(*self._deliveries, return_exceptions=True)
        await self.http.aclose()

    async def deliver(self, row: dict[str, Any]) -> None:
        """One try of one job's webhook, and what came of it."""
        cfg = self.cfg
        attempts = int(row["webhook_attempts"])
        url = str(row["webhook_url"])
        problem = webhook_problem(url, cfg.webhook_hosts, cfg.max_webhook_url_chars)
        if problem is not None:  # the allow-list changed since the job was submitted
            state, next_at, error = "failed", None, problem
        else:
            body = webhook_body(row)
            headers = signed_headers(self.secret, str(row["id"]), f"job.{row['state']}",
                                     int(self.wall()), body)
            error = None
            try:
                async with self.http.stream("POST", url, content=body, headers=headers,
                                            timeout=cfg.webhook_timeout_s) as reply:
                    ok = 200 <= reply.status_code < 300  # the body is never read
                    if not ok:
                        error = f"the receiver answered {reply.status_code}"
            except httpx.HTTPError as exc:
                ok = False
                error = f"{type(exc).__name__}: {exc}"[:500]
            state, next_at = webhook_after(ok, attempts=attempts, now=self.wall(),
                                           rand01=self.rand(), policy=self.policy)
        self.metrics.webhooks.labels("retry" if state == "pending" else state).inc()
        extra = {"job": row["id"], "webhook_attempt": attempts, "state": state}
        if state == "failed":
            log.warning("webhook given up: %s", error, extra=extra)
        elif state == "pending":
            log.info("webhook will be tried again: %s", error, extra=extra)
        try:
            await asyncio.to_thread(self.store.webhook_done, row["id"], attempts, state,
                                    next_at, self.wall(), error)
        except DependencyUnavailable:
            log.warning("webhook outcome not stored (the database is down): it is tried again",
                        extra=extra)


def webhook_body(row: dict[str, Any]) -> bytes:
    raw = row.get("result")
    job = {k: row.get(k) for k in ("id", "deployment", "handler", "state", "attempt",
                                   "failures", "created_at", "started_at", "finished_at")}
    return orjson.dumps({
        "event_id": row["id"], "type": f"job.{row['state']}",
        "job": {**job, "result": None if raw is None else orjson.Fragment(raw),
                "error": row.get("error")}})


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """HMAC-SHA256 over "<timestamp>.<body>", hex (what X-Steadyserve-Signature carries
    after "v1="); `steadyserve.client.verify_webhook` checks it."""
    return hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def signed_headers(secret: bytes, event_id: str, event: str, timestamp: int,
                   body: bytes) -> dict[str, str]:
    return {"content-type": "application/json", "user-agent": "steadyserve-webhooks",
            "x-steadyserve-event-id": event_id, "x-steadyserve-event": event,
            "x-steadyserve-timestamp": str(timestamp),
            "x-steadyserve-signature": f"{SIGNATURE_VERSION}={signature(secret, timestamp, body)}"}


def webhook_secret(config: Config) -> bytes:
    """[jobs] webhook_secret, else the secret file (under data_dir unless absolute), made
    with 64 random hex digits and mode 0600 the first time."""
    from ..auth.keyring import _write_private

    cfg = config.jobs
    if cfg.webhook_secret:
        return cfg.webhook_secret.encode()
    path = Path(cfg.webhook_secret_file)
    if not path.is_absolute():
        path = Path(config.data_dir) / path
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if _write_private(path, secrets.token_hex(32), replace=False):
            log.info("wrote a new webhook signing secret", extra={"path": str(path)})
        text = path.read_text().strip()  # ours, or another gateway's that won the race
    if len(text) < 16:
        raise ConfigError(f"the webhook secret in {path} is shorter than 16 characters; "
                          "delete the file to get a new one")
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)
    return text.encode()
