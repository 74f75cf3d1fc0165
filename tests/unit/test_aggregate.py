"""observe/aggregate.py: merging replicas' Prometheus text into one exposition."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from steadyserve.observe.aggregate import MAX_REPLICA_METRICS_BYTES, merge_replica_metrics


def replica_text(requests: int, latencies: list[float]) -> str:
    registry = CollectorRegistry()
    counter = Counter("replica_requests", "Requests handled", ["handler", "status"], registry=registry)
    hist = Histogram("replica_batch_seconds", "Batch compute time", buckets=(0.01, 0.1, 1.0),
                     registry=registry)
    counter.labels("embed", "2xx").inc(requests)
    for s in latencies:
        hist.observe(s)
    return generate_latest(registry).decode()


TEXTS = {
    ("minilm", "minilm-0"): replica_text(3, [0.005, 0.05]),
    ("minilm", "minilm-1"): replica_text(5, [0.5]),
}


def families(data: bytes):
    return {f.name: f for f in text_string_to_metric_families(data.decode())}


def type_names(text: str) -> list[str]:
    return [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]


def test_one_type_line_per_family():
    merged = type_names(merge_replica_metrics(TEXTS).decode())
    single = type_names(TEXTS[("minilm", "minilm-0")])
    assert len(merged) == len(set(merged))
    assert sorted(merged) == sorted(single)
    assert {"replica_requests_total", "replica_batch_seconds"} <= set(merged)


def test_output_parses_and_keeps_types():
    fams = families(merge_replica_metrics(TEXTS))
    assert fams["replica_requests"].type == "counter"
    assert fams["replica_batch_seconds"].type == "histogram"
    assert fams["replica_requests"].documentation == "Requests handled"


def test_samples_carry_deployment_and_replica_labels():
    fams = families(merge_replica_metrics(TEXTS))
    totals = {
        s.labels["replica"]: s.value
        for s in fams["replica_requests"].samples if s.name == "replica_requests_total"
    }
    assert totals == {"minilm-0": 3.0, "minilm-1": 5.0}
    for fam in fams.values():
        for s in fam.samples:
            assert s.labels["deployment"] == "minilm"
            assert s.labels["replica"] in {"minilm-0", "minilm-1"}


def test_original_labels_are_kept():
    fams = families(merge_replica_metrics(TEXTS))
    s = next(s for s in fams["replica_requests"].samples if s.name == "replica_requests_total")
    assert (s.labels["handler"], s.labels["status"]) == ("embed", "2xx")


@pytest.mark.parametrize(
    ("replica", "le", "count"),
    [
        pytest.param("minilm-0", "0.01", 1.0, id="r0-fast-bucket"),
        pytest.param("minilm-0", "0.1", 2.0, id="r0-mid-bucket"),
        pytest.param("minilm-1", "0.1", 0.0, id="r1-mid-bucket"),
        pytest.param("minilm-1", "1.0", 1.0, id="r1-slow-bucket"),
        pytest.param("minilm-1", "+Inf", 1.0, id="r1-inf-bucket"),
    ],
)
def test_histogram_buckets_are_kept_per_replica(replica, le, count):
    fams = families(merge_replica_metrics(TEXTS))
    buckets = {
        (s.labels["replica"], s.labels["le"]): s.value
        for s in fams["replica_batch_seconds"].samples if s.name == "replica_batch_seconds_bucket"
    }
    assert buckets[(replica, le)] == count


def test_replicas_of_different_deployments():
    texts = {("a", "a-0"): replica_text(1, []), ("b", "b-0"): replica_text(2, [])}
    fams = families(merge_replica_metrics(texts))
    totals = {
        (s.labels["deployment"], s.labels["replica"]): s.value
        for s in fams["replica_requests"].samples if s.name == "replica_requests_total"
    }
    assert totals == {("a", "a-0"): 1.0, ("b", "b-0"): 2.0}


def test_replica_label_overrides_a_clashing_sample_label():
    text = '# TYPE up gauge\nup{replica="wrong",deployment="wrong"} 1\n'
    fams = families(merge_replica_metrics({("d", "d-0"): text}))
    (sample,) = fams["up"].samples
    assert sample.labels == {"deployment": "d", "replica": "d-0"}


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param("garbage", id="word"),
        pytest.param("<html>502 Bad Gateway</html>", id="html"),
        pytest.param('# TYPE x counter\nx{a="b} 1', id="unterminated-label"),
        pytest.param('x{a="b"} notanumber', id="bad-value"),
    ],
)
def test_garbage_from_one_replica_is_skipped(garbage):
    texts = {**TEXTS, ("minilm", "minilm-2"): garbage}
    fams = families(merge_replica_metrics(texts))
    replicas = {s.labels["replica"] for f in fams.values() for s in f.samples}
    assert replicas == {"minilm-0", "minilm-1"}


@pytest.mark.parametrize(
    "texts",
    [
        pytest.param({}, id="no-replicas"),
        pytest.param({("d", "d-0"): "garbage"}, id="only-garbage"),
        pytest.param({("d", "d-0"): ""}, id="empty-text"),
    ],
)
def test_nothing_to_merge_is_empty_bytes(texts):
    assert merge_replica_metrics(texts) == b""


def test_merge_is_independent_of_input_order():
    forward = merge_replica_metrics(TEXTS)
    backward = merge_replica_metrics(dict(reversed(list(TEXTS.items()))))
    assert forward == backward


def test_bytes_are_decoded_and_a_body_over_the_cap_or_not_utf8_is_left_out():
    texts = {
        ("d", "d-0"): TEXTS[("minilm", "minilm-0")].encode(),
        ("d", "d-1"): b"replica_requests_total 1\n\xff\xfe",
        ("d", "d-2"): b"replica_junk 1\n" * (MAX_REPLICA_METRICS_BYTES // 15 + 1),
    }
    fams = families(merge_replica_metrics(texts))
    assert {s.labels["replica"] for f in fams.values() for s in f.samples} == {"d-0"}
    assert "replica_junk" not in fams
