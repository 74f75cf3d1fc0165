"""The risk example's inference-path cascade: the logistic regression answers, a router sends
the transactions it is likely wrong about to gradient boosting.

    cheap      the served `RiskModel` (model.py): a logistic regression, ~6 µs for one
               transaction on this 2-core VM
    expensive  sklearn's HistGradientBoostingClassifier on the same inputs (`MODEL_FEATURES`),
               trained from labelled rows; ~1.3–1.8 ms for one transaction (most of it a fixed
               cost per call: 200 trees, each called from Python), ~8 µs per extra row
    router     a small logistic regression on the same inputs plus the cheap probability p and
               its confidence |p − 0.5|, trained to predict "the cheap decision is wrong"
               (p ≥ DECISION_AT disagrees with the label); escalate when its score ≥ the
               threshold

The threshold comes from `policies.cascade`: the cost/quality curve on labelled rows the
models did not train on, and the cheapest point whose AUC is within `max_auc_loss` of
expensive-only (AUC, because a risk score is used at two cutoffs, review and decline, and
with ~6 % fraud every model's accuracy sits near 94 %; see that module for the rule).

Labelled rows. The models need the inputs as they were when the transaction was scored, and
its true label. steadyserve records neither inputs nor features: a request record
(store/records.py) holds the deployment, handler, version, status, latency and the
prediction; a feedback item (store/feedback.py) holds the request id and a correction. The
account's features at scoring time are kept nowhere either: the feature store holds the
current row, and a fraud label usually arrives with a chargeback that has changed that row
since, so rebuilding inputs from today's row would leak the label into them. Hence:

* `labelled_rows(rows, transactions, labels)` — the rows as the service saw them, e.g. from
  the operator's own transaction log;
* `labelled_from_feedback(items, scored)` — feedback items (`FeedbackStore.of_request`,
  `RecordStore.feedback_joined`) joined by request id to such a log; the label is the
  correction, read as the feedback summary reads it (`is_positive`);
* `generated_feedback()` — what the example trains on: generated transactions on the same
  accounts, labelled, standing in for feedback.

The generated feedback. On `data.generate_transactions()` the logistic regression is the true
model family (the labels are a logistic function of exactly its inputs: its held-out AUC is
0.8568, the hidden function's own 0.8571) and gradient boosting only loses (0.846): a cascade
there rightly escalates nothing (benchmarks/cascade.py shows it). The feedback labels add two
fraud patterns the deployed linear model cannot express, both interactions
(`EMERGING_PATTERNS`): card testing (small amounts at gift cards, crypto or electronics) and
account takeover (a young account spending far above its history). Gradient boosting trained
on the feedback finds them; the router learns where the logistic regression misses them.

Nothing is pickled or saved: `build` runs at the replica's start when the cascade is turned
on — 100,000 generated rows, gradient boosting (200 iterations) and the router fitted on
60,000, each path timed, the threshold chosen on 20,000 — 3–4 s on one quiet core (up to
~14 s measured while the 2-core VM was busy with other work). `measure_costs` times each path
on this CPU; the costs feed the curve.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ...policies import cascade as policy
from . import data
from .data import CATEGORY_INDEX, FloatArray
from .model import ACCOUNT_FEATURES, MODEL_FEATURES, RiskModel, _sigmoid, feature_matrix

BoolArray = npt.NDArray[np.bool_]

DECISION_AT: Final = 0.5  # the cheap answer is "fraud" from here (service.DECLINE_AT; a test pins it)
QUALITY_METRIC: Final = "auc"
DEFAULT_MAX_AUC_LOSS: Final = 0.005
ROUTER_FEATURES: Final = (*MODEL_FEATURES, "cheap_probability", "cheap_confidence")

FEEDBACK_SEED: Final = 20_240_613
N_FEEDBACK: Final = 100_000
#: shares of the generated feedback: fit the expensive model and the router / choose the
#: threshold / report the curve on (each model sees only its own part)
SPLIT: Final = (0.6, 0.2, 0.2)

#: pattern → log-odds added to `data.fraud_logit` in the generated feedback (see the docstring)
EMERGING_PATTERNS: Final[Mapping[str, float]] = {"card_testing": 4.0, "account_takeover": 3.5}
CARD_TESTING_CATEGORIES: Final = ("gift_cards", "crypto", "electronics")
CARD_TESTING_MAX_AMOUNT: Final = 15.0
TAKEOVER_MAX_AGE_DAYS: Final = 180
TAKEOVER_MIN_ZSCORE: Final = 2.5

EXPENSIVE_TRAINING: Final[Mapping[str, Any]] = {
    "max_iter": 200, "learning_rate": 0.1, "max_leaf_nodes": 31, "early_stopping": False,
    "random_state": 0,
}
ROUTER_TRAINING: Final[Mapping[str, Any]] = {"C": 1.0, "max_iter": 1000, "solver": "lbfgs"}


# --- labelled rows ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Labelled:
    """Model inputs (columns as `MODEL_FEATURES`) and true labels (fraud or not), one row each."""

    x: FloatArray
    label: BoolArray

    def __post_init__(self) -> None:
        if self.x.ndim != 2 or self.x.shape[1] != len(MODEL_FEATURES):
            raise ValueError(f"x must have {len(MODEL_FEATURES)} columns, got shape {self.x.shape}")
        if self.label.shape != (self.x.shape[0],):
            raise ValueError(f"{self.label.shape[0]} labels for {self.x.shape[0]} rows")

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def take(self, index: npt.NDArray[np.int64] | slice) -> Labelled:
        return Labelled(self.x[index], self.label[index])

    def split(self, shares: Sequence[float] = SPLIT) -> list[Labelled]:
        """Consecutive parts of the given shares (the rows are in random order already)."""
        cuts = np.floor(np.cumsum(shares) / sum(shares) * len(self)).astype(np.int64)
        starts = [0, *cuts[:-1].tolist()]
        return [self.take(slice(a, b)) for a, b in zip(starts, cuts.tolist(), strict=True)]


def inputs(rows: Sequence[Mapping[str, Any]], transactions: Sequence[Mapping[str, Any]]) -> FloatArray:
    """The model inputs (columns as MODEL_FEATURES) of transaction i against account row
    rows[i], as `RiskModel.score` builds them; transactions are validated already."""
    if len(rows) != len(transactions):
        raise ValueError(f"{len(rows)} account rows for {len(transactions)} transactions")
    account = {name: [float(r[name]) for r in rows] for name in ACCOUNT_FEATURES}
    x, _ = feature_matrix(account, [float(t["amount"]) for t in transactions],
                          [CATEGORY_INDEX[str(t["merchant_category"])] for t in transactions],
                          [int(t["hour"]) for t in transactions])
    return x


def labelled_rows(rows: Sequence[Mapping[str, Any]], transactions: Sequence[Mapping[str, Any]],
                  labels: Sequence[bool]) -> Labelled:
    """Training rows from what the service saw: transaction i, scored against the account row
    rows[i] (its features then, not now), was fraud when labels[i]."""
    if len(labels) != len(rows):
        raise ValueError(f"{len(labels)} labels for {len(rows)} rows")
    return Labelled(inputs(rows, transactions), np.array([bool(v) for v in labels], dtype=np.bool_))


def labelled_from_feedback(
    items: Iterable[Mapping[str, Any]],
    scored: Mapping[str, tuple[Mapping[str, Any], Mapping[str, Any]]],
    positive: str = "fraud",
) -> Labelled:
    """Training rows from feedback items whose request the caller logged: `scored` maps a
    request id to (the account row, the transaction) it was scored with. Items without a
    correction, or about a request not in `scored`, are skipped; a correction is a label as
    the feedback summary reads it (true, 1, "true", "1" or `positive` → fraud)."""
    from ...gateway.feedback_routes import is_positive

    rows: list[Mapping[str, Any]] = []
    transactions: list[Mapping[str, Any]] = []
    labels: list[bool] = []
    for item in items:
        inputs = scored.get(str(item.get("request_id")))
        if item.get("correction") is None or inputs is None:
            continue
        rows.append(inputs[0])
        transactions.append(inputs[1])
        labels.append(is_positive(item["correction"], positive))
    return labelled_rows(rows, transactions, labels)


def feedback_logit(accounts: data.Accounts, tx: data.Transactions) -> FloatArray:
    """`data.fraud_logit` plus the `EMERGING_PATTERNS` the linear model cannot express."""
    i = tx.account_index
    z = data.amount_zscore(tx.amount, accounts.amount_mean[i], accounts.amount_std[i])
    testing_categories = [CATEGORY_INDEX[c] for c in CARD_TESTING_CATEGORIES]
    card_testing = np.isin(tx.category, testing_categories) & (tx.amount < CARD_TESTING_MAX_AMOUNT)
    takeover = (accounts.account_age_days[i] < TAKEOVER_MAX_AGE_DAYS) & (z > TAKEOVER_MIN_ZSCORE)
    logit: FloatArray = (data.fraud_logit(accounts, tx)
                         + EMERGING_PATTERNS["card_testing"] * card_testing
                         + EMERGING_PATTERNS["account_takeover"] * takeover)
    return logit


def generated_feedback(n: int = N_FEEDBACK, seed: int = FEEDBACK_SEED, *, emerging: bool = True,
                       accounts: data.Accounts | None = None) -> Labelled:
    """Labelled transactions of the seeded accounts standing in for feedback (deterministic).
    `emerging=False` labels them with the generator's own function instead."""
    accounts = data.generate_accounts() if accounts is None else accounts
    tx = data.generate_transactions(accounts, n, seed)
    if emerging:
        probability = _sigmoid(feedback_logit(accounts, tx))
        fraud = np.random.default_rng(seed + 1).random(len(tx)) < probability
        tx = data.Transactions(tx.account_index, tx.amount, tx.category, tx.hour, fraud)
    i = tx.account_index
    account = {name: getattr(accounts, name)[i] for name in ACCOUNT_FEATURES}
    x, _ = feature_matrix(account, tx.amount, tx.category, tx.hour)
    return Labelled(x, tx.fraud.astype(np.bool_))


# --- the paths ----------------------------------------------------------------------------------

def cheap_probability(model: RiskModel, x: FloatArray) -> FloatArray:
    """The served model's probability of fraud (what `RiskModel.score` returns, without the
    explanation)."""
    return _sigmoid(model.contributions(x).sum(axis=1) + model.intercept)


def router_inputs(x: FloatArray, cheap_p: FloatArray) -> FloatArray:
    """Columns as ROUTER_FEATURES: the model inputs, p and |p − 0.5|."""
    return np.column_stack([x, cheap_p, np.abs(cheap_p - 0.5)])


@dataclass(frozen=True, slots=True)
class Router:
    """A standardised logistic regression reduced to arrays (like `RiskModel`)."""

    mean: FloatArray
    scale: FloatArray
    coef: FloatArray
    intercept: float

    @classmethod
    def fit(cls, x: FloatArray, cheap_p: FloatArray, label: BoolArray) -> Router:
        """Train on labelled rows: the target is "the cheap decision is wrong"."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        wrong = (cheap_p >= DECISION_AT) != label
        inputs = router_inputs(x, cheap_p)
        scaler = StandardScaler().fit(inputs)
        scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
        if wrong.all() or not wrong.any():  # one class: a constant score, nothing to learn
            rate = float(wrong.mean()) if wrong.size else 0.0
            clipped = min(max(rate, 1e-9), 1 - 1e-9)
            return cls(np.asarray(scaler.mean_, dtype=np.float64), scale,
                       np.zeros(inputs.shape[1]), math.log(clipped / (1 - clipped)))
        clf = LogisticRegression(C=ROUTER_TRAINING["C"], max_iter=ROUTER_TRAINING["max_iter"],
                                 solver=ROUTER_TRAINING["solver"])
        clf.fit((inputs - scaler.mean_) / scale, wrong)
        return cls(np.asarray(scaler.mean_, dtype=np.float64), np.asarray(scale, dtype=np.float64),
                   np.asarray(clf.coef_[0], dtype=np.float64), float(clf.intercept_[0]))

    def score(self, x: FloatArray, cheap_p: FloatArray) -> FloatArray:
        """The estimated probability that the cheap decision is wrong, per row."""
        z = (router_inputs(x, cheap_p) - self.mean) / self.scale @ self.coef + self.intercept
        return _sigmoid(np.asarray(z, dtype=np.float64))


@dataclass(frozen=True, slots=True)
class Routed:
    """One batch through the cascade."""

    probability: FloatArray  # the answer: the expensive path's where escalated, else the cheap one's
    escalated: BoolArray
    router_score: FloatArray | None  # None: not computed (cheap-only or expensive-only)


@dataclass(frozen=True, slots=True)
class Cascade:
    """The cheap model, the expensive one and the router; `threshold` as in policies.cascade
    (+inf: cheap-only, −inf: expensive-only, else escalate when router score ≥ it)."""

    cheap: RiskModel
    expensive: Any  # a fitted sklearn HistGradientBoostingClassifier
    router: Router
    threshold: float = math.inf

    def expensive_probability(self, x: FloatArray) -> FloatArray:
        return np.asarray(self.expensive.predict_proba(x)[:, 1], dtype=np.float64)

    def route(self, x: FloatArray) -> Routed:
        """Answer a batch: cheap for all, the router for all, expensive for the escalated."""
        n = x.shape[0]
        if self.threshold == policy.EXPENSIVE_ONLY:
            return Routed(self.expensive_probability(x) if n else np.zeros(0),
                          np.ones(n, dtype=np.bool_), None)
        probability = cheap_probability(self.cheap, x)
        if self.threshold == policy.CHEAP_ONLY:
            return Routed(probability, np.zeros(n, dtype=np.bool_), None)
        router_score = self.router.score(x, probability)
        escalated = router_score >= self.threshold
        if escalated.any():
            probability = probability.copy()
            probability[escalated] = self.expensive_probability(x[escalated])
        return Routed(probability, escalated, router_score)


def train_cascade(cheap: RiskModel, labelled: Labelled) -> Cascade:
    """Fit the expensive model and the router on labelled rows (threshold: cheap-only until
    one is chosen)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    if len(labelled) == 0 or labelled.label.all() or not labelled.label.any():
        raise ValueError("training needs labelled rows of both classes")
    expensive = HistGradientBoostingClassifier(**EXPENSIVE_TRAINING)
    expensive.fit(labelled.x, labelled.label)
    router = Router.fit(labelled.x, cheap_probability(cheap, labelled.x), labelled.label)
    return Cascade(cheap=cheap, expensive=expensive, router=router)


# --- costs and the curve --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Costs:
    """Measured time per request of each path, µs, for requests of `batch_size` rows."""

    cheap_us: float
    router_us: float
    expensive_us: float
    batch_size: int


def _time_per_row_us(fn: Any, batches: Sequence[FloatArray], min_s: float) -> float:
    """Median over rounds of (time for all batches / rows): one call per batch, as served."""
    rows = sum(b.shape[0] for b in batches)
    rounds: list[float] = []
    deadline = time.perf_counter() + min_s
    while len(rounds) < 3 or time.perf_counter() < deadline:
        started = time.perf_counter()
        for b in batches:
            fn(b)
        rounds.append((time.perf_counter() - started) / rows * 1e6)
    return float(np.median(rounds))


def measure_costs(cascade: Cascade, x: FloatArray, batch_size: int = 1, n_batches: int = 50,
                  min_s: float = 0.3) -> Costs:
    """Time each path on this CPU over `n_batches` batches of `batch_size` rows of `x` (the
    median of rounds lasting at least `min_s` in all per path). The inputs are built already:
    building them (and reading the account's row) is the same for every path."""
    if x.shape[0] < batch_size:
        raise ValueError(f"{x.shape[0]} rows for batches of {batch_size}")
    count = max(1, min(n_batches, x.shape[0] // batch_size))
    batches = [x[i * batch_size:(i + 1) * batch_size] for i in range(count)]
    probabilities = {id(b): cheap_probability(cascade.cheap, b) for b in batches}
    cheap_us = _time_per_row_us(lambda b: cheap_probability(cascade.cheap, b), batches, min_s)
    router_us = _time_per_row_us(lambda b: cascade.router.score(b, probabilities[id(b)]), batches, min_s)
    expensive_us = _time_per_row_us(cascade.expensive_probability, batches, min_s)
    return Costs(cheap_us, router_us, expensive_us, batch_size)


@dataclass(frozen=True, slots=True)
class Evaluated:
    """Each path's answers on labelled rows, ready for `policies.cascade`."""

    router_score: FloatArray
    cheap_p: FloatArray
    expensive_p: FloatArray
    label: BoolArray

    @property
    def cheap_correct(self) -> BoolArray:
        correct: BoolArray = (self.cheap_p >= DECISION_AT) == self.label
        return correct

    @property
    def expensive_correct(self) -> BoolArray:
        correct: BoolArray = (self.expensive_p >= DECISION_AT) == self.label
        return correct


def evaluate(cascade: Cascade, labelled: Labelled) -> Evaluated:
    """Run every path on every row (whatever the threshold) for the curve."""
    cheap_p = cheap_probability(cascade.cheap, labelled.x)
    return Evaluated(router_score=cascade.router.score(labelled.x, cheap_p), cheap_p=cheap_p,
                     expensive_p=cascade.expensive_probability(labelled.x), label=labelled.label)


def curve(evaluated: Evaluated, costs: Costs, steps: int = policy.DEFAULT_STEPS) -> policy.Curve:
    """The cost (µs per request) / quality curve of the router's thresholds."""
    return policy.cost_quality_curve(
        evaluated.router_score, evaluated.cheap_correct, evaluated.expensive_correct,
        costs.cheap_us, costs.expensive_us, router_cost=costs.router_us,
        cheap_probability=evaluated.cheap_p, expensive_probability=evaluated.expensive_p,
        label=evaluated.label, steps=steps)


@dataclass(frozen=True, slots=True)
class Tuned:
    """A trained cascade with its threshold chosen, and how."""

    cascade: Cascade
    choice: policy.Choice
    costs: Costs
    trained_s: float


def build(cheap: RiskModel, labelled: Labelled, *, threshold: float | None = None,
          max_auc_loss: float = DEFAULT_MAX_AUC_LOSS) -> Tuned:
    """Train on the first share of `labelled` (SPLIT), measure the costs, and choose the
    threshold on the second share (or serve `threshold` when given; the choice is still
    computed, for the log). The third share is left for reporting (benchmarks/cascade.py)."""
    started = time.perf_counter()
    fit, tune, _ = labelled.split()
    trained = train_cascade(cheap, fit)
    costs = measure_costs(trained, tune.x, batch_size=1, min_s=0.1)
    choice = policy.choose_threshold(curve(evaluate(trained, tune), costs), max_auc_loss,
                                     QUALITY_METRIC)
    chosen = choice.point.threshold if threshold is None else threshold
    return Tuned(Cascade(cheap, trained.expensive, trained.router, chosen), choice, costs,
                 time.perf_counter() - started)


__all__ = [
    "DECISION_AT",
    "EMERGING_PATTERNS",
    "ROUTER_FEATURES",
    "Cascade",
    "Costs",
    "Evaluated",
    "Labelled",
    "Routed",
    "Router",
    "Tuned",
    "build",
    "cheap_probability",
    "curve",
    "evaluate",
    "feedback_logit",
    "generated_feedback",
    "inputs",
    "labelled_from_feedback",
    "labelled_rows",
    "measure_costs",
    "train_cascade",
]
