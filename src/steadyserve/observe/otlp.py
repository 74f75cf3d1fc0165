"""Export finished traces to an OpenTelemetry collector over OTLP/HTTP (JSON encoding).

Hand-written because the OpenTelemetry SDK costs ~30 MB of imports and a span processor per
request on the gateway's hot path; traces here are already finished objects, so exporting
is one JSON document per batch (`POST {endpoint}/v1/traces`). Bounded queue: when the
collector is slow or down, the oldest traces are dropped and counted — never the requests.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

import orjson

from .tracing import TraceContext

log = logging.getLogger("steadyserve.otlp")


def otlp_json(traces: list[TraceContext], service_name: str) -> bytes:
    spans: list[dict[str, Any]] = []
    for trace in traces:
        for s in trace.spans:
            if not s.end_ns:
                continue
            spans.append({
                "traceId": trace.trace_id,
                "spanId": s.span_id,
                **({"parentSpanId": s.parent_id} if s.parent_id else {}),
                "name": s.name,
                "kind": 2 if s.name == "gateway" else 3,  # SERVER, CLIENT
                "startTimeUnixNano": str(s.start_ns),
                "endTimeUnixNano": str(s.end_ns),
                "attributes": [
                    {"key": k, "value": _value(v)} for k, v in s.attributes.items()
                ],
                "status": {"code": 2 if s.error else 1},
            })
    return orjson.dumps({
        "resourceSpans": [{
            "resource": {"attributes": [
                {"key": "service.name", "value": {"stringValue": service_name}}]},
            "scopeSpans": [{"scope": {"name": "steadyserve"}, "spans": spans}],
        }]
    })


def _value(v: str | int | float | bool) -> dict[str, Any]:
    if isinstance(v, bool):
        return {"boolValue": v}
    if isinstance(v, int):
        return {"intValue": str(v)}
    if isinstance(v, float):
        return {"doubleValue": v}
    return {"stringValue": str(v)}


class OtlpExporter:
    def __init__(self, endpoint: str, service_name: str, *, max_queue: int = 10_000,
                 batch: int = 512, interval_s: float = 2.0) -> None:
        self.url = endpoint.rstrip("/") + "/v1/traces"
        self.service_name = service_name
        self.queue: deque[TraceContext] = deque(maxlen=max_queue)
        self.batch = batch
        self.interval_s = interval_s
        self.exported = 0
        self.failed = 0

    def submit(self, trace: TraceContext) -> None:
        if trace.sampled:
            self.queue.append(trace)  # deque(maxlen): the oldest falls off when full

    async def run(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    await asyncio.sleep(self.interval_s)
                    while self.queue:
                        traces = [self.queue.popleft()
                                  for _ in range(min(self.batch, len(self.queue)))]
                        body = otlp_json(traces, self.service_name)
                        async with session.post(self.url, data=body, timeout=aiohttp.ClientTimeout(
                                total=5), headers={"content-type": "application/json"}) as r:
                            if r.status >= 300:
                                raise RuntimeError(f"collector answered {r.status}")
                        self.exported += len(traces)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # never die: count, log, try again next interval
                    self.failed += 1
                    log.warning("trace export failed: %s", exc)
