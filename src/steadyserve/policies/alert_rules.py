"""Alert rules: pure evaluators that read a `SeriesStore` and say, per label set, whether a
condition holds now.

A rule has `name`, `severity` ("page" | "ticket" | "info"), `labels`, `annotations` (at
least `summary` and `runbook`), `for_s`, and `evaluate(store, now) -> list[Evaluation]`:
one `Evaluation(labels, active, value, description)` per matching label set (e.g. per
deployment). `active` is the condition *now*; how long it has held (`for_s`), grouping,
silences and notifications belong to `policies/alert_lifecycle.py`.

    Threshold(expr, op, threshold)          expr(store, now) -> {labels: value} compared
    RateOfChange(expr, window_s, ...)       least-squares slope of a gauge over a window
    EwmaAnomaly(expr, alpha, z, ...)        z-score against an EWMA baseline (stateful, below)
    BurnRate(errors, total, slo_target)     SRE workbook multi-window multi-burn-rate
    LatencyBurnRate(buckets, count, ...)    the same, "bad" = slower than threshold_s

Expressions (`gauge`, `rate`, `ratio`, `histogram_quantile`) are small frozen callables
with a `text` for descriptions and a `promql` that is their exact PromQL equivalent. Label
filters map a label to a string (equality) or a compiled regex (full match).

One declaration per rule: every rule here also says what it is in Prometheus, `prometheus()
-> tuple[PromAlert, ...]` (one alerting rule per severity it emits), rendered from the same
fields the built-in evaluator reads, so a threshold or window is written once and
`observe/prom_rules.py` only formats YAML. Where an equivalence needs care it is noted on the
expression (`Ratio` fills a missing numerator with 0, as the evaluator does; `BurnRate`'s
value is the long window's burn of the first pair that fires, as PromQL's `or` keeps the
left side). `EwmaAnomaly` has no PromQL equivalent: a rule may declare a stand-in beside
it (`standin_promql`), exported with `exact=False`.

Everything here is pure except `EwmaAnomaly.states`: the per-label-set baselines that
`EwmaAnomaly.evaluate` updates in place (the pure step is `EwmaAnomaly.evaluate_step`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

from steadyserve.observe.timeseries import Labels, SeriesStore

Severity = Literal["page", "ticket", "info"]
Points = list[tuple[float, float]]
Op = Literal[">", ">=", "<", "<=", "==", "!="]
Matcher = str | re.Pattern[str]
LabelFilter = Mapping[str, Matcher]

SEVERITIES: tuple[Severity, ...] = ("page", "ticket", "info")
REQUIRED_ANNOTATIONS = ("summary", "runbook")

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}


@dataclass(frozen=True, slots=True)
class Evaluation:
    labels: dict[str, str]
    active: bool
    value: float
    description: str


class Expr(Protocol):
    def __call__(self, store: SeriesStore, now: float) -> dict[Labels, float]: ...

    @property
    def promql(self) -> str:
        """The same expression in PromQL (one value per label set, like `__call__`)."""
        ...


class RangeExpr(Expr, Protocol):
    def over(self, store: SeriesStore, window_s: float, now: float) -> dict[Labels, Points]:
        ...


class RuleMeta(Protocol):
    """What the alert book needs of a rule (policies/alert_lifecycle.py)."""

    @property
    def name(self) -> str: ...
    @property
    def severity(self) -> Severity: ...
    @property
    def labels(self) -> Mapping[str, str]: ...
    @property
    def annotations(self) -> Mapping[str, str]: ...
    @property
    def for_s(self) -> float: ...


class Rule(RuleMeta, Protocol):
    """What the lifecycle (RuleMeta) and the evaluator loop need from a rule."""

    def evaluate(self, store: SeriesStore, now: float) -> list[Evaluation]: ...


@dataclass(frozen=True, slots=True)
class PromAlert:
    """One Prometheus alerting rule generated from a built-in rule: `expr` in PromQL, its
    `for_s`, and the labels it adds besides alertname (at least severity). `exact` is False
    for a stand-in: a rule with no PromQL equivalent exported as the nearest usual rule."""

    expr: str
    for_s: float
    labels: Mapping[str, str]
    exact: bool = True


class ExportedRule(Rule, Protocol):
    """A rule that also renders itself as Prometheus alerting rules (one declaration)."""

    def prometheus(self) -> tuple[PromAlert, ...]: ...


def evaluate_all(rules: Iterable[Rule], store: SeriesStore, now: float) -> dict[str, list[Evaluation]]:
    """Every rule's evaluations, by rule name: the input of `AlertBook.step`."""
    return {rule.name: rule.evaluate(store, now) for rule in rules}


# label helpers -------------------------------------------------------------------------------


def matches(labels: Mapping[str, str] | Labels, match: LabelFilter | None) -> bool:
    """Every filter holds: a string equals the label's value, a regex fully matches it
    (a missing label reads as "")."""
    if not match:
        return True
    got = labels if isinstance(labels, Mapping) else dict(labels)
    for key, want in match.items():
        value = got.get(key, "")
        if isinstance(want, str):
            if value != want:
                return False
        elif want.fullmatch(value) is None:
            return False
    return True


def _group(labels: Labels, by: Sequence[str] | None) -> Labels:
    return labels if by is None else tuple(kv for kv in labels if kv[0] in by)


def _sum_increase(
    store: SeriesStore, name: str, match: LabelFilter | None, by: Sequence[str] | None,
    window_s: float, now: float,
) -> dict[Labels, float]:
    """sum by (by) (increase(name{match}[window]))."""
    out: dict[Labels, float] = {}
    for labels in store.keys(name):
        if not matches(labels, match):
            continue
        inc = store.increase((name, labels), window_s, now)
        if inc is not None:
            g = _group(labels, by)
            out[g] = out.get(g, 0.0) + inc
    return out


def _text(expr: object) -> str:
    text = getattr(expr, "text", None)
    return text if isinstance(text, str) else repr(expr)


def _fmt_labels(match: LabelFilter | None) -> str:
    if not match:
        return ""
    parts = [f'{k}="{v}"' if isinstance(v, str) else f'{k}=~"{v.pattern}"' for k, v in match.items()]
    return "{" + ",".join(parts) + "}"


# PromQL rendering ----------------------------------------------------------------------------


def prom_duration(seconds: float) -> str:
    """A PromQL duration in one whole unit: 3600 → "1h", 90 → "90s", 0.25 → "250ms"."""
    if seconds <= 0 or not math.isfinite(seconds):
        raise ValueError(f"a PromQL window must be a positive finite duration, not {seconds!r}")
    for unit, size in (("d", 86_400.0), ("h", 3_600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    ms = seconds * 1000
    if ms != round(ms):
        raise ValueError(f"a PromQL window needs whole milliseconds, not {seconds!r} s")
    return f"{round(ms)}ms"


def prom_number(x: float) -> str:
    """A float literal PromQL parses to the same double (shortest form that round-trips)."""
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    short = f"{x:g}"
    return short if float(short) == x else repr(float(x))


def prom_selector(name: str, match: LabelFilter | None) -> str:
    """`name{k="v",k2=~"re"}`; a regex filter is anchored in PromQL, as `fullmatch` is here."""
    if not match:
        return name
    parts = [f"{k}={json.dumps(v)}" if isinstance(v, str) else f"{k}=~{json.dumps(v.pattern)}"
             for k, v in match.items()]
    return name + "{" + ",".join(parts) + "}"


def _sum_by(by: Sequence[str] | None, inner: str) -> str:
    """`sum by (by) (inner)`; `by=None` keeps every label, as `_group` does."""
    return inner if by is None else f"sum by ({', '.join(by)}) ({inner})"


def _prom_labels(severity: str, labels: Mapping[str, str]) -> dict[str, str]:
    return {"severity": severity, **labels}


# annotations ---------------------------------------------------------------------------------
#
# One template language, rendered two ways: `{label}` is a label of the alert, `{value}` its
# value (4 significant digits), `{value:.2f}` / `.3g` / `.1e` a value with a precision. The
# built-in renders it with str.format (`render`); the export turns it into Prometheus' Go
# template (`prom_template`), and a spec Go's printf cannot say the same way is refused when
# the rule is declared, so both always say the same thing.

_FIELD = re.compile(r"\{(\w+)(?::([^{}]*))?\}")
_VALUE_SPEC = re.compile(r"\.\d{1,2}[fge]")


class _Value(float):
    """The alert value in a template: plain `{value}` shows 4 significant digits."""

    def __format__(self, spec: str) -> str:
        return super().__format__(spec or ".4g")


class _Fill(dict[str, object]):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def render(template: str, labels: Mapping[str, str], value: float) -> str:
    """Fill `{label}` and `{value}` in an annotation; unknown fields stay as written."""
    try:
        return template.format_map(_Fill({**labels, "value": _Value(value)}))
    except (ValueError, IndexError, AttributeError, TypeError, KeyError):
        return template


def prom_template(template: str) -> str:
    """The annotation in Prometheus' template language: `{deployment}` → `{{ $labels.deployment }}`,
    `{value:.2f}` → `{{ printf "%.2f" $value }}`. ValueError for a value spec Go's printf does
    not render as Python does."""
    def one(m: re.Match[str]) -> str:
        name, spec = m.group(1), m.group(2)
        if name != "value":
            if spec:
                raise ValueError(f"label field {{{name}:{spec}}}: labels take no format spec")
            return "{{ $labels." + name + " }}"
        spec = spec or ".4g"
        if not _VALUE_SPEC.fullmatch(spec):
            raise ValueError(f"value spec {spec!r}: use .Nf, .Ng or .Ne (Go's printf says "
                             "the same)")
        return '{{ printf "%' + spec + '" $value }}'

    return _FIELD.sub(one, template)


def _check_rule(name: str, severity: str, annotations: Mapping[str, str]) -> None:
    if not name:
        raise ValueError("a rule needs a name")
    if severity not in SEVERITIES:
        raise ValueError(f"rule {name}: severity must be one of {SEVERITIES}, not {severity!r}")
    missing = [a for a in REQUIRED_ANNOTATIONS if not annotations.get(a)]
    if missing:
        raise ValueError(f"rule {name}: annotations need {', '.join(missing)}")
    for key, template in annotations.items():
        try:
            prom_template(template)
        except ValueError as exc:
            raise ValueError(f"rule {name}: annotation {key}: {exc}") from None


# expressions ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Gauge:
    """The latest value of each series of a gauge, if not older than `max_age_s`."""

    name: str
    match: LabelFilter | None = None
    max_age_s: float = 300.0

    @property
    def text(self) -> str:
        return f"{self.name}{_fmt_labels(self.match)}"

    @property
    def promql(self) -> str:
        # max_age_s plays Prometheus' lookback delta (5 minutes by default)
        return prom_selector(self.name, self.match)

    def __call__(self, store: SeriesStore, now: float) -> dict[Labels, float]:
        out: dict[Labels, float] = {}
        for labels in store.keys(self.name):
            sample = store.latest_sample((self.name, labels))
            if sample is not None and matches(labels, self.match) and now - sample[0] <= self.max_age_s:
                out[labels] = sample[1]
        return out

    def over(self, store: SeriesStore, window_s: float, now: float) -> dict[Labels, Points]:
        out: dict[Labels, Points] = {}
        for labels in store.keys(self.name):
            if matches(labels, self.match):
                points = store.values((self.name, labels), window_s, now)
                if points:
                    out[labels] = points
        return out


@dataclass(frozen=True, slots=True)
class Rate:
    """sum by (by) (rate(name{match}[window_s])); `by=None` keeps every label."""

    name: str
    window_s: float
    match: LabelFilter | None = None
    by: tuple[str, ...] | None = None

    @property
    def text(self) -> str:
        return f"rate({self.name}{_fmt_labels(self.match)}[{self.window_s:g}s])"

    @property
    def promql(self) -> str:
        return _sum_by(self.by, f"rate({prom_selector(self.name, self.match)}"
                                f"[{prom_duration(self.window_s)}])")

    def __call__(self, store: SeriesStore, now: float) -> dict[Labels, float]:
        sums = _sum_increase(store, self.name, self.match, self.by, self.window_s, now)
        return {g: inc / self.window_s for g, inc in sums.items()}


@dataclass(frozen=True, slots=True)
class Ratio:
    """sum by (by) increase(numerator{filter}) / sum by (by) increase(denominator{filter});
    a group without denominator growth (no traffic) is left out."""

    numerator: str
    denominator: str
    window_s: float
    numerator_filter: LabelFilter | None = None
    denominator_filter: LabelFilter | None = None
    by: tuple[str, ...] | None = ("deployment",)

    @property
    def text(self) -> str:
        return (f"increase({self.numerator}{_fmt_labels(self.numerator_filter)}[{self.window_s:g}s]) / "
                f"increase({self.denominator}{_fmt_labels(self.denominator_filter)}[{self.window_s:g}s])")

    @property
    def promql(self) -> str:
        """`(num or 0 * den) / den`: a group whose numerator has no series (no error yet)
        reads 0, as `counts` does, instead of vanishing from the division. A group without
        denominator growth is 0/0 = NaN in PromQL, which no comparison passes: left out here."""
        w = prom_duration(self.window_s)
        num = _sum_by(self.by, f"rate({prom_selector(self.numerator, self.numerator_filter)}[{w}])")
        den = _sum_by(self.by, f"rate({prom_selector(self.denominator, self.denominator_filter)}[{w}])")
        return f"({num} or 0 * {den}) / {den}"

    def counts(self, store: SeriesStore, now: float) -> dict[Labels, tuple[float, float]]:
        """(numerator, denominator) increases per group with denominator growth."""
        num = _sum_increase(store, self.numerator, self.numerator_filter, self.by, self.window_s, now)
        den = _sum_increase(store, self.denominator, self.denominator_filter, self.by, self.window_s, now)
        return {g: (num.get(g, 0.0), d) for g, d in den.items() if d > 0}

    def __call__(self, store: SeriesStore, now: float) -> dict[Labels, float]:
        return {g: n / d for g, (n, d) in self.counts(store, now).items()}


def bucket_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile over (upper bound, cumulative count) pairs: linear
    interpolation inside the bucket holding rank q·total; the +Inf bucket answers the
    highest finite bound. NaN without a +Inf bucket or without observations."""
    ordered = sorted(buckets)
    if len(ordered) < 2 or ordered[-1][0] != math.inf:
        return math.nan
    counts: list[float] = []
    running = 0.0
    for _, c in ordered:  # counts read at slightly different times may dip: keep them monotonic
        running = max(running, c)
        counts.append(running)
    total = counts[-1]
    if total <= 0:
        return math.nan
    rank = q * total
    b = next(i for i, c in enumerate(counts) if c >= rank)
    if b == len(ordered) - 1:
        return ordered[-2][0]
    upper = ordered[b][0]
    if b == 0 and upper <= 0:
        return upper
    lower, below = (0.0, 0.0) if b == 0 else (ordered[b - 1][0], counts[b - 1])
    in_bucket = counts[b] - below
    return upper if in_bucket <= 0 else lower + (upper - lower) * (rank - below) / in_bucket


@dataclass(frozen=True, slots=True)
class HistogramQuantile:
    """histogram_quantile(q, sum by (by, le) (increase(buckets{match}[window_s])))."""

    q: float
    bucket_counter: str
    window_s: float
    match: LabelFilter | None = None
    by: tuple[str, ...] = ("deployment",)

    @property
    def text(self) -> str:
        return f"p{self.q * 100:g}({self.bucket_counter}{_fmt_labels(self.match)}[{self.window_s:g}s])"

    @property
    def promql(self) -> str:
        rated = f"rate({prom_selector(self.bucket_counter, self.match)}[{prom_duration(self.window_s)}])"
        return f"histogram_quantile({prom_number(self.q)}, {_sum_by((*self.by, 'le'), rated)})"

    def __call__(self, store: SeriesStore, now: float) -> dict[Labels, float]:
        sums = _sum_increase(store, self.bucket_counter, self.match, (*self.by, "le"), self.window_s, now)
        per_group: dict[Labels, Points] = {}
        for labels, count in sums.items():
            le = dict(labels).get("le")
            if le is None:
                continue
            g = tuple(kv for kv in labels if kv[0] != "le")
            per_group.setdefault(g, []).append((float(le), count))
        out: dict[Labels, float] = {}
        for g, buckets in per_group.items():
            value = bucket_quantile(self.q, buckets)
            if not math.isnan(value):
                out[g] = value
        return out


def gauge(name: str, match: LabelFilter | None = None, max_age_s: float = 300.0) -> Gauge:
    return Gauge(name, match, max_age_s)


def rate(name: str, window_s: float, match: LabelFilter | None = None,
         by: tuple[str, ...] | None = None) -> Rate:
    return Rate(name, window_s, match, by)


def ratio(
    numerator_counter: str, denominator_counter: str, window_s: float, *,
    numerator_filter: LabelFilter | None = None, denominator_filter: LabelFilter | None = None,
    by: tuple[str, ...] | None = ("deployment",),
) -> Ratio:
    return Ratio(numerator_counter, denominator_counter, window_s, numerator_filter, denominator_filter, by)


def histogram_quantile(q: float, bucket_counter_name: str, window_s: float, *,
                       match: LabelFilter | None = None,
                       by: tuple[str, ...] = ("deployment",)) -> HistogramQuantile:
    if not 0.0 <= q <= 1.0:
        raise ValueError("q must lie in [0, 1]")
    return HistogramQuantile(q, bucket_counter_name, window_s, match, by)


# threshold and slope -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Threshold:
    """`expr op threshold`, per label set; the lifecycle waits `for_s` before firing."""

    name: str
    expr: Expr
    threshold: float
    op: Op = ">"
    for_s: float = 0.0
    severity: Severity = "ticket"
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str]

    def __post_init__(self) -> None:
        _check_rule(self.name, self.severity, self.annotations)
        if self.op not in _OPS:
            raise ValueError(f"rule {self.name}: unknown op {self.op!r}")

    def prometheus(self) -> tuple[PromAlert, ...]:
        # every expression's PromQL binds tighter than a comparison (its own `or` is bracketed)
        return (PromAlert(f"{self.expr.promql} {self.op} {prom_number(self.threshold)}", self.for_s,
                          _prom_labels(self.severity, self.labels)),)

    def evaluate(self, store: SeriesStore, now: float) -> list[Evaluation]:
        holds = _OPS[self.op]
        text = _text(self.expr)
        return [
            Evaluation(dict(labels), holds(value, self.threshold), value,
                       f"{text} = {value:.4g} ({self.op} {self.threshold:g})")
            for labels, value in self.expr(store, now).items()
        ]


def least_squares_slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Slope (per second) of the least-squares line through (t, v); None under two distinct t."""
    n = len(points)
    if n < 2:
        return None
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    sxx = sum((t - mean_t) ** 2 for t, _ in points)
    if sxx <= 0:
        return None
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / sxx


@dataclass(frozen=True, kw_only=True, slots=True)
class RateOfChange:
    """The least-squares slope of a gauge over `window_s` compared with `threshold_per_s`
    (`op` "<" with a negative threshold watches a fall). Needs `min_points` points."""

    name: str
    expr: RangeExpr
    window_s: float
    threshold_per_s: float
    op: Op = ">"
    min_points: int = 3
    for_s: float = 0.0
    severity: Severity = "ticket"
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str]

    def __post_init__(self) -> None:
        _check_rule(self.name, self.severity, self.annotations)
        if self.op not in _OPS:
            raise ValueError(f"rule {self.name}: unknown op {self.op!r}")

    def prometheus(self) -> tuple[PromAlert, ...]:
        """`deriv()` is the same least-squares slope; `min_points` has no PromQL form (deriv
        needs two points)."""
        expr = (f"deriv({self.expr.promql}[{prom_duration(self.window_s)}]) {self.op} "
                f"{prom_number(self.threshold_per_s)}")
        return (PromAlert(expr, self.for_s, _prom_labels(self.severity, self.labels)),)

    def evaluate(self, store: SeriesStore, now: float) -> list[Evaluation]:
        holds = _OPS[self.op]
        out: list[Evaluation] = []
        for labels, points in self.expr.over(store, self.window_s, now).items():
            slope = least_squares_slope(points) if len(points) >= self.min_points else None
            if slope is not None:
                out.append(Evaluation(
                    dict(labels), holds(slope, self.threshold_per_s), slope,
                    f"slope of {_text(self.expr)} over {self.window_s:g}s = {slope:.4g}/s "
                    f"({self.op} {self.threshold_per_s:g}/s)"))
        return out


# EWMA anomaly --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EwmaState:
    """Baseline of one label set. `n` counts the samples absorbed into the baseline (the
    warm-up uses equal weights, then the EWMA takes over); an anomalous episode keeps its
    own running mean and M2 (`episode_*`) so it can become the baseline once accepted."""

    n: int = 0
    mean: float = 0.0
    var: float = 0.0
    last_t: float = -math.inf
    anomalous_since: float | None = None
    episode_n: int = 0
    episode_mean: float = 0.0
    episode_m2: float = 0.0
    last_z: float = 0.0
    last_anomaly: bool = False


@dataclass(kw_only=True, slots=True, eq=False)
class EwmaAnomaly:
    """A sample is anomalous when its z-score against an exponentially weighted mean and
    variance (of log(value) when `log`, so multiplicative noise such as latency is
    symmetric) passes `z`, in `direction`.

    - Warm-up: the first `warmup_samples` samples build the baseline with equal weights
      (an EWMA started from one sample underestimates the variance) and never fire.
    - Anomalous samples do not move the baseline, so a step change keeps firing instead of
      being learnt away within 1/alpha samples. An episode that lasts `adapt_after_s`
      (default 600 s; None: never) is accepted as the new normal: the episode's own mean
      and variance become the baseline and the alert resolves. One normal sample ends an
      episode (use the lifecycle's `for_s` against flapping).
    - `min_std` (in transformed units: ≈ a relative spread when `log`) keeps a flat series
      from firing on tiny wobbles.
    - `evaluate` feeds each label set's current value at most once per `sample_every_s`
      (and once per `now`), so call it on a steady cadence: every call is a sample.

    Mutable part: `states` (label set → EwmaState), updated by `evaluate`; states not fed
    for `forget_after_s` are dropped. `evaluate_step` is the pure core.

    PromQL has no EWMA z-score: `standin_promql` (held `standin_for_s`) is what Prometheus
    gets instead, declared beside the rule; empty: the rule is not exported.
    """

    name: str
    expr: Expr
    alpha: float = 0.05
    z: float = 4.0
    warmup_samples: int = 30
    log: bool = True
    min_std: float = 0.01
    adapt_after_s: float | None = 600.0
    direction: Literal["up", "down", "both"] = "both"
    sample_every_s: float = 0.0
    forget_after_s: float = 86_400.0
    log_floor: float = 1e-9
    for_s: float = 0.0
    severity: Severity = "ticket"
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str]
    standin_promql: str = ""
    standin_for_s: float = 0.0
    states: dict[Labels, EwmaState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_rule(self.name, self.severity, self.annotations)
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"rule {self.name}: alpha must lie in (0, 1]")
        if self.z <= 0 or self.min_std <= 0:
            raise ValueError(f"rule {self.name}: z and min_std must be positive")

    def prometheus(self) -> tuple[PromAlert, ...]:
        if not self.standin_promql:
            return ()
        return (PromAlert(self.standin_promql, self.standin_for_s,
                          _prom_labels(self.severity, self.labels), exact=False),)

    def transform(self, value: float) -> float:
        return math.log(max(value, self.log_floor)) if self.log else value

    def evaluate_step(self, state: EwmaState, value: float, now: float) -> tuple[EwmaState, bool, float]:
        """Feed one sample: (next state, anomalous, z-score against the baseline)."""
        x = self.transform(value)
        if state.n < self.warmup_samples:  # equal-weight (Welford) mean and variance
            n = state.n + 1
            delta = x - state.mean
            mean = state.mean + delta / n
            var = (state.var * state.n + delta * (x - mean)) / n
            return EwmaState(n=n, mean=mean, var=var, last_t=now), False, 0.0
        std = max(math.sqrt(state.var), self.min_std)
        z = (x - state.mean) / std
        anomalous = (z > self.z if self.direction == "up" else
                     z < -self.z if self.direction == "down" else abs(z) > self.z)
        if not anomalous:
            delta = x - state.mean
            incr = self.alpha * delta
            return EwmaState(n=state.n + 1, mean=state.mean + incr,
                             var=(1 - self.alpha) * (state.var + delta * incr),
                             last_t=now, last_z=z), False, z
        since = now if state.anomalous_since is None else state.anomalous_since
        en = state.episode_n + 1
        edelta = x - state.episode_mean
        emean = state.episode_mean + edelta / en
        em2 = state.episode_m2 + edelta * (x - emean)
        if self.adapt_after_s is not None and now - since >= self.adapt_after_s:
            var = em2 / en if en >= 2 else state.var  # accept the episode as the new normal
            z_new = (x - emean) / max(math.sqrt(var), self.min_std)
            return EwmaState(n=state.n + 1, mean=emean, var=var, last_t=now, last_z=z_new), False, z_new
        return replace(state, last_t=now, anomalous_since=since, episode_n=en, episode_mean=emean,
                       episode_m2=em2, last_z=z, last_anomaly=True), True, z

    def evaluate(self, store: SeriesStore, now: float) -> list[Evaluation]:
        out: list[Evaluation] = []
        text = _text(self.expr)
        for labels, value in self.expr(store, now).items():
            state = self.states.get(labels, EwmaState())
            if now > state.last_t and now - state.last_t >= self.sample_every_s:
                state, _, _ = self.evaluate_step(state, value, now)
                self.states[labels] = state
            if state.n < self.warmup_samples:
                description = f"{text} = {value:.4g} (warming up: {state.n}/{self.warmup_samples})"
            else:
                base = math.exp(state.mean) if self.log else state.mean
                description = (f"{text} = {value:.4g}, z = {state.last_z:+.1f} "
                               f"against a baseline of {base:.4g}")
            out.append(Evaluation(dict(labels), state.last_anomaly, value, description))
        for labels in [k for k, s in self.states.items() if now - s.last_t > self.forget_after_s]:
            del self.states[labels]
        return out


# burn rates ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BurnWindow:
    """Fire `severity` when the burn rate passes `factor` over both windows."""

    severity: Severity
    long_s: float
    short_s: float
    factor: float


# the Google SRE workbook's table (chapter "Alerting on SLOs", multiwindow, multi-burn-rate)
SRE_WINDOWS: tuple[BurnWindow, ...] = (
    BurnWindow("page", 3_600.0, 300.0, 14.4),
    BurnWindow("page", 6 * 3_600.0, 1_800.0, 6.0),
    BurnWindow("ticket", 86_400.0, 7_200.0, 3.0),
    BurnWindow("ticket", 3 * 86_400.0, 6 * 3_600.0, 1.0),
)

Counts = Callable[[float], dict[Labels, tuple[float, float]]]  # window_s -> {group: (bad, total)}


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86_400.0), ("h", 3_600.0), ("m", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _burn_evaluations(
    windows: Sequence[BurnWindow], slo_target: float, counts: Counts, min_requests: float,
) -> list[Evaluation]:
    """One Evaluation per (group, severity among `windows`), active when any of that
    severity's window pairs burns faster than its factor over both windows while its long
    window holds at least `min_requests` requests (a handful of errors at low traffic is no
    burn). The value of an active one is the long window's burn of the first pair (in
    `windows` order) that fires, which is what PromQL's `or` of the pairs yields; of an
    inactive one, the highest burn sustained over both windows of a pair."""
    budget = 1.0 - slo_target
    lengths = sorted({w for bw in windows for w in (bw.long_s, bw.short_s)})
    burns: dict[float, dict[Labels, tuple[float, float]]] = {}  # window -> {group: (burn, total)}
    groups: dict[Labels, None] = {}
    for length in lengths:
        per = {g: (bad / total / budget, total) for g, (bad, total) in counts(length).items()
               if total > 0}
        burns[length] = per
        groups.update(dict.fromkeys(per))
    severities = list(dict.fromkeys(w.severity for w in windows))
    out: list[Evaluation] = []
    for g in groups:
        for severity in severities:
            parts: list[str] = []
            fired: float | None = None
            sustained: list[float] = []
            for w in windows:
                if w.severity != severity:
                    continue
                long_b, long_n = burns[w.long_s].get(g, (0.0, 0.0))
                short_b = burns[w.short_s].get(g, (0.0, 0.0))[0]
                enough = long_n >= min_requests
                held = enough and long_b > w.factor and short_b > w.factor
                sustained.append(min(long_b, short_b))
                if held and fired is None:
                    fired = long_b
                few = "" if enough else f" (only {long_n:.0f} requests in {_duration(w.long_s)})"
                parts.append(f"{_duration(w.long_s)} {long_b:.3g}x & {_duration(w.short_s)} {short_b:.3g}x "
                             f"{'>' if held else 'vs'} {w.factor:g}x{' FIRED' if held else ''}{few}")
            value = fired if fired is not None else max(sustained, default=0.0)
            out.append(Evaluation(dict(g) | {"severity": severity}, fired is not None, value,
                                  f"error budget burn ({severity}): " + "; ".join(parts)))
    return out


def _burn_promql(
    windows: Sequence[BurnWindow], slo_target: float, severity: str,
    bad_ratio: Callable[[float], str], total: Callable[[float], str], min_requests: float,
) -> str:
    """The PromQL of `_burn_evaluations` for one severity: per pair `long burn > factor and
    short burn > factor [and long total >= min]`, the pairs joined by `or`."""
    budget = prom_number(1.0 - slo_target)
    pairs = []
    for w in windows:
        if w.severity != severity:
            continue
        factor = prom_number(w.factor)
        terms = [f"({bad_ratio(w.long_s)}) / {budget} > {factor}",
                 f"({bad_ratio(w.short_s)}) / {budget} > {factor}"]
        if min_requests > 0:
            terms.append(f"{total(w.long_s)} >= {prom_number(min_requests)}")
        pairs.append("(" + " and ".join(terms) + ")")
    return " or ".join(pairs)


def _check_slo(name: str, slo_target: float, windows: Sequence[BurnWindow], min_requests: float) -> None:
    if not 0.0 < slo_target < 1.0:
        raise ValueError(f"rule {name}: slo_target must lie in (0, 1)")
    if not windows:
        raise ValueError(f"rule {name}: needs at least one burn window")
    if not min_requests >= 0:
        raise ValueError(f"rule {name}: min_requests must be >= 0")


def _le(bound: float) -> str:
    """A bucket bound as prometheus_client writes the `le` label (floatToGoString)."""
    if math.isinf(bound):
        return "+Inf"
    return repr(float(bound))


@dataclass(frozen=True, kw_only=True, slots=True)
class BurnRate:
    """Availability SLO: burn = (errors / total over a window) / (1 − slo_target). Emits,
    per label set of `by`, one Evaluation labelled severity=page and one severity=ticket
    (whatever severities `windows` names); the description lists every window pair and
    which fired. Errors and total may be the same counter with different filters."""

    name: str
    errors_counter: str
    total_counter: str
    slo_target: float = 0.999
    error_filter: LabelFilter | None = None
    total_filter: LabelFilter | None = None
    by: tuple[str, ...] = ("deployment",)
    windows: tuple[BurnWindow, ...] = SRE_WINDOWS
    min_requests: float = 0.0  # a pair fires only with this many requests in its long window
    for_s: float = 0.0
    severity: Severity = "page"
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str]

    def __post_init__(self) -> None:
        _check_rule(self.name, self.severity, self.annotations)
        _check_slo(self.name, self.slo_target, self.windows, self.min_requests)

    def ratio(self, window_s: float) -> Ratio:
        return Ratio(self.errors_counter, self.total_counter, window_s,
                     self.error_filter, self.total_filter, self.by)

    def counts(self, store: SeriesStore, window_s: float, now: float) -> dict[Labels, tuple[float, float]]:
        return self.ratio(window_s).counts(store, now)

    def evaluate(self, store: SeriesStore, now: float) -> list[Evaluation]:
        return _burn_evaluations(self.windows, self.slo_target, lambda w: self.counts(store, w, now),
                                 self.min_requests)

    def prometheus(self) -> tuple[PromAlert, ...]:
        def total(window_s: float) -> str:
            selector = prom_selector(self.total_counter, self.total_filter)
            return _sum_by(self.by, f"increase({selector}[{prom_duration(window_s)}])")

        return tuple(
            PromAlert(_burn_promql(self.windows, self.slo_target, severity,
                                   lambda w: self.ratio(w).promql, total, self.min_requests),
                      self.for_s, _prom_labels(severity, self.labels))
            for severity in dict.fromkeys(w.severity for w in self.windows))


@dataclass(frozen=True, kw_only=True, slots=True)
class LatencyBurnRate:
    """Latency SLO: a request is bad when slower than `threshold_s`: bad = count −
    bucket{le=threshold_s}. `threshold_s` should be a bucket bound; otherwise the largest
    bound below it is used (more requests count as bad: the conservative side)."""

    name: str
    bucket_counter: str
    count_counter: str
    threshold_s: float
    slo_target: float = 0.99
    match: LabelFilter | None = None
    by: tuple[str, ...] = ("deployment",)
    windows: tuple[BurnWindow, ...] = SRE_WINDOWS
    min_requests: float = 0.0
    for_s: float = 0.0
    severity: Severity = "page"
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str]

    def __post_init__(self) -> None:
        _check_rule(self.name, self.severity, self.annotations)
        _check_slo(self.name, self.slo_target, self.windows, self.min_requests)

    def counts(self, store: SeriesStore, window_s: float, now: float) -> dict[Labels, tuple[float, float]]:
        totals = _sum_increase(store, self.count_counter, self.match, self.by, window_s, now)
        buckets = _sum_increase(store, self.bucket_counter, self.match, (*self.by, "le"), window_s, now)
        good: dict[Labels, tuple[float, float]] = {}  # group -> (bound used, count)
        for labels, count in buckets.items():
            le = dict(labels).get("le")
            if le is None:
                continue
            bound = float(le)
            if bound > self.threshold_s and not math.isclose(bound, self.threshold_s, rel_tol=1e-9):
                continue
            g = tuple(kv for kv in labels if kv[0] != "le")
            if g not in good or bound > good[g][0]:
                good[g] = (bound, count)
        return {g: (max(0.0, total - good.get(g, (0.0, 0.0))[1]), total)
                for g, total in totals.items() if total > 0}

    def evaluate(self, store: SeriesStore, now: float) -> list[Evaluation]:
        return _burn_evaluations(self.windows, self.slo_target, lambda w: self.counts(store, w, now),
                                 self.min_requests)

    def prometheus(self) -> tuple[PromAlert, ...]:
        """Bad = count − bucket{le=threshold_s}: exact when threshold_s is a bucket bound
        (written as prometheus_client writes `le`); otherwise Prometheus finds no bucket."""
        le = {**(self.match or {}), "le": _le(self.threshold_s)}

        def rated(name: str, match: LabelFilter | None, window_s: float) -> str:
            return _sum_by(self.by, f"rate({prom_selector(name, match)}[{prom_duration(window_s)}])")

        def bad_ratio(w: float) -> str:
            count = rated(self.count_counter, self.match, w)
            return f"({count} - {rated(self.bucket_counter, le, w)}) / {count}"

        def total(w: float) -> str:
            selector = prom_selector(self.count_counter, self.match)
            return _sum_by(self.by, f"increase({selector}[{prom_duration(w)}])")

        return tuple(
            PromAlert(_burn_promql(self.windows, self.slo_target, severity, bad_ratio, total,
                                   self.min_requests),
                      self.for_s, _prom_labels(severity, self.labels))
            for severity in dict.fromkeys(w.severity for w in self.windows))
