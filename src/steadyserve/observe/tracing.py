"""W3C Trace Context: accept `traceparent`/`tracestate`, start a new trace when the incoming
header is missing or invalid (the request still succeeds), and give every hop its own span:
the gateway's server span, then one child span per attempt (retries and hedges included),
whose id travels to the replica as the parent in a fresh `traceparent`."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
MAX_TRACESTATE = 512


def new_trace_id() -> str:
    return os.urandom(16).hex()


def new_span_id() -> str:
    return os.urandom(8).hex()


@dataclass(slots=True)
class Span:
    name: str
    span_id: str
    parent_id: str | None
    start_ns: int
    end_ns: int = 0
    attributes: dict[str, str | int | float | bool] = field(default_factory=dict)
    error: bool = False

    def end(self, *, error: bool = False) -> None:
        self.end_ns = time.time_ns()
        self.error = error


@dataclass(slots=True)
class TraceContext:
    trace_id: str
    parent_id: str | None  # the caller's span, when the request came with a valid traceparent
    sampled: bool
    tracestate: str | None = None
    spans: list[Span] = field(default_factory=list)

    def start(self, name: str, parent_id: str | None) -> Span:
        span = Span(name, new_span_id(), parent_id, time.time_ns())
        self.spans.append(span)
        return span

    def header(self, span: Span) -> bytes:
        """The traceparent to send downstream, with `span` as the parent."""
        flags = "01" if self.sampled else "00"
        return f"00-{self.trace_id}-{span.span_id}-{flags}".encode()


def parse(traceparent: str | None, tracestate: str | None) -> TraceContext:
    """A context from the incoming headers; a new trace when they are absent or invalid."""
    if traceparent:
        m = _TRACEPARENT.fullmatch(traceparent.strip().lower())
        if m is not None:
            version, trace_id, parent_id, flags = m.groups()
            if version != "ff" and trace_id != _ZERO_TRACE and parent_id != _ZERO_SPAN:
                state = tracestate.strip() if tracestate else None
                if state is not None and (len(state) > MAX_TRACESTATE or not state.isprintable()):
                    state = None  # hostile or oversized: dropped, never echoed
                return TraceContext(trace_id, parent_id, bool(int(flags, 16) & 1), state)
    return TraceContext(new_trace_id(), None, True)
