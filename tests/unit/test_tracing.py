"""observe/tracing.py: W3C traceparent parsing and child headers."""

from __future__ import annotations

import pytest

from steadyserve.observe.tracing import parse

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@pytest.mark.parametrize(
    ("header", "kept", "sampled"),
    [
        (f"00-{TRACE}-{PARENT}-01", True, True),
        (f"00-{TRACE}-{PARENT}-00", True, False),
        (f"  00-{TRACE.upper()}-{PARENT}-01 ", True, True),
        (f"01-{TRACE}-{PARENT}-01", True, True),  # a future version with the same layout
        (f"ff-{TRACE}-{PARENT}-01", False, True),  # version ff is invalid
        (f"00-{'0' * 32}-{PARENT}-01", False, True),  # all-zero trace id
        (f"00-{TRACE}-{'0' * 16}-01", False, True),  # all-zero parent id
        (f"00-{TRACE[:-1]}-{PARENT}-01", False, True),
        (f"00-{TRACE}-{PARENT}-01-extra", False, True),
        ("garbage", False, True),
        ("", False, True),
        (None, False, True),
    ],
    ids=["valid", "unsampled", "spaces-and-case", "future-version", "version-ff", "zero-trace",
         "zero-parent", "short-trace", "trailing", "garbage", "empty", "missing"],
)
def test_parse_keeps_valid_contexts_and_starts_new_traces_otherwise(header, kept, sampled):
    ctx = parse(header, None)
    assert (ctx.trace_id == TRACE) is kept
    assert (ctx.parent_id == PARENT) is kept
    assert ctx.sampled is sampled
    assert len(ctx.trace_id) == 32 and ctx.trace_id != "0" * 32


def test_child_headers_carry_the_trace_and_a_new_parent_per_span():
    ctx = parse(f"00-{TRACE}-{PARENT}-01", "vendor=abc")
    first, second = ctx.start("attempt", PARENT), ctx.start("attempt", PARENT)
    h1, h2 = ctx.header(first).decode(), ctx.header(second).decode()
    assert h1.startswith(f"00-{TRACE}-") and h1.endswith("-01")
    assert h1.split("-")[2] == first.span_id != second.span_id == h2.split("-")[2]
    assert ctx.tracestate == "vendor=abc"


@pytest.mark.parametrize("state", ["x" * 600, "a=b\nc=d"], ids=["oversized", "control-chars"])
def test_hostile_tracestate_is_dropped(state):
    assert parse(f"00-{TRACE}-{PARENT}-01", state).tracestate is None
