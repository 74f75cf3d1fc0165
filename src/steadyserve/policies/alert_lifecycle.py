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

Silences are checked where they enter (`check_matchers`, `check_duration`, and in
`add_silence` with `SilenceLimits`: size and count): label names as Prometheus spells them,
bounded values, and no matcher set that matches every alert unless it says `match_all`.
`SilenceRefused.kind` tells the API which status to answer (400, 413, 409).

All times are the `now` arguments; the records are frozen dataclasses with
`to_dict`/`from_dict`, and `AlertBook.to_dict`/`from_dict` carry the whole state (alerts,
groups, silences) across a restart. A restored pending or firing alert is unconfirmed until
its rule is next evaluated: an active evaluation confirms it (a firing one stays firing,
already notified, so nothing is sent again); anything else resolves it, with a description
saying it was not confirmed after the restart. Restored silences are bounded as new ones
are. Rules and `NotifyPolicy` are configuration, passed in.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

from steadyserve.policies.alert_rules import SEVERITIES, Evaluation, RuleMeta, Severity
from steadyserve.policies.alert_rules import render as render  # the annotation language lives with the rules

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
    match_all: bool = False  # said explicitly: matchers that match every alert are meant

    def active(self, now: float) -> bool:
        return self.starts_at <= now < self.ends_at

    def matches(self, labels: Mapping[str, str]) -> bool:
        return match_labels(self.matchers, labels)

    def to_dict(self) -> Json:
        return {"id": self.id, "matchers": dict(self.matchers), "starts_at": self.starts_at,
                "ends_at": self.ends_at, "created_by": self.created_by, "comment": self.comment,
                "match_all": self.match_all}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Silence:
        return cls(str(d["id"]), dict(d["matchers"]), float(d["starts_at"]), float(d["ends_at"]),
                   d.get("created_by", ""), d.get("comment", ""), d.get("match_all", False) is True)


# what a silence may be ---------------------------------------------------------------------

LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")  # Prometheus' label names
MAX_LABEL_NAME_CHARS = 128
MAX_MATCHER_VALUE_CHARS = 1024
MAX_MATCHERS = 32
RefusalKind = Literal["invalid", "too_large", "too_many"]


@dataclass(frozen=True, kw_only=True, slots=True)
class SilenceLimits:
    """Bounds on silences, from [alerting] max_silences, max_silence_bytes, min_silence_s and
    max_silence_s: what the API accepts and what a restart restores."""

    max_active: int = 100
    max_bytes: int = 4096
    min_s: float = 60.0
    max_s: float = 30 * 86_400.0


class SilenceRefused(ValueError):
    """Why a silence is refused: `kind` "invalid" (the API answers 400), "too_large" (413)
    or "too_many" (409); `param` names the field at fault."""

    def __init__(self, kind: RefusalKind, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.kind: RefusalKind = kind
        self.message = message
        self.param = param


def check_matchers(matchers: object, match_all: object = False) -> dict[str, str]:
    """The matchers of a new silence: an object of at most MAX_MATCHERS label names (as
    Prometheus spells them) to string values (bounded). A set whose values are all "" (or
    no matcher at all) matches every alert, since a missing label reads as "": refused
    unless `match_all` is True, said explicitly."""
    if not isinstance(match_all, bool):
        raise SilenceRefused("invalid", "'match_all' must be true or false", "match_all")
    if not isinstance(matchers, Mapping):
        raise SilenceRefused("invalid", "'matchers' must be an object of label: value strings",
                             "matchers")
    if len(matchers) > MAX_MATCHERS:
        raise SilenceRefused("invalid", f"at most {MAX_MATCHERS} matchers", "matchers")
    out: dict[str, str] = {}
    for name, value in matchers.items():
        if not isinstance(name, str) or len(name) > MAX_LABEL_NAME_CHARS \
                or LABEL_NAME.fullmatch(name) is None:
            raise SilenceRefused("invalid", f"matcher {str(name)[:40]!r} is not a label name "
                                 f"([a-zA-Z_][a-zA-Z0-9_]*, at most {MAX_LABEL_NAME_CHARS} "
                                 "characters)", "matchers")
        if not isinstance(value, str) or len(value) > MAX_MATCHER_VALUE_CHARS:
            raise SilenceRefused("invalid", f"matcher {name}: the value must be a string of at "
                                 f"most {MAX_MATCHER_VALUE_CHARS} characters", "matchers")
        out[name] = value
    if not match_all and not any(out.values()):
        raise SilenceRefused("invalid", "these matchers match every alert (a missing label reads "
                             "as \"\"): give a label a value, or send \"match_all\": true to "
                             "mute everything", "matchers")
    return out


def silence_schema(limits: SilenceLimits) -> dict[str, Any]:
    """JSON Schema of a new silence (the OpenAPI document), beside the checks above. The
    size and count limits (413, 409) are not shape and are not in it."""
    value = {"type": "string", "maxLength": MAX_MATCHER_VALUE_CHARS}
    return {
        "type": "object", "required": ["matchers", "duration_s"],
        "properties": {
            "matchers": {"type": "object", "maxProperties": MAX_MATCHERS,
                         "propertyNames": {"pattern": f"^{LABEL_NAME.pattern}$",
                                           "maxLength": MAX_LABEL_NAME_CHARS},
                         "additionalProperties": value},
            "duration_s": {"type": "number", "minimum": limits.min_s, "maximum": limits.max_s},
            "created_by": {"type": "string"}, "comment": {"type": "string"},
            "match_all": {"type": "boolean"},
        },
        # matchers that all read "" match every alert: only with match_all said explicitly
        "anyOf": [{"required": ["match_all"], "properties": {"match_all": {"const": True}}},
                  {"properties": {"matchers": {"not": {"additionalProperties": {"maxLength": 0}}}}}],
    }


def check_duration(duration_s: object, limits: SilenceLimits) -> float:
    """A finite number of seconds within [limits.min_s, limits.max_s]."""
    seconds = math.nan
    if isinstance(duration_s, (int, float)) and not isinstance(duration_s, bool):
        try:
            seconds = float(duration_s)
        except OverflowError:  # an integer past the float range
            pass
    if not (math.isfinite(seconds) and limits.min_s <= seconds <= limits.max_s):
        raise SilenceRefused("invalid", f"'duration_s' must be a number of seconds from "
                             f"{limits.min_s:g} to {limits.max_s:g}", "duration_s")
    return seconds


def check_text(value: object, param: str) -> str:
    if not isinstance(value, str):
        raise SilenceRefused("invalid", f"'{param}' must be a string", param)
    return value


def silence_bytes(silence: Silence) -> int:
    """The size of what a client chose (matchers, creator, comment) as compact JSON."""
    chosen = {"matchers": dict(silence.matchers), "created_by": silence.created_by,
              "comment": silence.comment}
    return len(json.dumps(chosen, ensure_ascii=False, separators=(",", ":")).encode())


def check_silence_size(silence: Silence, limits: SilenceLimits) -> None:
    size = silence_bytes(silence)
    if size > limits.max_bytes:
        raise SilenceRefused("too_large", f"the silence's matchers, created_by and comment take "
                             f"{size} bytes as JSON; at most {limits.max_bytes}")


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


UNCONFIRMED = "not confirmed by the first evaluation after a restart"


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
        # restored (pending or firing) alerts whose rule has not been evaluated since the
        # restart: the first evaluation confirms each or resolves it (see `step`)
        self._unconfirmed: set[str] = set()
        self.set_rules(rules)

    def set_rules(self, rules: Iterable[RuleMeta]) -> None:
        self._rules = {r.name: r for r in rules}

    # silences ----------------------------------------------------------------------------

    def add_silence(self, silence: Silence, limits: SilenceLimits | None = None) -> None:
        """Add (or replace, by id) a silence; SilenceRefused (a ValueError) says why not.
        With `limits`, also its size and the number of silences not yet ended."""
        if silence.ends_at <= silence.starts_at:
            raise SilenceRefused("invalid", "a silence must end after it starts", "duration_s")
        check_matchers(silence.matchers, silence.match_all)
        if limits is not None:
            check_silence_size(silence, limits)
            live = sum(1 for s in self._silences.values()
                       if s.ends_at > silence.starts_at and s.id != silence.id)
            if live >= limits.max_active:
                raise SilenceRefused("too_many", f"{live} silences are active already (at most "
                                     f"{limits.max_active}); expire one first")
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

    def unconfirmed(self) -> list[str]:
        """Keys of restored alerts that no evaluation has confirmed yet."""
        return sorted(self._unconfirmed)

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
                description = ev.description
                if key in self._unconfirmed:
                    self._unconfirmed.discard(key)
                    if not ev.active:
                        description = f"{UNCONFIRMED}: {description}"
                self._advance(key, rule, labels, ev.active, ev.value, description, now, transitions)
            for key in by_rule.get(name, ()):
                if key not in seen:
                    why = f"{UNCONFIRMED}: no data" if key in self._unconfirmed else None
                    self._unconfirmed.discard(key)
                    self._fall(key, now, transitions, why)
        for name, keys in by_rule.items():  # rules removed from the configuration
            if name not in self._rules:
                for key in keys:
                    why = f"{UNCONFIRMED}: the rule no longer exists" if key in self._unconfirmed \
                        else None
                    self._unconfirmed.discard(key)
                    self._fall(key, now, transitions, why)
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

    def _fall(self, key: str, now: float, transitions: list[Transition], why: str | None = None) -> None:
        """The condition no longer holds (or was not reported) for this alert; `why`
        replaces its description when it says more."""
        a = self._alerts[key]
        if why is not None:
            a = replace(a, description=why)
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
                  policy: NotifyPolicy | None = None, *, silence_limits: SilenceLimits | None = None,
                  now: float | None = None) -> AlertBook:
        """The book as `to_dict` saved it. Its pending and firing alerts are unconfirmed
        until their rule's next evaluation. With `silence_limits` and `now`, silences are
        restored as the API would take them: ended, malformed, oversized or over-long ones
        are dropped, and at most `max_active` (the newest) are kept."""
        if data.get("version") != 1:
            raise ValueError(f"unknown alert book version {data.get('version')!r}")
        book = cls(rules, policy)
        for a in cast(list[Json], data.get("alerts", [])):
            alert = Alert.from_dict(a)
            book._alerts[alert.key] = alert
            if alert.state in ("pending", "firing"):
                book._unconfirmed.add(alert.key)
        for g in cast(list[Json], data.get("groups", [])):
            group = GroupState.from_dict(g)
            book._groups[group.key] = group
        raw = cast(list[Json], data.get("silences", []))
        if silence_limits is None or now is None:
            for s in raw:
                silence = Silence.from_dict(s)
                book._silences[silence.id] = silence
            return book
        kept: list[Silence] = []
        for s in raw:
            try:
                silence = Silence.from_dict(s)
                check_silence_size(silence, silence_limits)
                # a second of slack: starts_at + duration_s need not subtract back exactly
                if silence.ends_at - silence.starts_at > silence_limits.max_s + 1.0:
                    continue
                book.add_silence(silence)  # matchers and order checked as on creation
            except (KeyError, TypeError, ValueError, AttributeError):
                continue
            if silence.ends_at > now:
                kept.append(silence)
        book._silences = {s.id: s for s in sorted(kept, key=lambda s: s.starts_at, reverse=True)
                          [:silence_limits.max_active]}
        return book
