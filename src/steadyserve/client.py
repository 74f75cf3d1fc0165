"""A client for steadyserve gateways: `Client` (sync) and `AsyncClient`, one logic for both.

    from steadyserve.client import Client
    with Client("http://127.0.0.1:8000", api_key="ss_...") as c:
        result = c.invoke("risk", "score", transactions=[{...}])
        vectors = c.embed(["hello world"], model="minilm").vectors   # float32 [N, 384]

Every call has a request id (`X-Request-ID`, the same on every attempt, so the gateway's
logs tie them together) and a deadline (`timeout_s`): the remaining time travels as
`X-Request-Timeout-Ms`, so the gateway gives up when the caller does, and no attempt or wait
runs past it. Retries follow `should_retry` (a pure table below), honour `Retry-After`, and
never send a non-idempotent call twice unless the gateway said it never started it.

The exchange is written once, as a generator that yields what to do (send this request,
sleep this long) and is sent back what happened; `Client` and `AsyncClient` only drive it
with their own transport and sleep (the "sans-IO" shape of h11 and httpx's core).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import time
import uuid
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import numpy as np
import orjson

# 4xx/5xx codes the gateway answers before a handler runs: safe to send again, whatever
# the handler does (admission shed, rate limit, no replica yet, a scale-up that failed)
NOT_STARTED = frozenset({"overloaded", "rate_limited", "no_ready_replica", "activation_failed"})
RETRY_STATUSES = frozenset({502, 503, 504})
DEFAULT_TIMEOUT_S = 30.0
MAX_BACKOFF_S = 5.0
ANSWER_GRACE_S = 0.5
FINAL_JOB_STATES = frozenset({"succeeded", "failed", "dead", "cancelled", "expired"})
WEBHOOK_TOLERANCE_S = 300.0

T = TypeVar("T")


class SteadyserveError(Exception):
    """The gateway refused or failed the call (status, its error code and message), or no
    answer came (status 0)."""

    def __init__(self, status: int, code: str, message: str, request_id: str,
                 retry_after_s: float | None = None, attempts: int = 1) -> None:
        super().__init__(f"{status} {code}: {message} (request {request_id})")
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        self.retry_after_s = retry_after_s
        self.attempts = attempts


@dataclass(frozen=True, slots=True)
class Result:
    """A handler's answer and how it came."""

    value: Any
    request_id: str
    attempts: int
    cache: str | None = None  # the gateway's X-Steadyserve-Cache: hit, miss, stale, ...
    version: str | None = None  # the model version that answered


@dataclass(frozen=True, slots=True)
class Embeddings:
    vectors: np.ndarray  # float32 [N, dim]
    tokens: int
    model: str
    request_id: str


@dataclass(frozen=True, slots=True)
class FeedbackReceipt:
    """A stored feedback item: its id, the answer it is about, and whether this call stored
    it (False: an earlier attempt of the same submission already had)."""

    id: str
    request_id: str
    stored: bool


# --- the policy (pure) -----------------------------------------------------------------------------
def should_retry(*, status: int | None, code: str | None, sent: bool, idempotent: bool,
                 attempt: int, max_attempts: int, retry_after_s: float | None,
                 remaining_s: float) -> float | None:
    """Seconds to wait before the next attempt, or None to stop.

        what happened                                   idempotent   not idempotent
        connection refused / failed before sending       retry        retry
        gateway: not started (NOT_STARTED codes)         retry        retry
        sent, then no answer (reset, timeout)            retry        stop
        502 / 503 / 504 with another code                retry        stop
        any other answer                                 stop         stop

    The wait is Retry-After when given, else 0.1 s doubling (at most MAX_BACKOFF_S); none
    is taken that would end past the deadline, and none after max_attempts."""
    if attempt >= max_attempts:
        return None
    if status is None:
        ok = idempotent or not sent
    elif code in NOT_STARTED:
        ok = True
    else:
        ok = idempotent and status in RETRY_STATUSES
    if not ok:
        return None
    wait = retry_after_s if retry_after_s is not None else min(MAX_BACKOFF_S,
                                                                0.1 * 2 ** (attempt - 1))
    return wait if wait < remaining_s else None


def verify_webhook(secret: str | bytes, body: bytes, headers: Mapping[str, str], *,
                   now: float | None = None, tolerance_s: float = WEBHOOK_TOLERANCE_S) -> bool:
    """Whether a job webhook came from a gateway holding `secret` ([jobs] webhook_secret,
    or the data directory's webhook.secret): X-Steadyserve-Signature is "v1=" and the
    HMAC-SHA256 of "<X-Steadyserve-Timestamp>.<body>", and the timestamp is within
    `tolerance_s` of `now` (a replayed old delivery fails). `headers` as any mapping; names
    are matched case-insensitively. De-duplicate by X-Steadyserve-Event-Id (the job id):
    delivery is at least once."""
    lower = {k.lower(): v for k, v in headers.items()}
    stamp, given = lower.get("x-steadyserve-timestamp", ""), lower.get("x-steadyserve-signature", "")
    if not stamp.isdigit() or not given.startswith("v1="):
        return False
    if abs((time.time() if now is None else now) - int(stamp)) > tolerance_s:
        return False
    key = secret.encode() if isinstance(secret, str) else secret
    expected = hmac.new(key, stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, given[3:])


# --- the exchange, once ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Send:
    method: str
    path: str
    body: bytes | None
    headers: dict[str, str]
    timeout_s: float


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


@dataclass(slots=True)
class Outcome:
    """What the driver saw: a response, or the error that stopped it and whether the
    request had gone out."""

    response: httpx.Response | None = None
    error: str = ""
    sent: bool = False


Step = Send | Sleep


@dataclass
class _Options:
    base_url: str
    api_key: str | None
    timeout_s: float
    max_attempts: int
    clock: Callable[[], float] = time.monotonic
    headers: dict[str, str] = field(default_factory=dict)


def exchange(opts: _Options, method: str, path: str, payload: Any, *, idempotent: bool,
             timeout_s: float | None, parse: Callable[[httpx.Response, str, int], T],
             priority: str | None = None,
             headers: Mapping[str, str] | None = None) -> Generator[Step, Outcome | None, T]:
    request_id = uuid.uuid4().hex[:24]
    budget = timeout_s if timeout_s is not None else opts.timeout_s
    deadline = opts.clock() + budget
    body = None if payload is None else orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    attempt = 0
    while True:
        attempt += 1
        remaining = deadline - opts.clock()
        if remaining <= 0:
            raise SteadyserveError(0, "deadline_exceeded", f"no answer within {budget:g}s",
                                   request_id, attempts=attempt - 1)
        sent = {**opts.headers, **(headers or {}), "x-request-id": request_id,
                "x-request-timeout-ms": str(max(1, math.floor(remaining * 1000)))}
        if body is not None:
            sent["content-type"] = "application/json"
        if opts.api_key:
            sent["authorization"] = f"Bearer {opts.api_key}"
        if priority:
            sent["x-priority"] = priority
        # the socket waits a little past the deadline the gateway was told: its 504 (which
        # says the deadline ran out, with the request id) arrives instead of a local timeout
        outcome = yield Send(method, path, body, sent, remaining + ANSWER_GRACE_S)
        assert outcome is not None
        response = outcome.response
        if response is not None and response.status_code < 400:
            return parse(response, request_id, attempt)
        status, code, message, retry_after = _failure(outcome)
        wait = should_retry(status=status, code=code, sent=outcome.sent, idempotent=idempotent,
                            attempt=attempt, max_attempts=opts.max_attempts,
                            retry_after_s=retry_after,
                            remaining_s=deadline - opts.clock())
        if wait is None:
            raise SteadyserveError(status or 0, code or "no_answer", message, request_id,
                                   retry_after, attempt)
        if wait > 0:
            yield Sleep(wait)


def _failure(outcome: Outcome) -> tuple[int | None, str | None, str, float | None]:
    r = outcome.response
    if r is None:
        return None, None, outcome.error, None
    retry_after = None
    raw = r.headers.get("retry-after")
    if raw is not None:
        try:
            retry_after = max(0.0, float(raw))
        except ValueError:
            retry_after = None
    try:
        err = r.json().get("error")
    except (ValueError, AttributeError):
        err = None
    if isinstance(err, dict):
        return r.status_code, str(err.get("code")), str(err.get("message")), retry_after
    if isinstance(err, str):  # the Open Inference Protocol's shape
        return r.status_code, None, err, retry_after
    return r.status_code, None, r.text[:500], retry_after


def _json_result(response: httpx.Response, request_id: str, attempts: int) -> Result:
    return Result(orjson.loads(response.content), request_id, attempts,
                  response.headers.get("x-steadyserve-cache"),
                  response.headers.get("x-steadyserve-version"))


def _json(response: httpx.Response, request_id: str, attempts: int) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(response.content)
    return body


def _receipt(response: httpx.Response, request_id: str, attempts: int) -> FeedbackReceipt:
    body = orjson.loads(response.content)
    return FeedbackReceipt(str(body["id"]), str(body["request_id"]), bool(body["stored"]))


def _embeddings(model: str) -> Callable[[httpx.Response, str, int], Embeddings]:
    def parse(response: httpx.Response, request_id: str, attempts: int) -> Embeddings:
        body = orjson.loads(response.content)
        vectors = np.asarray([d["embedding"] for d in body["data"]], dtype=np.float32)
        return Embeddings(vectors, int(body["usage"]["prompt_tokens"]), model, request_id)
    return parse


class _Calls:
    """The calls both clients offer; each returns the exchange for a driver to run."""

    _opts: _Options

    def _invoke(self, deployment: str, handler: str, args: dict[str, Any], idempotent: bool,
                timeout_s: float | None, priority: str | None) -> Generator[Step, Any, Result]:
        return exchange(self._opts, "POST", f"/v1/deployments/{deployment}/{handler}", args,
                        idempotent=idempotent, timeout_s=timeout_s, parse=_json_result,
                        priority=priority)

    def _embed(self, texts: Sequence[str], model: str,
               timeout_s: float | None) -> Generator[Step, Any, Embeddings]:
        # an embedding is a pure function of its text: always safe to send again
        return exchange(self._opts, "POST", "/v1/embeddings",
                        {"model": model, "input": list(texts)}, idempotent=True,
                        timeout_s=timeout_s, parse=_embeddings(model))

    def _feedback(self, request_id: str, key: str, score: float | bool | None, value: Any,
                  correction: Any, comment: str,
                  timeout_s: float | None) -> Generator[Step, Any, FeedbackReceipt]:
        # the item's id is chosen here, so the gateway stores a retried submission once:
        # safe to send again
        payload: dict[str, Any] = {"request_id": request_id, "id": uuid.uuid4().hex,
                                   "key": key, "comment": comment}
        for name, given in (("score", score), ("value", value), ("correction", correction)):
            if given is not None:
                payload[name] = given
        return exchange(self._opts, "POST", "/v1/feedback", payload, idempotent=True,
                        timeout_s=timeout_s, parse=_receipt)

    def _get(self, path: str, timeout_s: float | None) -> Generator[Step, Any, Result]:
        return exchange(self._opts, "GET", path, None, idempotent=True, timeout_s=timeout_s,
                        parse=_json_result)

    def _submit_job(self, deployment: str, handler: str, args: dict[str, Any],
                    webhook_url: str | None, idempotency_key: str | None,
                    job_timeout_s: float | None,
                    timeout_s: float | None) -> Generator[Step, Any, dict[str, Any]]:
        # an idempotency key chosen here makes a retried submission the same job: safe to
        # send again
        headers = {"idempotency-key": idempotency_key or uuid.uuid4().hex}
        if webhook_url is not None:
            headers["x-webhook-url"] = webhook_url
        if job_timeout_s is not None:
            headers["x-job-timeout-s"] = repr(float(job_timeout_s))
        return exchange(self._opts, "POST", f"/v1/jobs/{deployment}/{handler}", args,
                        idempotent=True, timeout_s=timeout_s, parse=_json, headers=headers)

    def _job(self, method: str, job_id: str,
             timeout_s: float | None) -> Generator[Step, Any, dict[str, Any]]:
        # reading is safe to repeat, and so is cancelling (a cancelled job answers 200 again)
        return exchange(self._opts, method, f"/v1/jobs/{job_id}", None, idempotent=True,
                        timeout_s=timeout_s, parse=_json)


def _options(base_url: str, api_key: str | None, timeout_s: float, max_attempts: int,
             clock: Callable[[], float]) -> _Options:
    if max_attempts < 1 or timeout_s <= 0:
        raise ValueError("need max_attempts >= 1 and timeout_s > 0")
    return _Options(base_url.rstrip("/"), api_key, timeout_s, max_attempts, clock)


class Client(_Calls):
    """Synchronous client (httpx.Client: one keep-alive pool)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, max_attempts: int = 3,
                 transport: httpx.BaseTransport | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._opts = _options(base_url, api_key, timeout_s, max_attempts, clock)
        self._http = httpx.Client(base_url=self._opts.base_url, transport=transport)
        self._sleep = sleep

    def invoke(self, deployment: str, handler: str, *, idempotent: bool = False,
               timeout_s: float | None = None, priority: str | None = None,
               **args: Any) -> Result:
        """Call a handler with its parameters as keyword arguments."""
        return self._run(self._invoke(deployment, handler, args, idempotent, timeout_s, priority))

    def embed(self, texts: Sequence[str], *, model: str = "minilm",
              timeout_s: float | None = None) -> Embeddings:
        return self._run(self._embed(texts, model, timeout_s))

    def deployments(self, timeout_s: float | None = None) -> list[dict[str, Any]]:
        return list(self._run(self._get("/v1/deployments", timeout_s)).value["deployments"])

    def feedback(self, request_id: str, *, key: str = "rating",
                 score: float | bool | None = None, value: Any = None, correction: Any = None,
                 comment: str = "", timeout_s: float | None = None) -> FeedbackReceipt:
        """What the user thought of an answer (`Result.request_id`): e.g. `score=1` for a
        thumbs-up, or `key="label", correction="fraud"` for the right answer."""
        return self._run(self._feedback(request_id, key, score, value, correction, comment,
                                        timeout_s))

    def ready(self, timeout_s: float | None = None) -> bool:
        try:
            self._run(self._get("/readyz", timeout_s))
        except SteadyserveError:
            return False
        return True

    def submit_job(self, deployment: str, handler: str, *, webhook_url: str | None = None,
                   idempotency_key: str | None = None, job_timeout_s: float | None = None,
                   timeout_s: float | None = None, **args: Any) -> dict[str, Any]:
        """Queue a handler call (POST /v1/jobs/…): the job, with its `id`, once stored."""
        return self._run(self._submit_job(deployment, handler, args, webhook_url,
                                          idempotency_key, job_timeout_s, timeout_s))

    def job(self, job_id: str, timeout_s: float | None = None) -> dict[str, Any]:
        """A job: `state`, `result` or `error`, `timings`."""
        return self._run(self._job("GET", job_id, timeout_s))

    def cancel_job(self, job_id: str, timeout_s: float | None = None) -> dict[str, Any]:
        return self._run(self._job("DELETE", job_id, timeout_s))

    def wait_job(self, job_id: str, *, timeout_s: float = 300.0,
                 poll_s: float = 0.5) -> dict[str, Any]:
        """Poll until the job is final; SteadyserveError `deadline_exceeded` if not in time."""
        deadline = self._opts.clock() + timeout_s
        while True:
            job = self.job(job_id)
            if job["state"] in FINAL_JOB_STATES:
                return job
            if self._opts.clock() + poll_s > deadline:
                raise SteadyserveError(0, "deadline_exceeded", f"job {job_id} is still "
                                       f"{job['state']} after {timeout_s:g}s", job_id)
            self._sleep(poll_s)

    def _run(self, steps: Generator[Step, Any, T]) -> T:
        try:
            step = next(steps)
            while True:
                if isinstance(step, Sleep):
                    self._sleep(step.seconds)
                    step = steps.send(None)
                    continue
                step = steps.send(self._send(step))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    def _send(self, s: Send) -> Outcome:
        try:
            return Outcome(self._http.request(s.method, s.path, content=s.body, headers=s.headers,
                                              timeout=s.timeout_s))
        except httpx.ConnectError as exc:
            return Outcome(error=f"cannot connect: {exc}", sent=False)
        except httpx.TransportError as exc:
            return Outcome(error=f"{type(exc).__name__}: {exc}", sent=True)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Calls):
    """The same calls for asyncio (httpx.AsyncClient)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, max_attempts: int = 3,
                 transport: httpx.AsyncBaseTransport | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._opts = _options(base_url, api_key, timeout_s, max_attempts, clock)
        self._http = httpx.AsyncClient(base_url=self._opts.base_url, transport=transport)

    async def invoke(self, deployment: str, handler: str, *, idempotent: bool = False,
                     timeout_s: float | None = None, priority: str | None = None,
                     **args: Any) -> Result:
        return await self._run(self._invoke(deployment, handler, args, idempotent, timeout_s,
                                            priority))

    async def embed(self, texts: Sequence[str], *, model: str = "minilm",
                    timeout_s: float | None = None) -> Embeddings:
        return await self._run(self._embed(texts, model, timeout_s))

    async def deployments(self, timeout_s: float | None = None) -> list[dict[str, Any]]:
        return list((await self._run(self._get("/v1/deployments", timeout_s))).value[
            "deployments"])

    async def feedback(self, request_id: str, *, key: str = "rating",
                       score: float | bool | None = None, value: Any = None,
                       correction: Any = None, comment: str = "",
                       timeout_s: float | None = None) -> FeedbackReceipt:
        return await self._run(self._feedback(request_id, key, score, value, correction,
                                              comment, timeout_s))

    async def submit_job(self, deployment: str, handler: str, *,
                         webhook_url: str | None = None, idempotency_key: str | None = None,
                         job_timeout_s: float | None = None, timeout_s: float | None = None,
                         **args: Any) -> dict[str, Any]:
        return await self._run(self._submit_job(deployment, handler, args, webhook_url,
                                                idempotency_key, job_timeout_s, timeout_s))

    async def job(self, job_id: str, timeout_s: float | None = None) -> dict[str, Any]:
        return await self._run(self._job("GET", job_id, timeout_s))

    async def cancel_job(self, job_id: str, timeout_s: float | None = None) -> dict[str, Any]:
        return await self._run(self._job("DELETE", job_id, timeout_s))

    async def wait_job(self, job_id: str, *, timeout_s: float = 300.0,
                       poll_s: float = 0.5) -> dict[str, Any]:
        deadline = self._opts.clock() + timeout_s
        while True:
            job = await self.job(job_id)
            if job["state"] in FINAL_JOB_STATES:
                return job
            if self._opts.clock() + poll_s > deadline:
                raise SteadyserveError(0, "deadline_exceeded", f"job {job_id} is still "
                                       f"{job['state']} after {timeout_s:g}s", job_id)
            await asyncio.sleep(poll_s)

    async def _run(self, steps: Generator[Step, Any, T]) -> T:
        try:
            step = next(steps)
            while True:
                if isinstance(step, Sleep):
                    await asyncio.sleep(step.seconds)
                    step = steps.send(None)
                    continue
                step = steps.send(await self._send(step))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    async def _send(self, s: Send) -> Outcome:
        try:
            return Outcome(await self._http.request(s.method, s.path, content=s.body,
                                                    headers=s.headers, timeout=s.timeout_s))
        except httpx.ConnectError as exc:
            return Outcome(error=f"cannot connect: {exc}", sent=False)
        except httpx.TransportError as exc:
            return Outcome(error=f"{type(exc).__name__}: {exc}", sent=True)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
