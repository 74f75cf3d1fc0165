"""policies/alert_lifecycle.py: alert states and for_s, grouping and dedup, repeat, inhibition,
silences, persistence."""

from __future__ import annotations

import json

import pytest

from steadyserve.observe.timeseries import SeriesStore
from steadyserve.policies.alert_lifecycle import (
    AlertBook,
    Inhibit,
    Notification,
    NotifyPolicy,
    RuleSpec,
    Silence,
    Transition,
    alert_key,
    render,
)
from steadyserve.policies.alert_rules import Evaluation, Threshold, gauge

T0 = 100_000.0
ANN = {"summary": "{alertname} on {deployment}: {value}", "runbook": "https://runbooks/{alertname}"}
HOUR = 3_600.0


def ev(active: bool = True, value: float = 1.0, **labels: str) -> Evaluation:
    return Evaluation(labels=labels, active=active, value=value, description=f"value {value}")


def rule(name: str = "HighLatency", severity: str = "ticket", for_s: float = 0.0) -> RuleSpec:
    return RuleSpec(name=name, severity=severity, for_s=for_s, annotations=ANN)


# states and for_s ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("for_s", "steps", "want_states"),
    [
        pytest.param(0.0, [(0, True), (10, True), (20, False)], ["firing", "firing", "resolved"],
                     id="no-for-straight-to-firing"),
        pytest.param(60.0, [(0, True), (30, True), (60, True), (90, True)],
                     ["pending", "pending", "firing", "firing"], id="pending-then-firing-after-for"),
        pytest.param(60.0, [(0, True), (30, True), (45, False), (70, False)],
                     ["pending", "pending", None, None], id="blip-shorter-than-for-never-fires"),
        pytest.param(60.0, [(0, True), (50, False), (55, True), (100, True), (115, True)],
                     ["pending", None, "pending", "pending", "firing"], id="blip-restarts-the-wait"),
        pytest.param(0.0, [(0, True), (10, False), (20, True)], ["firing", "resolved", "firing"],
                     id="resolved-fires-again"),
        pytest.param(30.0, [(0, True), (30, True), (40, False), (50, True), (80, True)],
                     ["pending", "firing", "resolved", "pending", "firing"], id="new-episode-waits-again"),
    ],
)
def test_states_and_for_s(for_s, steps, want_states):
    book = AlertBook([rule(for_s=for_s)])
    got = []
    for dt, active in steps:
        book.step({"HighLatency": [ev(active, deployment="a")]}, T0 + dt)
        alert = book.get('HighLatency{deployment="a",severity="ticket"}')
        got.append(alert.state if alert else None)
    assert got == want_states


def test_transitions_are_recorded_for_every_change():
    book = AlertBook([rule(for_s=30.0)])
    seen = []
    for dt, active in [(0, True), (10, False), (20, True), (50, True), (60, True), (70, False)]:
        seen += [(t.from_state, t.to_state, t.at - T0) for t in
                 book.step({"HighLatency": [ev(active, deployment="a")]}, T0 + dt).transitions]
    assert seen == [("inactive", "pending", 0), ("pending", "inactive", 10), ("inactive", "pending", 20),
                    ("pending", "firing", 50), ("firing", "resolved", 70)]


def test_threshold_for_s_through_the_lifecycle():
    store = SeriesStore()
    threshold = Threshold(name="QueueDeep", expr=gauge("queue"), threshold=100.0, for_s=60.0,
                          annotations=ANN)
    book = AlertBook([threshold])
    firing_at = []

    def run(start: int, end: int, depth_at) -> None:
        for s in range(start, end):
            store.record("queue", {"deployment": "a"}, depth_at(s), T0 + s)
            result = book.step({threshold.name: threshold.evaluate(store, T0 + s)}, T0 + s)
            firing_at.extend(s for t in result.transitions if t.to_state == "firing")

    run(0, 100, lambda s: 500.0 if 20 <= s < 70 else 10.0)  # a 50 s blip
    assert firing_at == []
    run(100, 300, lambda s: 500.0 if s >= 150 else 10.0)  # sustained from 150
    assert firing_at == [210]


def test_a_label_set_no_longer_evaluated_counts_as_inactive():
    book = AlertBook([rule()])
    book.step({"HighLatency": [ev(deployment="a"), ev(deployment="b")]}, T0)
    result = book.step({"HighLatency": [ev(deployment="b")]}, T0 + 10)
    assert [(t.alert_key, t.to_state) for t in result.transitions] == [
        ('HighLatency{deployment="a",severity="ticket"}', "resolved")]


def test_a_rule_not_evaluated_this_step_keeps_its_alerts():
    book = AlertBook([rule("A"), rule("B")])
    book.step({"A": [ev(deployment="x")], "B": [ev(deployment="x")]}, T0)
    book.step({"B": []}, T0 + 10)
    assert [a.state for a in book.alerts()] == ["firing", "resolved"]


def test_unknown_rule_raises_and_removed_rule_resolves():
    book = AlertBook([rule("A")])
    with pytest.raises(ValueError, match="Nope"):
        book.step({"Nope": []}, T0)
    book.step({"A": [ev(deployment="x")]}, T0)
    book.set_rules([])
    result = book.step({}, T0 + 10)
    assert [t.to_state for t in result.transitions] == ["resolved"]


def test_resolved_alerts_are_kept_for_display_then_dropped():
    book = AlertBook([rule()], NotifyPolicy(keep_resolved_s=HOUR))
    book.step({"HighLatency": [ev(deployment="a")]}, T0)
    book.step({"HighLatency": []}, T0 + 10)
    book.step({"HighLatency": []}, T0 + 10 + HOUR - 1)
    assert [a.state for a in book.alerts()] == ["resolved"]
    book.step({"HighLatency": []}, T0 + 10 + HOUR)
    assert book.alerts() == []


def test_labels_and_annotations():
    r = RuleSpec(name="HighLatency", severity="page", labels={"team": "ml"}, annotations=ANN)
    book = AlertBook([r])
    book.step({"HighLatency": [ev(value=0.25, deployment="a", severity="ticket")]}, T0)
    [a] = book.alerts()
    # evaluation labels override the rule's severity (burn-rate rules emit both)
    assert a.labels == {"alertname": "HighLatency", "severity": "ticket", "team": "ml", "deployment": "a"}
    assert a.key == 'HighLatency{deployment="a",severity="ticket",team="ml"}' == alert_key(a.labels)
    assert a.annotations == {"summary": "HighLatency on a: 0.25", "runbook": "https://runbooks/HighLatency"}


@pytest.mark.parametrize(
    ("template", "want"),
    [("{deployment} is slow", "a is slow"), ("{missing} stays", "{missing} stays"), ("{0} bad", "{0} bad"),
     ("value {value}", "value 1.5"), ("unbalanced {", "unbalanced {")],
)
def test_render(template, want):
    assert render(template, {"deployment": "a"}, 1.5) == want


# grouping, dedup, repeat ---------------------------------------------------------------------


def replicas(n: int, active: bool = True, deployment: str = "a") -> list[Evaluation]:
    return [ev(active, deployment=deployment, replica=f"r{i}") for i in range(n)]


def test_fifty_similar_alerts_make_one_notification_and_repeat_only_after_the_interval():
    book = AlertBook([rule("ReplicaSlow")], NotifyPolicy(repeat_interval_s=4 * HOUR))
    first = book.step({"ReplicaSlow": replicas(50)}, T0)
    assert len(first.transitions) == 50
    [note] = first.notifications
    assert (note.reason, note.status, len(note.firing)) == ("new", "firing", 50)
    assert note.group_labels == {"alertname": "ReplicaSlow", "deployment": "a"}
    sent = []
    for dt in [*range(600, int(4 * HOUR), 600), 4 * HOUR - 1, 4 * HOUR, 4 * HOUR + 600]:
        result = book.step({"ReplicaSlow": replicas(50)}, T0 + dt)
        sent += [(n.reason, n.at - T0) for n in result.notifications]
    assert sent == [("repeat", 4 * HOUR)]


def test_changes_within_the_group_interval_go_out_together():
    book = AlertBook([rule("ReplicaSlow")], NotifyPolicy(group_interval_s=60.0))
    sent = []
    for dt, n in [(0, 1), (10, 2), (20, 3), (30, 3), (60, 3), (70, 3), (120, 3)]:
        for note in book.step({"ReplicaSlow": replicas(n)}, T0 + dt).notifications:
            sent.append((dt, note.reason, len(note.firing)))
    assert sent == [(0, "new", 1), (60, "changed", 3)]


def test_group_wait_gathers_the_first_alerts():
    book = AlertBook([rule("ReplicaSlow")], NotifyPolicy(group_wait_s=30.0))
    sent = []
    for dt, n in [(0, 1), (10, 5), (20, 9), (30, 9), (40, 9)]:
        sent += [(dt, len(x.firing)) for x in book.step({"ReplicaSlow": replicas(n)}, T0 + dt).notifications]
    assert sent == [(30, 9)]


def test_groups_split_by_deployment_and_resolution_is_notified():
    book = AlertBook([rule("ReplicaSlow")])
    result = book.step({"ReplicaSlow": replicas(3, deployment="a") + replicas(2, deployment="b")}, T0)
    assert sorted((n.group_labels["deployment"], len(n.firing)) for n in result.notifications) == [
        ("a", 3), ("b", 2)]
    result = book.step({"ReplicaSlow": replicas(2, deployment="b")}, T0 + 120)
    [note] = result.notifications
    assert (note.group_labels["deployment"], note.status, note.reason, len(note.resolved)) == (
        "a", "resolved", "resolved", 3)
    assert book.step({"ReplicaSlow": replicas(2, deployment="b")}, T0 + 240).notifications == []


def test_resolution_inside_the_group_interval_is_sent_at_its_end():
    book = AlertBook([rule("ReplicaSlow")], NotifyPolicy(group_interval_s=60.0))
    book.step({"ReplicaSlow": replicas(2)}, T0)
    assert book.step({"ReplicaSlow": replicas(1)}, T0 + 10).notifications == []
    [note] = book.step({"ReplicaSlow": replicas(1)}, T0 + 60).notifications
    assert (note.reason, len(note.firing), [a.labels["replica"] for a in note.resolved]) == (
        "changed", 1, ["r1"])


def test_a_page_joining_a_ticket_group_is_not_held_back():
    r = RuleSpec(name="Burn", severity="page", annotations=ANN)
    book = AlertBook([r], NotifyPolicy(group_interval_s=300.0))
    ticket = ev(deployment="a", severity="ticket")
    page = ev(deployment="a", severity="page")
    assert len(book.step({"Burn": [ticket]}, T0).notifications) == 1
    [note] = book.step({"Burn": [ticket, page]}, T0 + 20).notifications
    assert note.severity == "page" and len(note.firing) == 2


# inhibition ----------------------------------------------------------------------------------


def inhibiting_book() -> AlertBook:
    policy = NotifyPolicy(inhibit=(Inhibit({"alertname": "DeploymentNotReady"}, {"alertname": "HighLatency"},
                                           ("deployment",)),))
    return AlertBook([rule("DeploymentNotReady", "page"), rule("HighLatency")], policy)


def test_inhibition_mutes_the_target_with_equal_labels_only():
    book = inhibiting_book()
    evals = {"DeploymentNotReady": [ev(deployment="A")],
             "HighLatency": [ev(deployment="A"), ev(deployment="B")]}
    result = book.step(evals, T0)
    notified = sorted(n.group_key for n in result.notifications)
    assert notified == ['{alertname="DeploymentNotReady",deployment="A"}',
                        '{alertname="HighLatency",deployment="B"}']
    # the inhibited alert still transitions and is stored
    assert len(result.transitions) == 3
    muted = book.get('HighLatency{deployment="A",severity="ticket"}')
    assert muted is not None and muted.state == "firing" and muted.inhibited
    # the source resolves: the target is notified as new at once; the source's resolution
    # waits for the end of its group interval
    result = book.step({"DeploymentNotReady": [], "HighLatency": evals["HighLatency"]}, T0 + 30)
    assert [(n.group_key, n.reason) for n in result.notifications] == [
        ('{alertname="HighLatency",deployment="A"}', "new")]
    result = book.step({"DeploymentNotReady": [], "HighLatency": evals["HighLatency"]}, T0 + 60)
    assert [(n.group_key, n.reason) for n in result.notifications] == [
        ('{alertname="DeploymentNotReady",deployment="A"}', "resolved")]


def test_a_pending_source_does_not_inhibit():
    policy = NotifyPolicy(inhibit=(Inhibit({"alertname": "DeploymentNotReady"}, {"alertname": "HighLatency"},
                                           ("deployment",)),))
    book = AlertBook([rule("DeploymentNotReady", "page", for_s=60.0), rule("HighLatency")], policy)
    result = book.step({"DeploymentNotReady": [ev(deployment="A")], "HighLatency": [ev(deployment="A")]}, T0)
    assert [n.group_labels["alertname"] for n in result.notifications] == ["HighLatency"]


# silences ------------------------------------------------------------------------------------


def test_silence_mutes_matching_alerts_until_it_expires():
    book = AlertBook([rule()])
    book.add_silence(Silence("s1", {"deployment": "a"}, T0, T0 + HOUR, "ops", "deploying a"))
    evals = {"HighLatency": [ev(deployment="a"), ev(deployment="b")]}
    result = book.step(evals, T0)
    assert [n.group_labels["deployment"] for n in result.notifications] == ["b"]
    assert book.get('HighLatency{deployment="a",severity="ticket"}').silenced_by == ("s1",)
    sent = []
    for dt in range(60, int(HOUR) + 61, 60):
        result = book.step(evals, T0 + dt)
        sent += [(dt, n.group_labels["deployment"], n.reason) for n in result.notifications]
    assert sent == [(int(HOUR), "a", "new")]  # resumes the moment the silence ends
    assert book.silences(T0 + HOUR) == [] and len(book.silences()) == 1


def test_expire_silence_resumes_notifications_at_once():
    book = AlertBook([rule()])
    book.add_silence(Silence("s1", {"alertname": "HighLatency"}, T0, T0 + 10 * HOUR))
    evals = {"HighLatency": [ev(deployment="a")]}
    assert book.step(evals, T0).notifications == []
    assert book.expire_silence("s1", T0 + 100)
    assert not book.expire_silence("s1", T0 + 100)
    assert not book.expire_silence("nope", T0 + 100)
    [note] = book.step(evals, T0 + 100).notifications
    assert note.reason == "new"


def test_silencing_a_notified_alert_sends_no_resolution_and_it_returns_as_new():
    book = AlertBook([rule()])
    evals = {"HighLatency": [ev(deployment="a")]}
    assert len(book.step(evals, T0).notifications) == 1
    book.add_silence(Silence("s1", {"deployment": "a"}, T0 + 60, T0 + 600))
    assert book.step(evals, T0 + 60).notifications == []
    assert [n.reason for n in book.step(evals, T0 + 600).notifications] == ["new"]


def test_a_future_silence_waits_for_its_start():
    book = AlertBook([rule()])
    book.add_silence(Silence("later", {"deployment": "a"}, T0 + HOUR, T0 + 2 * HOUR))
    assert len(book.step({"HighLatency": [ev(deployment="a")]}, T0).notifications) == 1


@pytest.mark.parametrize(
    "silence",
    [Silence("bad", {"deployment": "a"}, T0, T0), Silence("empty", {}, T0, T0 + 1)],
)
def test_invalid_silences_are_refused(silence):
    with pytest.raises(ValueError):
        AlertBook().add_silence(silence)


# persistence ---------------------------------------------------------------------------------


def test_state_survives_a_restart_through_json():
    rules = [rule("ReplicaSlow")]
    policy = NotifyPolicy(repeat_interval_s=4 * HOUR)
    book = AlertBook(rules, policy)
    first = book.step({"ReplicaSlow": replicas(3)}, T0)
    book.add_silence(Silence("s1", {"replica": "r9"}, T0, T0 + 8 * HOUR, "ops", "known"))
    restored = AlertBook.from_dict(json.loads(json.dumps(book.to_dict())), rules, policy)
    assert restored.to_dict() == book.to_dict()
    # no second page after the restart; the repeat keeps its schedule
    assert restored.step({"ReplicaSlow": replicas(3)}, T0 + 60).notifications == []
    [note] = restored.step({"ReplicaSlow": replicas(3)}, T0 + 4 * HOUR).notifications
    assert note.reason == "repeat"
    # records round-trip too
    for n in first.notifications:
        assert Notification.from_dict(json.loads(json.dumps(n.to_dict()))) == n
    for t in first.transitions:
        assert Transition.from_dict(json.loads(json.dumps(t.to_dict()))) == t


def test_unknown_version_is_refused():
    with pytest.raises(ValueError):
        AlertBook.from_dict({"version": 99})


def test_notification_as_the_notifiers_message():
    book = AlertBook([rule("ReplicaSlow")])
    book.step({"ReplicaSlow": replicas(2)}, T0)
    [note] = book.step({"ReplicaSlow": replicas(1)}, T0 + 60).notifications
    msg = note.to_message()
    assert (msg["group_key"], msg["status"]) == ('{alertname="ReplicaSlow",deployment="a"}', "firing")
    assert [(a["status"], a["labels"]["replica"], a["starts_at"], a["ends_at"]) for a in msg["alerts"]] == [
        ("firing", "r0", T0, None), ("resolved", "r1", T0, T0 + 60)]
    assert msg["alerts"][0]["fingerprint"] == 'ReplicaSlow{deployment="a",replica="r0",severity="ticket"}'
    assert msg["alerts"][0]["annotations"]["summary"] == "ReplicaSlow on a: 1"
    json.dumps(msg)


# after a restart -----------------------------------------------------------------------------


def restarted(for_s: float = 0.0, steps_before: int = 1) -> tuple[AlertBook, list[RuleSpec]]:
    """A book whose alert on replica r0 was notified as firing (or is pending, with for_s),
    saved and restored as a gateway restart does."""
    rules = [rule("ReplicaSlow", for_s=for_s)]
    book = AlertBook(rules)
    for i in range(steps_before):
        book.step({"ReplicaSlow": replicas(1)}, T0 + i)
    return AlertBook.from_dict(json.loads(json.dumps(book.to_dict())), rules), rules


@pytest.mark.parametrize(
    ("first", "want_state", "want_transition", "want_reasons", "want_description", "want_later"),
    [
        pytest.param(replicas(1), "firing", None, [], "value 1.0", [],
                     id="confirmed-stays-firing-without-a-second-notification"),
        pytest.param(replicas(1, active=False), "resolved", ("firing", "resolved"), ["resolved"],
                     "not confirmed by the first evaluation after a restart: value 1.0", ["new"],
                     id="evaluated-inactive-resolves-and-says-so"),
        pytest.param([], "resolved", ("firing", "resolved"), ["resolved"],
                     "not confirmed by the first evaluation after a restart: no data", ["new"],
                     id="no-data-resolves-and-says-so"),
    ],
)
def test_a_restored_firing_alert_is_confirmed_or_resolved_by_the_first_evaluation(
        first, want_state, want_transition, want_reasons, want_description, want_later):
    book, _ = restarted()
    assert book.unconfirmed() == ['ReplicaSlow{deployment="a",replica="r0",severity="ticket"}']
    result = book.step({"ReplicaSlow": first}, T0 + 60)
    [alert] = book.alerts()
    assert alert.state == want_state
    assert alert.description == want_description
    assert [(t.from_state, t.to_state) for t in result.transitions] == \
        ([want_transition] if want_transition else [])
    if want_transition:
        assert result.transitions[0].description == want_description
    assert [n.reason for n in result.notifications] == want_reasons
    assert book.unconfirmed() == []
    # later steps are ordinary: the confirmed one is not notified again, a resolved one that
    # fires again is a new episode
    later = book.step({"ReplicaSlow": replicas(1)}, T0 + 120).notifications
    assert [n.reason for n in later] == want_later


def test_a_restored_pending_alert_not_confirmed_falls_back_and_one_confirmed_keeps_its_start():
    book, _ = restarted(for_s=60.0)
    assert [a.state for a in book.alerts()] == ["pending"]
    book.step({"ReplicaSlow": replicas(1)}, T0 + 30)
    book.step({"ReplicaSlow": replicas(1)}, T0 + 60)
    assert [a.state for a in book.alerts()] == ["firing"]  # for_s counted from before the restart
    book, _ = restarted(for_s=60.0)
    result = book.step({"ReplicaSlow": []}, T0 + 30)
    assert book.alerts() == [] and [(t.from_state, t.to_state) for t in result.transitions] == [
        ("pending", "inactive")]


def test_a_restored_alert_stays_unconfirmed_until_its_rule_is_evaluated():
    rules = [rule("ReplicaSlow"), rule("Other")]
    book = AlertBook(rules)
    book.step({"ReplicaSlow": replicas(1), "Other": []}, T0)
    book = AlertBook.from_dict(book.to_dict(), rules)
    assert book.step({"Other": []}, T0 + 5).transitions == []  # ReplicaSlow not evaluated yet
    assert book.unconfirmed() and book.alerts("firing")
    result = book.step({"ReplicaSlow": [], "Other": []}, T0 + 10)
    assert [t.to_state for t in result.transitions] == ["resolved"]
    assert book.unconfirmed() == []


def test_a_restored_alert_of_a_removed_rule_resolves_and_says_so():
    book = AlertBook([rule("Gone")])
    book.step({"Gone": [ev(deployment="a")]}, T0)
    restored = AlertBook.from_dict(book.to_dict(), [rule("Kept")])
    [t] = restored.step({"Kept": []}, T0 + 5).transitions
    assert (t.to_state, t.description) == (
        "resolved", "not confirmed by the first evaluation after a restart: the rule no longer exists")
