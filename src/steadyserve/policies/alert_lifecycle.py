"""Alert lifecycle: Prometheus' alert states and Alertmanager's grouping, dedup, inhibition
and silences, in one small object with no I/O.

`AlertBook.step(evaluations_by_rule, now)` takes each evaluated rule's `Evaluation`s and
moves every alert instance — keyed by its rule and full label set, written
`alertname{k="v",...}` — through

    inactive ──active──► pending ──active for for_s──► firing ──not active──► resolved
        ▲                  │ not active (a blip)         ▲ (for_s = 0: straight here)   │
        └──────────────────┘                             └──────────active──────────────┘
    resolved alerts stay `keep_resolved_s` for display, then go; so do pending ones that
    fell back (they simply disappear, as in Prometheus).

A rule absent from `evaluations_by_rule` was not evaluated this step: its alerts stay as
they are. A label set a rule evaluated before but not now counts as not active, and so do
the alerts of a rule no longer known (`set_rules`).

Each state change is a `Transition` (to store). Notifications are per group (the values of
`group_by`, default alertname and deployment) and cover the group's *notifiable* alerts:
firing, not inhibited, not silenced. A group notifies
- `group_wait_s` after its first notifiable alert (default 0: a page must not wait),
- when that set gains an alert or loses one to resolution, at most once per
  `group_interval_s` (later changes in the interval go out together at its end) — except
  that an alert more severe than all the group has notified (a page joining tickets: burn
  rate alerts of both severities share a group) goes out at once,
- again every `repeat_interval_s` while nothing changes and something still fires;
so 50 replicas' alerts firing in one step make one notification. An alert muted by a
silence or an inhibition leaves the set quietly and, once unmuted, counts as new.

Inhibit(source_match, target_match, equal): a firing alert matching `source_match` mutes
every other alert matching `target_match` with the same values of the `equal` labels.
Silence(id, matchers, starts_at, ends_at, ...) mutes matching alerts while active. Muted
alerts still change state and produce transitions. Matchers compare label values for
equality (a missing label reads as "").

All times are the `now` arguments; the records are frozen dataclasses with
`to_dict`/`from_dict`, and `AlertBook.to_dict`/`from_dict` carry the whole state (alerts,
groups, silences) across a restart. Rules and `NotifyPolicy` are configuration, passed in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

from steadyserve.policies.alert_rules import SEVERITIES, Evaluation, RuleMeta, Severity

AlertState = Literal["inactive", "pending", "firing", "resolved"]
Json = dict[str, Any]


@dataclass(frozen=True, kw_only=True, slots=True)
class RuleSpec:
    """Rule metadata alone, for callers that evaluate elsewhere (and for tests)."""

    name: str
    severity: Severity = "ticket"
    for_s: float = 0.0
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)


def alert_key(labels: Mapping[str, str]) -> str:
    """`alertname{k="v",...}` with the other labels sorted: stable and readable."""
    rest = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "alertname")
    return f"{labels.get('alertname', '')}{{{rest}}}"


def match_labels(matchers: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k, "") == v for k, v in matchers.items())


class _Fill(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def render(template: str, labels: Mapping[str, str], value: float) -> str:
    """Fill `{label}` and `{value}` in an annotation; unknown fields stay as written."""
    try:
        return template.format_map(_Fill({**labels, "value": f"{value:.4g}"}))
    except (ValueError, IndexError, AttributeError, TypeError):
        return template


# records -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Alert:
    key: str
    rule: str
    labels: dict[str, str]
    annotations: dict[str, str]
    state: AlertState
    value: float
    description: str
    active_since: float | None = None  # start of the current episode (pending or firing)
    fired_at: float | None = None
    resolved_at: float | None = None
    updated_at: float = 0.0
    silenced_by: tuple[str, ...] = ()  # ids of the active silences muting it (last step)
    inhibited: bool = False

    @property
    def severity(self) -> str:
        return self.labels.get("severity", "")

    @property
    def muted(self) -> bool:
        return self.inhibited or bool(self.silenced_by)

    def to_dict(self) -> Json:
        return {
            "key": self.key, "rule": self.rule, "labels": dict(self.labels),
            "annotations": dict(self.annotations), "state": self.state, "value": self.value,
            "description": self.description, "active_since": self.active_since,
            "fired_at": self.fired_at, "resolved_at": self.resolved_at,
            "updated_at": self.updated_at, "silenced_by": list(self.silenced_by),
            "inhibited": self.inhibited,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Alert:
        return cls(
            key=d["key"], rule=d["rule"], labels=dict(d["labels"]), annotations=dict(d["annotations"]),
            state=d["state"], value=float(d["value"]), description=d["description"],
            active_since=d.get("active_since"), fired_at=d.get("fired_at"),
            resolved_at=d.get("resolved_at"), updated_at=float(d.get("updated_at", 0.0)),
            silenced_by=tuple(d.get("silenced_by", ())), inhibited=bool(d.get("inhibited", False)),
        )


@dataclass(frozen=True, slots=True)
class Transition:
    alert_key: str
    from_state: AlertState
    to_state: AlertState
    at: float
    value: float
    description: str
    rule: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> Json:
        return {"alert_key": self.alert_key, "from_state": self.from_state, "to_state": self.to_state,
                "at": self.at, "value": self.value, "description": self.description,
                "rule": self.rule, "labels": dict(self.labels)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Transition:
        return cls(d["alert_key"], d["from_state"], d["to_state"], float(d["at"]), float(d["value"]),
                   d["description"], d.get("rule", ""), dict(d.get("labels", {})))


@dataclass(frozen=True, slots=True)
class Notification:
    """One message for a group: what fires now (notifiable) and what resolved since the
    group's last notification. `reason`: new | changed | resolved | repeat."""

    group_key: str
    group_labels: dict[str, str]
    status: Literal["firing", "resolved"]
    reason: Literal["new", "changed", "resolved", "repeat"]
    at: float
    severity: str
    firing: tuple[Alert, ...]
    resolved: tuple[Alert, ...]

    def to_dict(self) -> Json:
        return {"group_key": self.group_key, "group_labels": dict(self.group_labels),
                "status": self.status, "reason": self.reason, "at": self.at, "severity": self.severity,
                "firing": [a.to_dict() for a in self.firing],
                "resolved": [a.to_dict() for a in self.resolved]}

    def to_message(self) -> Json:
        """The plain dict `observe/notifiers.py` delivers: one `alerts` list, each alert with
        its status, `starts_at` / `ends_at` and the alert key as fingerprint."""
        def one(a: Alert, status: str) -> Json:
            return {"labels": dict(a.labels), "annotations": dict(a.annotations), "status": status,
                    "starts_at": a.fired_at if a.fired_at is not None else a.active_since,
                    "ends_at": a.resolved_at if status == "resolved" else None,
                    "fingerprint": a.key, "value": a.value}
        alerts = [one(a, "firing") for a in self.firing] + [one(a, "resolved") for a in self.resolved]
        return {"group_key": self.group_key, "group_labels": dict(self.group_labels),
                "status": self.status, "reason": self.reason, "severity": self.severity, "at": self.at,
                "alerts": alerts}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Notification:
        return cls(d["group_key"], dict(d["group_labels"]), d["status"], d["reason"], float(d["at"]),
                   d["severity"], tuple(Alert.from_dict(a) for a in d["firing"]),
                   tuple(Alert.from_dict(a) for a in d["resolved"]))


@dataclass(frozen=True, slots=True)
class Inhibit:
    source_match: Mapping[str, str]
    target_match: Mapping[str, str]
    equal: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Silence:
    id: str
    matchers: Mapping[str, str]
    starts_at: float
    ends_at: float
    created_by: str = ""
    comment: str = ""

    def active(self, now: float) -> bool:
        return self.starts_at <= now < self.ends_at

    def matches(self, labels: Mapping[str, str]) -> bool:
        return match_labels(self.matchers, labels)

    def to_dict(self) -> Json:
        return {"id": self.id, "matchers": dict(self.matchers), "starts_at": self.starts_at,
                "ends_at": self.ends_at, "created_by": self.created_by, "comment": self.comment}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Silence:
        return cls(d["id"], dict(d["matchers"]), float(d["starts_at"]), float(d["ends_at"]),
                   d.get("created_by", ""), d.get("comment", ""))


@dataclass(frozen=True, slots=True)
class GroupState:
    key: str
    labels: dict[str, str]
    notified: tuple[str, ...] = ()  # keys of the firing alerts the last notification carried
    last_notified_at: float | None = None
    first_firing_at: float | None = None  # start of group_wait for an un-notified group

    def to_dict(self) -> Json:
        return {"key": self.key, "labels": dict(self.labels), "notified": list(self.notified),
                "last_notified_at": self.last_notified_at, "first_firing_at": self.first_firing_at}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GroupState:
        return cls(d["key"], dict(d["labels"]), tuple(d.get("notified", ())),
                   d.get("last_notified_at"), d.get("first_firing_at"))


@dataclass(frozen=True, kw_only=True, slots=True)
class NotifyPolicy:
    group_by: tuple[str, ...] = ("alertname", "deployment")
    group_wait_s: float = 0.0
    group_interval_s: float = 60.0
    repeat_interval_s: float = 4 * 3_600.0
    keep_resolved_s: float = 3_600.0  # also how long expired silences stay listed
    send_resolved: bool = True
    inhibit: tuple[Inhibit, ...] = ()


@dataclass(frozen=True, slots=True)
class StepResult:
    transitions: list[Transition]
    notifications: list[Notification]


_RANK: dict[str, int] = {s: i for i, s in enumerate(SEVERITIES)}


def _top_severity(alerts: Iterable[Alert]) -> str:
    return min((a.severity for a in alerts), key=_rank, default="")


def _rank(severity: str) -> int:
    return _RANK.get(severity, len(_RANK))


def _escalates(added: Sequence[Alert], notified: Sequence[Alert]) -> bool:
    """A newly firing alert is more severe than any the group already notified (a page
    joining tickets): it goes out now, not at the end of the group interval."""
    return bool(added) and min(_rank(a.severity) for a in added) < min(
        (_rank(a.severity) for a in notified), default=len(_RANK))


# the book ------------------------------------------------------------------------------------


class AlertBook:
    """Every alert instance, group and silence; see the module docstring."""

    def __init__(self, rules: Iterable[RuleMeta] = (), policy: NotifyPolicy | None = None) -> None:
        self.policy = policy or NotifyPolicy()
        self._rules: dict[str, RuleMeta] = {}
        self._alerts: dict[str, Alert] = {}
        self._groups: dict[str, GroupState] = {}
        self._silences: dict[str, Silence] = {}
        self.set_rules(rules)

    def set_rules(self, rules: Iterable[RuleMeta]) -> None:
        self._rules = {r.name: r for r in rules}

    # silences ----------------------------------------------------------------------------

    def add_silence(self, silence: Silence) -> None:
        """Add (or replace, by id) a silence."""
        if silence.ends_at <= silence.starts_at:
            raise ValueError("a silence must end after it starts")
        if not silence.matchers:
            raise ValueError("a silence needs at least one matcher")
        self._silences[silence.id] = silence

    def expire_silence(self, silence_id: str, now: float) -> bool:
        """End a silence now; False if unknown or already over."""
        s = self._silences.get(silence_id)
        if s is None or s.ends_at <= now:
            return False
        self._silences[silence_id] = replace(s, ends_at=max(now, s.starts_at))
        return True

    def silences(self, now: float | None = None) -> list[Silence]:
        """All kept silences, or only those active at `now`."""
        return [s for s in self._silences.values() if now is None or s.active(now)]

    # reading -----------------------------------------------------------------------------

    def alerts(self, *states: AlertState) -> list[Alert]:
        return sorted((a for a in self._alerts.values() if not states or a.state in states),
                      key=lambda a: a.key)

    def get(self, key: str) -> Alert | None:
        return self._alerts.get(key)

    def groups(self) -> list[GroupState]:
        return list(self._groups.values())

    # stepping ----------------------------------------------------------------------------

    def step(self, evaluations_by_rule: Mapping[str, Sequence[Evaluation]], now: float) -> StepResult:
        transitions: list[Transition] = []
        unknown = [name for name in evaluations_by_rule if name not in self._rules]
        if unknown:
            raise ValueError(f"evaluations for unknown rules: {', '.join(sorted(unknown))}")
        by_rule: dict[str, list[str]] = {}
        for key, alert in self._alerts.items():
            by_rule.setdefault(alert.rule, []).append(key)
        for name, evaluations in evaluations_by_rule.items():
            rule = self._rules[name]
            seen: set[str] = set()
            for ev in evaluations:
                labels = {"alertname": name, "severity": rule.severity, **rule.labels, **ev.labels}
                key = alert_key(labels)
                seen.add(key)
                self._advance(key, rule, labels, ev.active, ev.value, ev.description, now, transitions)
            for key in by_rule.get(name, ()):
                if key not in seen:
                    self._fall(key, now, transitions)
        for name, keys in by_rule.items():  # rules removed from the configuration
            if name not in self._rules:
                for key in keys:
                    self._fall(key, now, transitions)
        self._forget_old(now)
        self._mute(now)
        return StepResult(transitions, self._notify(now))

    def _advance(self, key: str, rule: RuleMeta, labels: dict[str, str], active: bool, value: float,
                 description: str, now: float, transitions: list[Transition]) -> None:
        old = self._alerts.get(key)
        if old is None:
            if not active:
                return
            old = Alert(key, rule.name, labels, {}, "inactive", value, description, updated_at=now)
        annotations = {k: render(v, labels, value) for k, v in rule.annotations.items()}
        a = replace(old, labels=labels, annotations=annotations, value=value, description=description,
                    updated_at=now)
        if not active:
            self._alerts[key] = a
            self._fall(key, now, transitions)
            return
        if a.state in ("inactive", "resolved"):
            a = replace(a, active_since=now, fired_at=None, resolved_at=None)
            to: AlertState = "firing" if rule.for_s <= 0 else "pending"
        elif a.state == "pending":
            to = "firing" if now - (a.active_since or now) >= rule.for_s else "pending"
        else:
            to = "firing"
        if to == "firing" and a.state != "firing":
            a = replace(a, fired_at=now)
        self._move(a, to, now, transitions)

    def _fall(self, key: str, now: float, transitions: list[Transition]) -> None:
        """The condition no longer holds (or was not reported) for this alert."""
        a = self._alerts[key]
        if a.state == "pending":
            self._move(a, "inactive", now, transitions)
        elif a.state == "firing":
            self._move(replace(a, resolved_at=now), "resolved", now, transitions)

    def _move(self, a: Alert, to: AlertState, now: float, transitions: list[Transition]) -> None:
        if to != a.state:
            transitions.append(Transition(a.key, a.state, to, now, a.value, a.description, a.rule,
                                          dict(a.labels)))
        if to == "inactive":
            self._alerts.pop(a.key, None)
        else:
            self._alerts[a.key] = replace(a, state=to)

    def _forget_old(self, now: float) -> None:
        keep = self.policy.keep_resolved_s
        for key in [k for k, a in self._alerts.items()
                    if a.state == "resolved" and (a.resolved_at or now) <= now - keep]:
            del self._alerts[key]
        for sid in [i for i, s in self._silences.items() if s.ends_at <= now - keep]:
            del self._silences[sid]

    def _mute(self, now: float) -> None:
        """Mark each alert's silences and inhibition as of `now`."""
        silences = [s for s in self._silences.values() if s.active(now)]
        firing = [a for a in self._alerts.values() if a.state == "firing"]
        sources: list[tuple[Inhibit, dict[tuple[str, ...], set[str]]]] = []
        for rule in self.policy.inhibit:
            by_equal: dict[tuple[str, ...], set[str]] = {}
            for a in firing:
                if match_labels(rule.source_match, a.labels):
                    by_equal.setdefault(tuple(a.labels.get(k, "") for k in rule.equal), set()).add(a.key)
            sources.append((rule, by_equal))
        for key, a in self._alerts.items():
            silenced_by = tuple(s.id for s in silences if s.matches(a.labels))
            inhibited = any(
                match_labels(rule.target_match, a.labels)
                and bool(by_equal.get(tuple(a.labels.get(k, "") for k in rule.equal), set()) - {key})
                for rule, by_equal in sources)
            if silenced_by != a.silenced_by or inhibited != a.inhibited:
                self._alerts[key] = replace(a, silenced_by=silenced_by, inhibited=inhibited)

    def _group_of(self, labels: Mapping[str, str]) -> tuple[str, dict[str, str]]:
        g = {k: labels[k] for k in self.policy.group_by if k in labels}
        return "{" + ",".join(f'{k}="{v}"' for k, v in g.items()) + "}", g

    def _notify(self, now: float) -> list[Notification]:
        p = self.policy
        members: dict[str, list[Alert]] = {}
        for a in self._alerts.values():
            gkey, glabels = self._group_of(a.labels)
            members.setdefault(gkey, []).append(a)
            if gkey not in self._groups:
                self._groups[gkey] = GroupState(gkey, glabels)
        out: list[Notification] = []
        for gkey in sorted(self._groups):
            g = self._groups[gkey]
            alerts = {a.key: a for a in members.get(gkey, ())}
            current = tuple(sorted(k for k, a in alerts.items() if a.state == "firing" and not a.muted))
            notified = set(g.notified)
            # muted since the last notification: leaves quietly, counts as new once unmuted
            muted = {k for k in notified if k in alerts and alerts[k].state == "firing" and alerts[k].muted}
            still = notified & set(current)
            resolved = sorted(notified - still - muted) if p.send_resolved else []
            added = set(current) - still
            if not current and not resolved:
                if alerts:
                    self._groups[gkey] = replace(g, notified=(), first_firing_at=None)
                else:
                    del self._groups[gkey]
                continue
            reason: Literal["new", "changed", "resolved", "repeat"] | None = None
            if added or resolved:
                if not still and not resolved:  # a new episode for the group: group_wait
                    first = g.first_firing_at if g.first_firing_at is not None else now
                    g = replace(g, first_firing_at=first)
                    if now - first >= p.group_wait_s:
                        reason = "new"
                elif (g.last_notified_at is None or now - g.last_notified_at >= p.group_interval_s
                      or _escalates([alerts[k] for k in added], [alerts[k] for k in still])):
                    reason = "changed" if current else "resolved"
            elif g.last_notified_at is not None and now - g.last_notified_at >= p.repeat_interval_s:
                reason = "repeat"
            if reason is None:  # keep what is still owed: the resolutions not yet sent
                self._groups[gkey] = replace(g, notified=tuple(sorted(still | set(resolved))))
                continue
            firing = tuple(alerts[k] for k in current)
            gone = tuple(alerts[k] for k in resolved if k in alerts)
            out.append(Notification(gkey, dict(g.labels), "firing" if current else "resolved", reason, now,
                                    _top_severity(firing or gone), firing, gone))
            self._groups[gkey] = replace(g, notified=current, last_notified_at=now,
                                         first_firing_at=g.first_firing_at if current else None)
        return out

    # persistence -------------------------------------------------------------------------

    def to_dict(self) -> Json:
        return {
            "version": 1,
            "alerts": [a.to_dict() for a in self.alerts()],
            "groups": [g.to_dict() for g in self._groups.values()],
            "silences": [s.to_dict() for s in self._silences.values()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], rules: Iterable[RuleMeta] = (),
                  policy: NotifyPolicy | None = None) -> AlertBook:
        if data.get("version") != 1:
            raise ValueError(f"unknown alert book version {data.get('version')!r}")
        book = cls(rules, policy)
        for a in cast(list[Json], data.get("alerts", [])):
            alert = Alert.from_dict(a)
            book._alerts[alert.key] = alert
        for g in cast(list[Json], data.get("groups", [])):
            group = GroupState.from_dict(g)
            book._groups[group.key] = group
        for s in cast(list[Json], data.get("silences", [])):
            silence = Silence.from_dict(s)
            book._silences[silence.id] = silence
        return book
