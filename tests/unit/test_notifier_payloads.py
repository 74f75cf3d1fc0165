"""observe/notifiers.py: the pure payload builders (Alertmanager webhook v4 and API v2 shapes)."""

from __future__ import annotations

from datetime import datetime

import pytest

from steadyserve.observe.notifiers import (
    ZERO_TIME,
    alert_status,
    alertmanager_payload,
    common_pairs,
    group_status,
    rfc3339,
    webhook_payload,
)

T0 = 1_714_564_800.0  # 2024-05-01T12:00:00Z
EXTERNAL = "http://gw.example:8000"


def alert(status="firing", *, labels=None, annotations=None, starts_at=T0, ends_at=None,
          fingerprint="fp1", value=0.5):
    return {
        "labels": {"alertname": "HighErrorRate", "deployment": "embed", "severity": "page"}
        if labels is None else labels,
        "annotations": {"summary": "errors above 5%"} if annotations is None else annotations,
        "status": status,
        "starts_at": starts_at,
        "ends_at": ends_at,
        "fingerprint": fingerprint,
        "value": value,
    }


def notification(*alerts, status="firing"):
    return {
        "group_key": '{}:{alertname="HighErrorRate"}',
        "group_labels": {"alertname": "HighErrorRate"},
        "status": status,
        "alerts": list(alerts),
    }


# ---- timestamps ----

@pytest.mark.parametrize(
    ("epoch", "expected"),
    [
        pytest.param(0.0, "1970-01-01T00:00:00.000Z", id="epoch"),
        pytest.param(T0, "2024-05-01T12:00:00.000Z", id="whole-second"),
        pytest.param(T0 + 0.25, "2024-05-01T12:00:00.250Z", id="millis"),
        pytest.param(1_714_564_800, "2024-05-01T12:00:00.000Z", id="int-input"),
    ],
)
def test_rfc3339(epoch, expected):
    assert rfc3339(epoch) == expected


def test_rfc3339_parses_back_to_the_same_instant():
    stamp = rfc3339(T0 + 12.345)
    parsed = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert parsed.timestamp() == pytest.approx(T0 + 12.345, abs=1e-3)


# ---- status mapping ----

@pytest.mark.parametrize(
    ("status", "ends_at", "expected"),
    [
        ("firing", None, "firing"),
        ("FIRING", None, "firing"),
        ("firing", T0 + 60, "firing"),  # an explicit status wins over an end time
        ("resolved", T0 + 60, "resolved"),
        ("resolved", None, "resolved"),
        ("inactive", T0 + 60, "resolved"),
        ("ok", None, "resolved"),
        ("pending", None, "firing"),  # unknown word, no end: still firing
        ("weird", T0 + 60, "resolved"),  # unknown word with an end: resolved
    ],
)
def test_alert_status(status, ends_at, expected):
    assert alert_status(alert(status, ends_at=ends_at)) == expected


@pytest.mark.parametrize(
    ("statuses", "declared", "expected"),
    [
        (["firing"], "firing", "firing"),
        (["resolved"], "resolved", "resolved"),
        (["firing", "resolved"], "resolved", "firing"),  # any firing alert: the group fires
        (["resolved", "resolved"], "firing", "resolved"),
        ([], "firing", "firing"),  # no alerts: keep what the notification says
        ([], "resolved", "resolved"),
    ],
)
def test_group_status(statuses, declared, expected):
    n = notification(*[alert(s, ends_at=T0 + 1 if s == "resolved" else None, fingerprint=f"f{i}")
                       for i, s in enumerate(statuses)], status=declared)
    assert group_status(n) == expected
    assert webhook_payload(n, EXTERNAL)["status"] == expected


# ---- common labels ----

@pytest.mark.parametrize(
    ("maps", "expected"),
    [
        ([], {}),
        ([{"a": "1", "b": "2"}], {"a": "1", "b": "2"}),
        ([{"a": "1", "b": "2"}, {"a": "1", "b": "3"}], {"a": "1"}),  # same key, other value
        ([{"a": "1", "b": "2"}, {"a": "1"}], {"a": "1"}),  # key missing in one
        ([{"a": "1"}, {"b": "2"}], {}),
        ([{"a": "1", "c": "x"}, {"a": "1", "c": "x"}, {"a": "2", "c": "x"}], {"c": "x"}),
    ],
)
def test_common_pairs_is_the_intersection(maps, expected):
    assert common_pairs(maps) == expected


# ---- webhook body ----

def test_webhook_payload_firing_shape():
    n = notification(alert())
    body = webhook_payload(n, EXTERNAL)
    assert body == {
        "version": "4",
        "groupKey": '{}:{alertname="HighErrorRate"}',
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": "steadyserve",
        "groupLabels": {"alertname": "HighErrorRate"},
        "commonLabels": {"alertname": "HighErrorRate", "deployment": "embed", "severity": "page"},
        "commonAnnotations": {"summary": "errors above 5%"},
        "externalURL": EXTERNAL,
        "alerts": [{
            "status": "firing",
            "labels": {"alertname": "HighErrorRate", "deployment": "embed", "severity": "page"},
            "annotations": {"summary": "errors above 5%"},
            "startsAt": "2024-05-01T12:00:00.000Z",
            "endsAt": ZERO_TIME,
            "generatorURL": EXTERNAL,
            "fingerprint": "fp1",
        }],
    }
    assert ZERO_TIME == "0001-01-01T00:00:00Z"


def test_webhook_payload_resolved_carries_ends_at():
    body = webhook_payload(notification(alert("resolved", ends_at=T0 + 90.5), status="resolved"),
                           EXTERNAL)
    assert body["status"] == "resolved"
    (a,) = body["alerts"]
    assert a["status"] == "resolved"
    assert a["endsAt"] == "2024-05-01T12:01:30.500Z"


def test_webhook_payload_firing_ignores_a_stale_ends_at():
    (a,) = webhook_payload(notification(alert("firing", ends_at=T0 + 5)), EXTERNAL)["alerts"]
    assert a["endsAt"] == ZERO_TIME


def test_webhook_common_labels_and_annotations_across_alerts():
    a1 = alert(labels={"alertname": "HighErrorRate", "deployment": "embed", "replica": "r1"},
               annotations={"summary": "s", "runbook": "x"}, fingerprint="f1")
    a2 = alert(labels={"alertname": "HighErrorRate", "deployment": "embed", "replica": "r2"},
               annotations={"summary": "s", "runbook": "y"}, fingerprint="f2")
    body = webhook_payload(notification(a1, a2), EXTERNAL)
    assert body["commonLabels"] == {"alertname": "HighErrorRate", "deployment": "embed"}
    assert body["commonAnnotations"] == {"summary": "s"}
    assert [a["fingerprint"] for a in body["alerts"]] == ["f1", "f2"]


def test_webhook_values_are_strings():
    a = alert(labels={"alertname": "X", "code": 503}, annotations={"value": 0.25})
    (out,) = webhook_payload(notification(a), EXTERNAL)["alerts"]
    assert out["labels"] == {"alertname": "X", "code": "503"}
    assert out["annotations"] == {"value": "0.25"}


def test_webhook_payload_does_not_mutate_its_input():
    n = notification(alert())
    before = repr(n)
    webhook_payload(n, EXTERNAL)
    alertmanager_payload(n, EXTERNAL)
    assert repr(n) == before


# ---- Alertmanager API v2 body ----

def test_alertmanager_payload_firing_has_no_ends_at():
    body = alertmanager_payload(notification(alert()), EXTERNAL + "/alerts")
    assert body == [{
        "labels": {"alertname": "HighErrorRate", "deployment": "embed", "severity": "page"},
        "annotations": {"summary": "errors above 5%"},
        "startsAt": "2024-05-01T12:00:00.000Z",
        "generatorURL": EXTERNAL + "/alerts",
    }]


def test_alertmanager_payload_resolved_has_ends_at():
    (a,) = alertmanager_payload(
        notification(alert("resolved", ends_at=T0 + 60), status="resolved"), EXTERNAL)
    assert a["endsAt"] == "2024-05-01T12:01:00.000Z"
    assert set(a) == {"labels", "annotations", "startsAt", "endsAt", "generatorURL"}


def test_alertmanager_payload_never_ends_before_it_starts():
    # Alertmanager rejects endsAt < startsAt; clock skew must not make us send that
    (a,) = alertmanager_payload(notification(alert("resolved", ends_at=T0 - 3)), EXTERNAL)
    assert a["endsAt"] == a["startsAt"]


def test_alertmanager_payload_one_item_per_alert():
    n = notification(alert(fingerprint="a"), alert("resolved", ends_at=T0 + 1, fingerprint="b"))
    body = alertmanager_payload(n, EXTERNAL)
    assert len(body) == 2
    assert "endsAt" not in body[0] and "endsAt" in body[1]


def test_empty_notification():
    assert alertmanager_payload(notification(), EXTERNAL) == []
    body = webhook_payload(notification(), EXTERNAL)
    assert body["alerts"] == [] and body["commonLabels"] == {} and body["commonAnnotations"] == {}
