"""observe/otlp.py: finished traces become one OTLP/HTTP JSON document."""

from __future__ import annotations

import orjson

from steadyserve.observe.otlp import OtlpExporter, otlp_json
from steadyserve.observe.tracing import parse


def test_spans_are_exported_with_their_parents_and_attributes():
    trace = parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None)
    server = trace.start("gateway", trace.parent_id)
    attempt = trace.start("attempt", server.span_id)
    attempt.attributes.update({"replica": "a-0", "attempt": 1})
    attempt.end(error=True)
    server.end()
    trace.start("unfinished", server.span_id)  # never ended: not exported
    doc = orjson.loads(otlp_json([trace], "svc"))
    resource = doc["resourceSpans"][0]
    assert resource["resource"]["attributes"][0] == {
        "key": "service.name", "value": {"stringValue": "svc"}}
    spans = {s["name"]: s for s in resource["scopeSpans"][0]["spans"]}
    assert set(spans) == {"gateway", "attempt"}
    assert spans["gateway"]["parentSpanId"] == "00f067aa0ba902b7"
    assert spans["attempt"]["parentSpanId"] == server.span_id
    assert spans["attempt"]["status"] == {"code": 2}
    assert {"key": "attempt", "value": {"intValue": "1"}} in spans["attempt"]["attributes"]
    assert all(s["traceId"] == "4bf92f3577b34da6a3ce929d0e0e4736" for s in spans.values())


def test_the_queue_is_bounded_and_skips_unsampled_traces():
    exporter = OtlpExporter("http://127.0.0.1:4318", "svc", max_queue=3)
    for _ in range(5):
        exporter.submit(parse(None, None))
    exporter.submit(parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", None))
    assert len(exporter.queue) == 3
    assert exporter.url == "http://127.0.0.1:4318/v1/traces"
