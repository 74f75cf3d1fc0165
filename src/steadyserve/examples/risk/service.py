"""Real-time transaction risk scoring, as a bank runs it: database features + a small model.

Served by a bare `steadyserve run` as the deployment `risk`:

    POST /v1/deployments/risk/score
         {"transactions": [{"account_id": 42, "amount": 129.9, "merchant_category": "crypto",
                            "hour": 3}]}
    → one result per transaction: {"account_id", "score", "decision", "top_features",
                                   "model_version"}
    POST /v1/deployments/risk/score_cascade   (the same body; only with RISK_CASCADE_THRESHOLD)
    → one result per transaction: {"account_id", "score", "decision", "path", "router_score",
                                   "model_version"}
    POST /v1/deployments/risk/assess   (a pipeline: the memo through `minilm`, see `assess`)
         {"transaction": {"account_id": 42, "amount": 129.9, "merchant_category": "crypto",
                          "hour": 3, "memo": "gift cards for the tax office"}}
    POST /v1/deployments/risk/update_account {"account_id": 42, "amount": 50.0, "chargeback": true}
    POST /v1/deployments/risk/account {"account_id": 42}

The path of one score: the gateway's response cache (keyed per transaction, tagged
`account:<id>`) → this replica's batcher → `score` with up to 64 transactions → the account
rows through the read-through feature cache (one `SELECT … IN (…)` for the misses, retried,
503 when the database stays down) → the vectorised model → one result per transaction.

An update goes to the database first, then drops the account from this replica's feature
cache; the gateway drops its cached responses tagged `account:<id>` and broadcasts the
invalidation to every replica (`invalidate`).

Decisions (thresholds on the fraud probability, chosen on the generated traffic): below
REVIEW_AT (0.15) "approve" — about 96.6 % of transactions; from REVIEW_AT up to DECLINE_AT
(0.5) "review" by an analyst; from DECLINE_AT up "decline" — about 0.6 % of transactions, of
which about 68 % are fraud.

`score_cascade` is the inference-path cascade (cascade.py): the same logistic regression
answers, and the transactions a router thinks it gets wrong go to gradient boosting ("path":
"cheap" or "expensive"; "router_score": the router's estimate that the cheap answer is wrong,
null when the router did not run). Its answers carry no `top_features`: gradient boosting has
no exact explanation. It is off unless the deployment declares it (then 404 naming the
setting); on, the replica trains the expensive model and the router at start (3–4 s on a quiet
core, more on a busy machine; docs/cascade.md).

Environment: STEADYSERVE_DATA_DIR (default `.steadyserve`: the model file, the default
SQLite database), STEADYSERVE_DATABASE_URL (default `sqlite:///<data dir>/steadyserve.db`),
RISK_FEATURE_CACHE_BYTES (default 32 MiB; 0 turns the feature cache off),
RISK_CASCADE_THRESHOLD (unset: no cascade; "auto": the cheapest threshold whose held-out AUC
is within RISK_CASCADE_MAX_AUC_LOSS, default 0.005, of gradient boosting alone; a number in
[0, 1]: escalate when the router's score is at least that). A rollout may change them where
the deployment's `rollout_env` lists them; answers cached under the old threshold live out
their 60 s.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypedDict

import steadyserve
from steadyserve.cache import ReadThrough
from steadyserve.compose import gather
from steadyserve.errors import ClientError, ConfigError, NotFound
from steadyserve.store import DatabaseUnavailable

from . import cascade as risk_cascade
from .data import CATEGORY_NAMES, MERCHANT_CATEGORIES
from .features import MAX_ACCOUNT_ID, FeatureStore
from .model import RiskModel, load_or_train

log = logging.getLogger(__name__)

REVIEW_AT: Final = 0.15
DECLINE_AT: Final = 0.5
MAX_AMOUNT: Final = 1e9  # exclusive; amounts must also be > 0
DEFAULT_FEATURE_CACHE_BYTES: Final = 32 << 20
FEATURE_CACHE_TTL_S: Final = 60.0
# every feature row has the same columns: ~190 bytes as msgpack (measured 173 + updated_at).
# A constant spares encoding each row just to weigh it (it doubled the cost of a miss).
FEATURE_ROW_BYTES: Final = 192
CASCADE_AUTO: Final = "auto"


@dataclass(frozen=True, slots=True)
class CascadeSettings:
    """The cascade's knobs: a fixed threshold, or None to choose one (`auto`)."""

    threshold: float | None
    max_auc_loss: float = risk_cascade.DEFAULT_MAX_AUC_LOSS


def cascade_settings(env: Mapping[str, str]) -> CascadeSettings | None:
    """RISK_CASCADE_THRESHOLD and RISK_CASCADE_MAX_AUC_LOSS from `env`; None when the cascade
    is off (the threshold unset or empty). ConfigError on a value out of range."""
    raw = env.get("RISK_CASCADE_THRESHOLD", "").strip()
    if not raw:
        return None
    raw_loss = env.get("RISK_CASCADE_MAX_AUC_LOSS", "").strip()
    loss = risk_cascade.DEFAULT_MAX_AUC_LOSS
    if raw_loss:
        try:
            loss = float(raw_loss)
        except ValueError:
            loss = math.nan
        if not 0.0 <= loss <= 1.0:  # NaN fails too
            raise ConfigError(f"RISK_CASCADE_MAX_AUC_LOSS must be a number in [0, 1], got {raw_loss!r}")
    if raw.lower() == CASCADE_AUTO:
        return CascadeSettings(None, loss)
    try:
        threshold = float(raw)
    except ValueError:
        threshold = math.nan
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"RISK_CASCADE_THRESHOLD must be {CASCADE_AUTO!r} or a number in [0, 1], "
                          f"got {raw!r}")
    return CascadeSettings(threshold, loss)


class Transaction(TypedDict):
    """One transaction to score (the item type of `RiskScorer.score`)."""

    account_id: int
    amount: float
    merchant_category: str
    hour: int  # local hour of day, 0..23


class MemoTransaction(TypedDict):
    """A transaction with its free-text memo (the item of `RiskScorer.assess`)."""

    account_id: int
    amount: float
    merchant_category: str
    hour: int
    memo: str


# Phrasings of known scams: a memo close to one (cosine of MiniLM embeddings) raises the
# score. A fixed heuristic for the pipeline example, not a model trained on labelled memos.
SCAM_MEMOS: Final = (
    "gift cards to pay the IRS tax debt today",
    "urgent wire transfer to release lottery prize winnings",
    "guaranteed crypto investment returns, send now",
    "refund overpayment, please send the difference back",
    "stuck abroad and need money for a flight home",
)
MEMO_FLOOR: Final = 0.45  # similarity below this says nothing
MEMO_WEIGHT: Final = 6.0  # log-odds added per unit of similarity above the floor
MAX_MEMO_CHARS: Final = 1000


def with_memo(score: float, similarity: float) -> float:
    """The fraud probability after the memo: the model's log-odds plus MEMO_WEIGHT times the
    similarity's excess over MEMO_FLOOR (pure)."""
    p = min(max(score, 1e-9), 1 - 1e-9)
    logit = math.log(p / (1 - p)) + MEMO_WEIGHT * max(0.0, similarity - MEMO_FLOOR)
    return 1 / (1 + math.exp(-logit))


def _unit(vector: Any) -> list[float]:
    values = [float(v) for v in vector]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def decision(score: float) -> str:
    """approve below REVIEW_AT, decline from DECLINE_AT, review in between."""
    if score >= DECLINE_AT:
        return "decline"
    if score >= REVIEW_AT:
        return "review"
    return "approve"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_account_id(value: Any) -> ClientError | None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_ACCOUNT_ID:
        return ClientError(f"account_id must be an integer from 0 to {MAX_ACCOUNT_ID}, got {value!r}",
                           param="account_id")
    return None


def _check_amount(value: Any) -> ClientError | None:
    if not _is_number(value) or not 0.0 < float(value) < MAX_AMOUNT:  # NaN fails too
        return ClientError(f"amount must be a number > 0 and < {MAX_AMOUNT:.0e}, got {value!r}",
                           param="amount")
    return None


def _check_hour(value: Any) -> ClientError | None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 23:
        return ClientError(f"hour must be an integer from 0 to 23, got {value!r}", param="hour")
    return None


def validate_transaction(item: Any) -> ClientError | None:
    """The first problem of one transaction as a ClientError naming the field, or None.

    The gateway checks types already (the TypedDict schema); this checks ranges and the
    category table, and types again for callers that reach the replica directly."""
    if not isinstance(item, Mapping):
        return ClientError(f"a transaction must be an object, got {type(item).__name__}")
    missing = [name for name in Transaction.__annotations__ if name not in item]
    if missing:
        return ClientError(f"missing required field '{missing[0]}'", param=missing[0])
    error = (_check_account_id(item["account_id"]) or _check_amount(item["amount"])
             or _check_hour(item["hour"]))
    if error is not None:
        return error
    category = item["merchant_category"]
    if not isinstance(category, str) or category not in MERCHANT_CATEGORIES:
        return ClientError(f"merchant_category must be one of {', '.join(CATEGORY_NAMES)}; got {category!r}",
                           param="merchant_category")
    return None


def _raise_if(error: ClientError | None) -> None:
    if error is not None:
        raise error


class RiskScorer(steadyserve.Service):
    """Fraud risk of card transactions from account features kept in a database."""

    version = "1"

    store: FeatureStore
    model: RiskModel
    features: ReadThrough[int, dict[str, Any]]
    cascade: risk_cascade.Cascade | None = None

    def setup(self) -> None:
        """Open the feature store (seeding it on first start), load or train the model, and
        build the read-through feature cache."""
        data_dir = Path(os.environ.get("STEADYSERVE_DATA_DIR") or ".steadyserve")
        url = os.environ.get("STEADYSERVE_DATABASE_URL") or f"sqlite:///{data_dir / 'steadyserve.db'}"
        raw_bytes = os.environ.get("RISK_FEATURE_CACHE_BYTES", str(DEFAULT_FEATURE_CACHE_BYTES))
        try:
            cache_bytes = int(raw_bytes)
        except ValueError:
            raise ConfigError(f"RISK_FEATURE_CACHE_BYTES must be an integer, got {raw_bytes!r}") from None
        if cache_bytes < 0:
            raise ConfigError(f"RISK_FEATURE_CACHE_BYTES must be >= 0, got {cache_bytes}")
        settings = cascade_settings(os.environ)
        store = FeatureStore(url)
        try:
            inserted = store.ensure_seeded()
            model = load_or_train(data_dir)
            cascade = None if settings is None else train_cascade(model, settings)
        except BaseException:
            store.close()
            raise
        log.info("risk scorer ready", extra={"database": store.url, "seeded_rows": inserted,
                                             "model": str(model.path), "auc": round(model.auc, 4),
                                             "feature_cache_bytes": cache_bytes,
                                             "cascade": cascade is not None})
        self.configure(store, model, cache_bytes, cascade)

    def configure(self, store: FeatureStore, model: RiskModel, cache_bytes: int,
                  cascade: risk_cascade.Cascade | None = None) -> None:
        """Wire the parts (what `setup` does after opening them; tests pass their own)."""
        self._scam_vectors: list[list[float]] | None = None  # embedded on first `assess`
        self.store = store
        self.model = model
        self.cascade = cascade
        self.features = ReadThrough(
            name="risk_features", capacity_bytes=cache_bytes, ttl_s=FEATURE_CACHE_TTL_S,
            policy="tinylfu", retry_on=(DatabaseUnavailable,), attempts=3, backoff_s=0.05,
            size_of=lambda _row: FEATURE_ROW_BYTES, avg_entry_bytes=FEATURE_ROW_BYTES + 120,
        )

    def teardown(self) -> None:
        """Release the database connections."""
        store = getattr(self, "store", None)
        if store is not None:
            store.close()

    def _rows(self, account_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Feature rows of the known accounts among `account_ids`, through the feature cache."""
        return self.features.get_many(account_ids, load=self.store.get_many,
                                      tags=lambda account_id: [f"account:{account_id}"])

    def _known(self, transactions: list[Transaction]) -> tuple[list[Any], list[int], list[dict[str, Any]]]:
        """Results with the errors in their slots (ClientError for bad input, NotFound for an
        unknown account), the indices of the transactions to score, and their account rows."""
        results: list[Any] = [validate_transaction(t) for t in transactions]
        valid = [i for i, r in enumerate(results) if r is None]
        rows = self._rows([transactions[i]["account_id"] for i in valid]) if valid else {}
        known: list[int] = []
        for i in valid:
            account_id = transactions[i]["account_id"]
            if account_id in rows:
                known.append(i)
            else:
                results[i] = NotFound(f"unknown account {account_id}", param="account_id")
        return results, known, [rows[transactions[i]["account_id"]] for i in known]

    @steadyserve.handler(batch=True, max_batch_size=64, cache=True, cache_ttl_s=60,
                         cache_tags=("account:{account_id}",), affinity="account_id",
                         canary={"transactions": [{"account_id": 1, "amount": 10.0,
                                                   "merchant_category": "grocery", "hour": 12}]})
    def score(self, transactions: list[Transaction]) -> list[Any]:
        """One result per transaction, or a ClientError / NotFound instance in its slot (only
        that caller gets the error; the rest of the batch is scored). A database that stays
        down fails the whole batch with 503 (DependencyUnavailable)."""
        results, known, rows = self._known(transactions)
        scored = self.model.score(rows, [transactions[i] for i in known])
        for i, (probability, top) in zip(known, scored, strict=True):
            results[i] = {
                "account_id": transactions[i]["account_id"],
                "score": probability,
                "decision": decision(probability),
                "top_features": top,
                "model_version": self.version,
            }
        return results

    @steadyserve.handler(batch=True, max_batch_size=64, cache=True, cache_ttl_s=60,
                         cache_tags=("account:{account_id}",), affinity="account_id")
    def score_cascade(self, transactions: list[Transaction]) -> list[Any]:
        """`score` through the cascade: one {"account_id", "score", "decision", "path",
        "router_score", "model_version"} per transaction, errors in their slots as in
        `score`. NotFound for the whole batch when this deployment has no cascade (no canary
        for that reason: the deep health check must pass with the cascade off)."""
        cascade = self.cascade
        if cascade is None:
            raise NotFound("this deployment serves no cascade: set RISK_CASCADE_THRESHOLD "
                           f"({CASCADE_AUTO!r} or a number in [0, 1]) in its env",
                           param="transactions")
        results, known, rows = self._known(transactions)
        if not known:
            return results
        routed = cascade.route(risk_cascade.inputs(rows, [transactions[i] for i in known]))
        router = routed.router_score
        for k, i in enumerate(known):
            probability = float(routed.probability[k])
            results[i] = {
                "account_id": transactions[i]["account_id"],
                "score": probability,
                "decision": decision(probability),
                "path": "expensive" if routed.escalated[k] else "cheap",
                "router_score": None if router is None else float(router[k]),
                "model_version": self.version,
            }
        return results

    @steadyserve.handler(timeout_s=10)
    async def assess(self, transaction: MemoTransaction) -> dict[str, Any]:
        """The pipeline example (steadyserve.compose): two child calls at once, through the
        gateway — the memo to the embedding deployment (RISK_MEMO_DEPLOYMENT, default
        `minilm`), batched there with everyone's texts, and the transaction to this
        deployment's own `score` (batched, cached, on its database features) — then the
        memo's similarity to known scam phrasings raises the score (`with_memo`). Both carry
        this request's deadline, priority and credential; a failing branch fails the request
        with its error, prefixed with the branch's `deployment/handler: `. The deployment
        declares both (`calls = ["minilm", "risk"]`); without them `assess` answers 403."""
        memo = transaction.get("memo")
        if not isinstance(memo, str) or not 0 < len(memo) <= MAX_MEMO_CHARS:
            raise ClientError(f"memo must be a non-empty string of at most {MAX_MEMO_CHARS} "
                              "characters", param="transaction.memo")
        tx: Transaction = {"account_id": transaction["account_id"],
                           "amount": transaction["amount"],
                           "merchant_category": transaction["merchant_category"],
                           "hour": transaction["hour"]}
        _raise_if(validate_transaction(tx))
        embedder = self.deployment(os.environ.get("RISK_MEMO_DEPLOYMENT", "minilm"))
        scorer = self.deployment(os.environ.get("STEADYSERVE_DEPLOYMENT", "risk"))
        texts = [memo] if self._scam_vectors is not None else [memo, *SCAM_MEMOS]
        got = await gather({"memo": embedder.embed.prepare(texts=texts),
                                        "score": scorer.score.prepare(transactions=[tx])})
        vectors = [_unit(e["embedding"]) for e in got["memo"]]
        if self._scam_vectors is None:
            self._scam_vectors = vectors[1:]
        similarity = max(sum(a * b for a, b in zip(vectors[0], scam, strict=True))
                         for scam in self._scam_vectors)
        scored = got["score"][0]
        probability = with_memo(float(scored["score"]), similarity)
        return {"account_id": tx["account_id"], "score": probability,
                "decision": decision(probability), "base_score": scored["score"],
                "memo_similarity": round(similarity, 6), "top_features": scored["top_features"],
                "model_version": self.version}

    @steadyserve.handler(idempotent=False, invalidates=("account:{account_id}",))
    def update_account(self, account_id: int, amount: float, chargeback: bool = False,
                       hour: int = 12) -> dict[str, Any]:
        """Fold one transaction into the account's features (a transaction feed's write) and
        return them; this replica's cached row for the account is dropped."""
        _raise_if(_check_account_id(account_id) or _check_amount(amount) or _check_hour(hour))
        if not isinstance(chargeback, bool):
            raise ClientError(f"chargeback must be true or false, got {chargeback!r}", param="chargeback")
        try:
            row = self.store.apply_transaction(account_id, float(amount), chargeback, hour)
        finally:  # even when the write failed midway: never serve a row older than the database
            self.features.invalidate([f"account:{account_id}"])
        return row

    @steadyserve.handler(cache=True, cache_ttl_s=60, cache_tags=("account:{account_id}",),
                         affinity="account_id")
    def account(self, account_id: int) -> dict[str, Any]:
        """The features of one account (NotFound when it does not exist)."""
        _raise_if(_check_account_id(account_id))
        row = self._rows([account_id]).get(account_id)
        if row is None:
            raise NotFound(f"unknown account {account_id}", param="account_id")
        return dict(row)

    def invalidate(self, tags: list[str]) -> None:
        """Drop feature rows tagged with any of `tags` (e.g. "account:42") from this replica."""
        features = getattr(self, "features", None)
        if features is not None:
            features.invalidate(tags)

    def cache_stats(self) -> dict[str, Any]:
        """The feature cache's counters (hits, misses, loads, entries, bytes, …)."""
        return self.features.stats()


def train_cascade(model: RiskModel, settings: CascadeSettings) -> risk_cascade.Cascade:
    """Train the cascade on the generated feedback and set its threshold (at start)."""
    tuned = risk_cascade.build(model, risk_cascade.generated_feedback(),
                               threshold=settings.threshold, max_auc_loss=settings.max_auc_loss)
    point = tuned.choice.point
    log.info("risk cascade ready", extra={
        "threshold": tuned.cascade.threshold, "chosen": settings.threshold is None,
        "chosen_threshold": point.threshold, "escalated": round(point.escalated, 4),
        "cost_us": round(point.cost, 1), "auc": None if point.auc is None else round(point.auc, 4),
        "reason": tuned.choice.reason, "cheap_us": round(tuned.costs.cheap_us, 1),
        "expensive_us": round(tuned.costs.expensive_us, 1), "trained_s": round(tuned.trained_s, 2)})
    return tuned.cascade


__all__ = ["DECLINE_AT", "REVIEW_AT", "CascadeSettings", "RiskScorer", "Transaction", "cascade_settings",
           "decision", "train_cascade", "validate_transaction"]
