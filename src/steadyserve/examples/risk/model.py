"""The risk model: a standardised logistic regression, trained locally, explained exactly.

Inputs (`MODEL_FEATURES`, in order): the account's features from the feature store, the
transaction's amount, the amount's z-score against the account's history, a night flag and a
one-hot merchant category. Counts, ages and amounts enter as log1p (their effect saturates).

Because the model is linear in the log-odds, an explanation needs no sampling: with the
scaler's mean μ and scale σ and the coefficients w,

    logit = b + Σᵢ wᵢ · (xᵢ − μᵢ) / σᵢ

so each term is feature i's exact contribution, and the terms plus the intercept add up to
the logit. `RiskModel.score` returns the probability and the three largest terms.

The model is trained at a replica's first start on `data.generate_transactions()` (a few
seconds) and saved under the data directory as `risk-model-<hash>.npz`, where the hash
covers the generator's parameters, the feature list and the training settings: a change to
any of them trains a new file instead of loading a stale one. Two replicas starting together
may both train; each writes a private temporary file and renames it into place, so a reader
never sees half a file.

The file holds numbers and names only (`MODEL_ARRAYS`): the scaler's mean and scale, the
coefficients, the intercept, the feature list, the format and the AUC, read back with
`numpy.load(allow_pickle=False)`. Nothing in it can run code: whoever can write the data
directory can change scores, not take over the replica (a pickle or an object array is
refused, and the model trained again). Files of the pickle format that came before
(`risk-model-<hash>.joblib`) are never opened.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
import uuid
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypedDict

import numpy as np
import numpy.typing as npt

from . import data
from .data import CATEGORY_INDEX, CATEGORY_NAMES, FloatArray

log = logging.getLogger(__name__)

ACCOUNT_FEATURES: Final = ("tx_count", "amount_mean", "amount_std", "chargeback_rate",
                           "account_age_days", "country_risk", "night_share")
MODEL_FEATURES: Final = (*ACCOUNT_FEATURES, "amount", "amount_zscore", "night",
                         *(f"merchant_category={c}" for c in CATEGORY_NAMES))
LOG1P_FEATURES: Final = frozenset({"tx_count", "amount_mean", "amount_std", "account_age_days", "amount"})
TOP_CONTRIBUTIONS: Final = 3
HOLDOUT_SHARE: Final = 0.2  # of the generated transactions, kept out of training for the AUC
TRAINING: Final[Mapping[str, Any]] = {"C": 1.0, "max_iter": 1000, "solver": "lbfgs", "split_seed": 7}
MODEL_FORMAT: Final = 2  # bump when the saved file's layout changes (1: a joblib pickle)
MODEL_SUFFIX: Final = ".npz"
MODEL_ARRAYS: Final = ("format", "features", "mean", "scale", "coef", "intercept", "auc")


class Contribution(TypedDict):
    """One input's share of a score: its exact term in the logit, and its raw value."""

    name: str
    contribution: float
    value: float


Scored = tuple[float, list[Contribution]]


def model_fingerprint() -> str:
    """Hash of the generator parameters, feature list and training settings (the file name)."""
    import sklearn

    spec = repr((data.generator_fingerprint(), MODEL_FEATURES, sorted(LOG1P_FEATURES),
                 sorted(TRAINING.items()), HOLDOUT_SHARE, MODEL_FORMAT, sklearn.__version__))
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def model_path(data_dir: str | os.PathLike[str]) -> Path:
    """Where the model for the current code lives under the data directory."""
    return Path(data_dir) / f"risk-model-{model_fingerprint()}{MODEL_SUFFIX}"


def feature_matrix(
    account: Mapping[str, npt.ArrayLike],
    amount: npt.ArrayLike,
    category: npt.ArrayLike,
    hour: npt.ArrayLike,
) -> tuple[FloatArray, FloatArray]:
    """Model inputs and their raw values, one row per transaction, columns as MODEL_FEATURES.

    `account` maps each of ACCOUNT_FEATURES to one value per transaction (the account's);
    `category` holds indices into CATEGORY_NAMES. The second matrix is what an explanation
    shows: the amount in money, not its logarithm."""
    amounts = np.asarray(amount, dtype=np.float64)
    n = amounts.shape[0]
    raw = np.zeros((n, len(MODEL_FEATURES)), dtype=np.float64)
    for j, name in enumerate(ACCOUNT_FEATURES):
        raw[:, j] = np.asarray(account[name], dtype=np.float64)
    base = len(ACCOUNT_FEATURES)
    mean = raw[:, ACCOUNT_FEATURES.index("amount_mean")]
    std = raw[:, ACCOUNT_FEATURES.index("amount_std")]
    raw[:, base] = amounts
    raw[:, base + 1] = data.amount_zscore(amounts, mean, std)
    raw[:, base + 2] = data.is_night(np.asarray(hour, dtype=np.int64))
    raw[np.arange(n), base + 3 + np.asarray(category, dtype=np.int64)] = 1.0
    x = raw.copy()
    for j, name in enumerate(MODEL_FEATURES):
        if name in LOG1P_FEATURES:
            x[:, j] = np.log1p(np.maximum(raw[:, j], 0.0))
    return x, raw


def _sigmoid(logit: FloatArray) -> FloatArray:
    """1 / (1 + e^−x) without overflow for large |x|."""
    result: FloatArray = 0.5 * (1.0 + np.tanh(0.5 * logit))
    return result


@dataclass(frozen=True, slots=True)
class RiskModel:
    """A trained model reduced to arrays: scaler mean and scale, coefficients, intercept."""

    mean: FloatArray
    scale: FloatArray
    coef: FloatArray
    intercept: float
    auc: float  # on the held-out generated transactions
    path: Path | None = None

    @classmethod
    def from_pipeline(cls, pipeline: Any, auc: float, path: Path | None = None) -> RiskModel:
        """Take the fitted StandardScaler → LogisticRegression pipeline apart."""
        scaler, clf = pipeline[0], pipeline[-1]
        return cls(
            mean=np.asarray(scaler.mean_, dtype=np.float64),
            scale=np.asarray(scaler.scale_, dtype=np.float64),
            coef=np.asarray(clf.coef_[0], dtype=np.float64),
            intercept=float(clf.intercept_[0]),
            auc=auc,
            path=path,
        )

    def contributions(self, x: FloatArray) -> FloatArray:
        """Per-row, per-feature terms of the logit: coef × standardised value."""
        terms: FloatArray = (x - self.mean) / self.scale * self.coef
        return terms

    def score(
        self, rows: Sequence[Mapping[str, Any]], transactions: Sequence[Mapping[str, Any]]
    ) -> list[Scored]:
        """Score a batch: transaction i belongs to the account whose features are rows[i].

        Each transaction needs `amount`, `merchant_category` (a known name) and `hour`.
        Returns (probability of fraud, the TOP_CONTRIBUTIONS largest terms by magnitude)."""
        if len(rows) != len(transactions):
            raise ValueError(f"{len(rows)} account rows for {len(transactions)} transactions")
        if not rows:
            return []
        account = {name: [float(r[name]) for r in rows] for name in ACCOUNT_FEATURES}
        x, raw = feature_matrix(
            account,
            [float(t["amount"]) for t in transactions],
            [CATEGORY_INDEX[str(t["merchant_category"])] for t in transactions],
            [int(t["hour"]) for t in transactions],
        )
        terms = self.contributions(x)
        probability = _sigmoid(terms.sum(axis=1) + self.intercept)
        k = min(TOP_CONTRIBUTIONS, terms.shape[1])
        top = np.argsort(-np.abs(terms), axis=1, kind="stable")[:, :k]
        out: list[Scored] = []
        for i in range(len(rows)):
            explained: list[Contribution] = [
                {"name": MODEL_FEATURES[j], "contribution": float(terms[i, j]), "value": float(raw[i, j])}
                for j in top[i].tolist()
            ]
            out.append((float(probability[i]), explained))
        return out


def training_matrices(
    accounts: data.Accounts, tx: data.Transactions
) -> tuple[FloatArray, npt.NDArray[np.bool_]]:
    """The model inputs and labels of a generated transaction set."""
    i = tx.account_index
    account = {name: getattr(accounts, name)[i] for name in ACCOUNT_FEATURES}
    x, _ = feature_matrix(account, tx.amount, tx.category, tx.hour)
    return x, tx.fraud


def train(accounts: data.Accounts | None = None, tx: data.Transactions | None = None) -> tuple[Any, float]:
    """Fit StandardScaler → LogisticRegression on the generated set; return it and the AUC
    on a held-out share (HOLDOUT_SHARE) of the transactions."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    accounts = data.generate_accounts() if accounts is None else accounts
    tx = data.generate_transactions(accounts) if tx is None else tx
    x, y = training_matrices(accounts, tx)
    order = np.random.default_rng(int(TRAINING["split_seed"])).permutation(len(y))
    cut = int(len(y) * (1.0 - HOLDOUT_SHARE))
    fit, held = order[:cut], order[cut:]
    pipeline = make_pipeline(
        StandardScaler(),
        LogisticRegression(C=TRAINING["C"], max_iter=TRAINING["max_iter"], solver=TRAINING["solver"]),
    )
    pipeline.fit(x[fit], y[fit])
    auc = float(roc_auc_score(y[held], pipeline.predict_proba(x[held])[:, 1]))
    return pipeline, auc


def save(model: RiskModel, path: Path) -> None:
    """Write the model's arrays (`MODEL_ARRAYS`, no pickle) atomically: a private temporary
    file in the same directory, flushed to disk, then a rename over the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tmp.open("wb") as f:  # a file object: savez would add ".npz" to a path's name
            np.savez(  # the names are MODEL_ARRAYS (a test pins them)
                f, allow_pickle=False,
                format=np.array(MODEL_FORMAT, dtype=np.int64),
                features=np.array(MODEL_FEATURES, dtype=np.str_),
                mean=np.asarray(model.mean, dtype=np.float64),
                scale=np.asarray(model.scale, dtype=np.float64),
                coef=np.asarray(model.coef, dtype=np.float64),
                intercept=np.array(model.intercept, dtype=np.float64),
                auc=np.array(model.auc, dtype=np.float64),
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _Unusable(Exception):
    """The model file exists but is not one this code wrote for these features."""


def _read(path: Path) -> RiskModel:
    """Parse a model file without ever unpickling: raises FileNotFoundError or _Unusable."""
    try:
        saved = np.load(path, allow_pickle=False)
        if not isinstance(saved, np.lib.npyio.NpzFile):  # a lone .npy array
            raise _Unusable("not an .npz archive")
        with saved:
            if sorted(saved.files) != sorted(MODEL_ARRAYS):
                raise _Unusable(f"arrays {sorted(saved.files)}, expected {sorted(MODEL_ARRAYS)}")
            # reading an object array (pickled data inside the archive) raises ValueError here
            arrays = {name: saved[name] for name in MODEL_ARRAYS}
    except FileNotFoundError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        # "Cannot load file containing pickled data when allow_pickle=False" lands here
        raise _Unusable(str(exc)) from exc
    n = len(MODEL_FEATURES)
    fmt, features = arrays["format"], arrays["features"]
    if fmt.shape != () or fmt.dtype.kind != "i" or int(fmt) != MODEL_FORMAT:
        raise _Unusable(f"format {fmt!r}, expected {MODEL_FORMAT}")
    if features.dtype.kind != "U" or tuple(features.tolist()) != MODEL_FEATURES:
        raise _Unusable("another feature list")
    for name, shape in (("mean", (n,)), ("scale", (n,)), ("coef", (n,)), ("intercept", ()), ("auc", ())):
        a = arrays[name]
        if a.dtype != np.float64 or a.shape != shape or not np.isfinite(a).all():
            raise _Unusable(f"{name}: {a.dtype} {a.shape}, expected finite float64 {shape}")
    if not (arrays["scale"] > 0).all():
        raise _Unusable("scale must be > 0")
    return RiskModel(mean=arrays["mean"], scale=arrays["scale"], coef=arrays["coef"],
                     intercept=float(arrays["intercept"]), auc=float(arrays["auc"]), path=path)


def _load(path: Path) -> RiskModel | None:
    """The saved model, or None when the file is missing or unusable (then it is retrained)."""
    try:
        return _read(path)
    except FileNotFoundError:
        return None
    except _Unusable as exc:  # a truncated, foreign or older file: train a fresh one over it
        log.warning("risk model file is unusable, training again",
                    extra={"path": str(path), "error": str(exc)})
        return None


def load_or_train(data_dir: str | os.PathLike[str]) -> RiskModel:
    """Load this code's model from the data directory, or train and save it (first start)."""
    path = model_path(data_dir)
    model = _load(path)
    if model is not None:
        return model
    started = time.perf_counter()
    pipeline, auc = train()
    trained_s = time.perf_counter() - started
    if not math.isfinite(auc):
        raise RuntimeError(f"risk model training gave AUC {auc}")
    model = RiskModel.from_pipeline(pipeline, auc, path)
    save(model, path)
    log.info("trained the risk model", extra={"path": str(path), "auc": round(auc, 4),
                                              "trained_s": round(trained_s, 2)})
    return model
