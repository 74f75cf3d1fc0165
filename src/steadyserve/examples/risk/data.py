"""Synthetic but deterministic data for the risk example: accounts and labelled transactions.

Nothing is downloaded: the feature store is seeded with `generate_accounts()` and the model is
trained on `generate_transactions()`, both drawn from numpy Generators with fixed seeds, so
every replica on every machine builds the same table and the same model. Everything is
vectorised: 100,000 accounts and 200,000 transactions take well under a second.

Whether a generated transaction is fraud follows a hidden logistic function (`fraud_logit`)
of the account's features, the amount's z-score against the account's history, the merchant
category's risk and the hour — the structure a real model has to discover from labels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Final

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

GENERATOR_VERSION: Final = 1  # bump when the generating code changes (it is part of the model hash)
ACCOUNT_SEED: Final = 20_240_611
TRANSACTION_SEED: Final = 20_240_612
N_ACCOUNTS: Final = 100_000
N_TRANSACTIONS: Final = 200_000

#: merchant category → (share of generated traffic, hidden risk added to the fraud logit)
MERCHANT_CATEGORIES: Final[Mapping[str, tuple[float, float]]] = {
    "grocery": (0.24, -1.0),
    "restaurants": (0.16, -0.5),
    "fuel": (0.12, -0.6),
    "utilities": (0.08, -1.2),
    "travel": (0.08, 0.3),
    "electronics": (0.10, 0.8),
    "jewelry": (0.04, 1.0),
    "gift_cards": (0.06, 1.4),
    "gambling": (0.07, 1.6),
    "crypto": (0.05, 2.0),
}
CATEGORY_NAMES: Final = tuple(MERCHANT_CATEGORIES)
CATEGORY_INDEX: Final[Mapping[str, int]] = {name: i for i, name in enumerate(CATEGORY_NAMES)}

NIGHT_START_HOUR: Final = 0  # [start, end): the hours counted as night (local time)
NIGHT_END_HOUR: Final = 6

ZSCORE_CLIP: Final = (-5.0, 10.0)  # the amount's z-score is clipped to this range

#: the hidden fraud function: intercept and weights on (transformed) features; see fraud_logit
HIDDEN_WEIGHTS: Final[Mapping[str, float]] = {
    "intercept": -3.1,
    "chargeback_rate": 25.0,
    "country_risk": 1.8,
    "night_share": 2.0,
    "log1p_account_age_days": -0.3,
    "log1p_tx_count": -0.1,
    "amount_zscore": 0.45,
    "night": 0.8,
}

ACCOUNT_COLUMNS: Final = ("tx_count", "amount_mean", "amount_std", "chargeback_rate",
                          "account_age_days", "country_risk", "night_share", "last_amount")


@dataclass(frozen=True, slots=True)
class Accounts:
    """Column arrays of the generated accounts; ids are 1..n (account 1 always exists)."""

    account_id: IntArray
    tx_count: IntArray  # transactions seen so far (≥ 1)
    amount_mean: FloatArray  # running mean of their amounts
    amount_std: FloatArray  # running population standard deviation (0 after one transaction)
    chargeback_rate: FloatArray  # share of them charged back
    account_age_days: IntArray
    country_risk: FloatArray  # 0 (safe) .. 1 (high risk) for the account's home country
    night_share: FloatArray  # share of them made at night
    last_amount: FloatArray

    def __len__(self) -> int:
        return int(self.account_id.shape[0])

    def rows(self, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
        """Rows [start, stop) as dicts of Python numbers, ready for an executemany insert."""
        stop = len(self) if stop is None else min(stop, len(self))
        columns = {f.name: getattr(self, f.name)[start:stop].tolist() for f in fields(self)}
        return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]


@dataclass(frozen=True, slots=True)
class Transactions:
    """Column arrays of a labelled transaction set; `account_index` indexes into `Accounts`."""

    account_index: IntArray
    amount: FloatArray
    category: IntArray  # index into CATEGORY_NAMES
    hour: IntArray
    fraud: npt.NDArray[np.bool_]

    def __len__(self) -> int:
        return int(self.amount.shape[0])


def is_night(hour: IntArray) -> FloatArray:
    """1.0 for the night hours, else 0.0."""
    return ((hour >= NIGHT_START_HOUR) & (hour < NIGHT_END_HOUR)).astype(np.float64)


def amount_zscore(amount: FloatArray, mean: FloatArray, std: FloatArray) -> FloatArray:
    """How unusual an amount is for the account: (amount − mean) / std, clipped to ZSCORE_CLIP.

    The spread is floored at max(10 % of the mean, 1.0) so an account with one transaction
    (std 0) or near-constant amounts does not turn every new amount into an extreme value."""
    spread = np.maximum(std, np.maximum(0.1 * mean, 1.0))
    return np.clip((amount - mean) / spread, *ZSCORE_CLIP)


def generate_accounts(n: int = N_ACCOUNTS, seed: int = ACCOUNT_SEED) -> Accounts:
    """`n` accounts with plausible, mutually consistent features (same seed → same accounts)."""
    rng = np.random.default_rng(seed)
    age = np.clip(rng.gamma(2.0, 400.0, n), 1.0, 5_000.0).astype(np.int64)
    activity = rng.lognormal(np.log(0.08), 0.7, n)  # transactions per day
    tx_count = np.maximum(1, rng.poisson(age * activity)).astype(np.int64)
    amount_mean = rng.lognormal(3.5, 0.8, n)
    amount_std = np.where(tx_count > 1, amount_mean * rng.lognormal(-0.5, 0.4, n), 0.0)
    chargeback_rate = np.minimum(rng.beta(0.5, 80.0, n), 1.0)
    country_risk = rng.beta(1.2, 6.0, n)
    night_share = rng.beta(1.5, 10.0, n)
    last_amount = np.maximum(0.5, amount_mean + amount_std * rng.standard_normal(n))
    return Accounts(
        account_id=np.arange(1, n + 1, dtype=np.int64),
        tx_count=tx_count,
        amount_mean=amount_mean,
        amount_std=amount_std,
        chargeback_rate=chargeback_rate,
        account_age_days=age,
        country_risk=country_risk,
        night_share=night_share,
        last_amount=last_amount,
    )


def fraud_logit(accounts: Accounts, tx: Transactions) -> FloatArray:
    """The hidden log-odds of fraud that labels the generated transactions."""
    w = HIDDEN_WEIGHTS
    i = tx.account_index
    risk = np.array([MERCHANT_CATEGORIES[c][1] for c in CATEGORY_NAMES])
    z = amount_zscore(tx.amount, accounts.amount_mean[i], accounts.amount_std[i])
    logit: FloatArray = (
        w["intercept"]
        + w["chargeback_rate"] * accounts.chargeback_rate[i]
        + w["country_risk"] * accounts.country_risk[i]
        + w["night_share"] * accounts.night_share[i]
        + w["log1p_account_age_days"] * np.log1p(accounts.account_age_days[i])
        + w["log1p_tx_count"] * np.log1p(accounts.tx_count[i])
        + w["amount_zscore"] * z
        + w["night"] * is_night(tx.hour)
        + risk[tx.category]
    )
    return logit


def generate_transactions(
    accounts: Accounts, n: int = N_TRANSACTIONS, seed: int = TRANSACTION_SEED
) -> Transactions:
    """`n` transactions of random accounts, labelled fraud with probability sigmoid(fraud_logit).

    Most amounts follow the account's usual mean and spread; 4 % are 3–10 spreads above it
    (the unusual purchases a risk model must notice). An account makes night transactions at
    its own `night_share`."""
    rng = np.random.default_rng(seed)
    account_index = rng.integers(0, len(accounts), n, dtype=np.int64)
    shares = np.array([MERCHANT_CATEGORIES[c][0] for c in CATEGORY_NAMES])
    category = rng.choice(len(CATEGORY_NAMES), size=n, p=shares / shares.sum()).astype(np.int64)
    at_night = rng.random(n) < accounts.night_share[account_index]
    hour = np.where(at_night,
                    rng.integers(NIGHT_START_HOUR, NIGHT_END_HOUR, n),
                    rng.integers(NIGHT_END_HOUR, 24, n)).astype(np.int64)
    mean = accounts.amount_mean[account_index]
    spread = np.maximum(accounts.amount_std[account_index], np.maximum(0.1 * mean, 1.0))
    usual = np.abs(rng.standard_normal(n)) * np.where(rng.random(n) < 0.5, -0.8, 1.0)
    unusual = rng.uniform(3.0, 10.0, n)
    z = np.where(rng.random(n) < 0.04, unusual, usual)
    amount = np.round(np.maximum(0.5, mean + z * spread), 2)
    unlabelled = Transactions(account_index, amount, category, hour, np.zeros(n, dtype=np.bool_))
    probability = 1.0 / (1.0 + np.exp(-fraud_logit(accounts, unlabelled)))
    fraud = rng.random(n) < probability
    return Transactions(account_index, amount, category, hour, fraud)


def generator_fingerprint() -> str:
    """A short hash of everything that decides the generated data (part of the model's name)."""
    spec = repr((GENERATOR_VERSION, ACCOUNT_SEED, TRANSACTION_SEED, N_ACCOUNTS, N_TRANSACTIONS,
                 sorted(MERCHANT_CATEGORIES.items()), sorted(HIDDEN_WEIGHTS.items()),
                 NIGHT_START_HOUR, NIGHT_END_HOUR, ZSCORE_CLIP))
    return hashlib.sha256(spec.encode()).hexdigest()[:16]
