"""The risk example without a database server: generator, model, its file (arrays, never a
pickle), validation, the scorer's slots.

The scorer runs on a small in-memory SQLite feature store (no files, no network); the real
databases and the 100,000-row seeding are in tests/integration/test_risk_features.py.
"""

from __future__ import annotations

import pickle
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from steadyserve.errors import ClientError, DependencyUnavailable, NotFound
from steadyserve.examples.risk import data, model
from steadyserve.examples.risk.features import FeatureStore
from steadyserve.examples.risk.service import (
    DECLINE_AT,
    REVIEW_AT,
    RiskScorer,
    decision,
    validate_transaction,
)
from steadyserve.schema import compile_params
from steadyserve.service import handler_specs

SMALL = 2_000


# --- the generator ------------------------------------------------------------------------------

def _arrays(obj: Any) -> dict[str, np.ndarray]:
    return {name: getattr(obj, name) for name in obj.__dataclass_fields__}


def test_generator_is_deterministic_and_seeded() -> None:
    a, b = data.generate_accounts(SMALL), data.generate_accounts(SMALL)
    for name, column in _arrays(a).items():
        np.testing.assert_array_equal(column, getattr(b, name), err_msg=name)
    ta, tb = data.generate_transactions(a, 5_000), data.generate_transactions(b, 5_000)
    for name, column in _arrays(ta).items():
        np.testing.assert_array_equal(column, getattr(tb, name), err_msg=name)
    other = data.generate_accounts(SMALL, seed=data.ACCOUNT_SEED + 1)
    assert not np.array_equal(a.amount_mean, other.amount_mean)


def test_generated_accounts_are_plausible() -> None:
    a = data.generate_accounts(SMALL)
    assert a.account_id.tolist() == list(range(1, SMALL + 1))
    assert (a.tx_count >= 1).all() and (a.account_age_days >= 1).all()
    assert (a.amount_mean > 0).all() and (a.amount_std >= 0).all()
    assert (a.amount_std[a.tx_count == 1] == 0).all()
    for name in ("chargeback_rate", "country_risk", "night_share"):
        column = getattr(a, name)
        assert ((column >= 0) & (column <= 1)).all(), name
    row = a.rows(0, 1)[0]
    assert set(row) == {"account_id", *data.ACCOUNT_COLUMNS}
    assert type(row["account_id"]) is int and type(row["amount_mean"]) is float


def test_full_size_generation_is_fast_and_labels_follow_the_hidden_function() -> None:
    started = time.perf_counter()
    accounts = data.generate_accounts()
    tx = data.generate_transactions(accounts)
    elapsed = time.perf_counter() - started
    print(f"\ngenerated {len(accounts):,} accounts + {len(tx):,} transactions in {elapsed:.2f} s; "
          f"fraud rate {tx.fraud.mean():.2%}")
    assert len(accounts) >= 100_000 and len(tx) >= 200_000
    assert elapsed < 3.0
    assert 0.01 < tx.fraud.mean() < 0.10
    assert set(np.unique(tx.category).tolist()) == set(range(len(data.CATEGORY_NAMES)))
    logit = data.fraud_logit(accounts, tx)
    assert tx.fraud[logit > 0].mean() > 5 * tx.fraud[logit < -4].mean()


def test_amount_zscore_floors_the_spread_and_clips() -> None:
    # spread max(std, 10 % of the mean, 1.0): 10, 10, 10, 10, 20, 1
    z = data.amount_zscore(np.array([110.0, 1e6, 0.5, 60.0, 160.0, 2.5]),
                           np.array([100.0, 100.0, 100.0, 100.0, 100.0, 2.0]),
                           np.array([0.0, 5.0, 5.0, 5.0, 20.0, 0.0]))
    assert z.tolist() == [1.0, data.ZSCORE_CLIP[1], data.ZSCORE_CLIP[0], -4.0, 3.0, 0.5]


# --- the model ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained() -> tuple[Any, float, float]:
    started = time.perf_counter()
    pipeline, auc = model.train()
    return pipeline, auc, time.perf_counter() - started


def test_model_auc_and_training_time(trained: tuple[Any, float, float]) -> None:
    _, auc, seconds = trained
    print(f"\nrisk model: held-out AUC {auc:.4f}, generated + trained in {seconds:.2f} s")
    assert auc >= 0.75
    assert seconds < 10.0


def test_contributions_add_up_to_the_logit(trained: tuple[Any, float, float]) -> None:
    pipeline, auc, _ = trained
    m = model.RiskModel.from_pipeline(pipeline, auc)
    accounts = data.generate_accounts(SMALL)
    tx = data.generate_transactions(accounts, 500, seed=99)
    x, _ = model.training_matrices(accounts, tx)
    terms = m.contributions(x)
    logit = terms.sum(axis=1) + m.intercept
    np.testing.assert_allclose(logit, pipeline.decision_function(x), rtol=0, atol=1e-9)
    rows = [accounts.rows(int(i), int(i) + 1)[0] for i in tx.account_index]
    items = [{"amount": float(a), "merchant_category": data.CATEGORY_NAMES[c], "hour": int(h)}
             for a, c, h in zip(tx.amount, tx.category, tx.hour, strict=True)]
    scored = m.score(rows, items)
    np.testing.assert_allclose([s for s, _ in scored], pipeline.predict_proba(x)[:, 1], rtol=0, atol=1e-12)
    for i, (_, top) in enumerate(scored):
        assert len(top) == model.TOP_CONTRIBUTIONS
        magnitudes = [abs(c["contribution"]) for c in top]
        assert magnitudes == sorted(magnitudes, reverse=True)
        assert magnitudes[0] == pytest.approx(np.abs(terms[i]).max())
        for c in top:
            j = model.MODEL_FEATURES.index(c["name"])
            assert c["contribution"] == pytest.approx(terms[i, j])
    first = {c["name"]: c["value"] for c in scored[0][1]}
    if "amount" in first:  # explanations show the raw amount, not its logarithm
        assert first["amount"] == pytest.approx(items[0]["amount"])


def test_model_is_saved_once_then_loaded(tmp_path: Path, trained: tuple[Any, float, float],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline, auc, _ = trained
    calls: list[int] = []

    def fake_train() -> tuple[Any, float]:
        calls.append(1)
        return pipeline, auc

    monkeypatch.setattr(model, "train", fake_train)
    first = model.load_or_train(tmp_path)
    assert calls == [1] and first.path == model.model_path(tmp_path) and first.path.exists()
    assert first.path.name.startswith("risk-model-") and first.path.suffix == ".npz"
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]  # no temporary left over
    second = model.load_or_train(tmp_path)
    assert calls == [1]
    np.testing.assert_array_equal(first.coef, second.coef)
    assert second.auc == auc
    first.path.write_bytes(b"truncated")  # a broken file is replaced, not fatal
    third = model.load_or_train(tmp_path)
    assert calls == [1, 1]
    np.testing.assert_array_equal(first.coef, third.coef)


# --- the model file: arrays only, never a pickle ---------------------------------------------------


class Trap:
    """Unpickling this creates `path`: proof that a file's pickle was (or was not) run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


@pytest.fixture
def counted_training(trained: tuple[Any, float, float], monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """`model.train` returns the module's trained pipeline and counts its calls."""
    pipeline, auc, _ = trained
    calls: list[int] = []

    def fake_train() -> tuple[Any, float]:
        calls.append(1)
        return pipeline, auc

    monkeypatch.setattr(model, "train", fake_train)
    return calls


def _scoring_inputs() -> tuple[np.ndarray, list[dict[str, Any]], list[dict[str, Any]]]:
    accounts = data.generate_accounts(SMALL)
    tx = data.generate_transactions(accounts, 1_000, seed=123)
    x, _ = model.training_matrices(accounts, tx)
    rows = [accounts.rows(int(i), int(i) + 1)[0] for i in tx.account_index]
    items = [{"amount": float(a), "merchant_category": data.CATEGORY_NAMES[c], "hour": int(h)}
             for a, c, h in zip(tx.amount, tx.category, tx.hour, strict=True)]
    return x, rows, items


def test_the_saved_file_holds_named_arrays_and_scores_as_the_pipeline_does(
        tmp_path: Path, trained: tuple[Any, float, float], counted_training: list[int]) -> None:
    pipeline, auc, _ = trained
    model.load_or_train(tmp_path)
    path = model.model_path(tmp_path)
    with zipfile.ZipFile(path) as archive:  # an .npz: one .npy per array, nothing else
        assert sorted(archive.namelist()) == sorted(f"{n}.npy" for n in model.MODEL_ARRAYS)
    with np.load(path, allow_pickle=False) as saved:
        arrays = {name: saved[name] for name in saved.files}
    assert all(a.dtype.kind in "ifU" for a in arrays.values())  # numbers and names: no objects
    assert int(arrays["format"]) == model.MODEL_FORMAT
    assert tuple(arrays["features"].tolist()) == model.MODEL_FEATURES
    assert float(arrays["auc"]) == auc

    loaded = model.load_or_train(tmp_path)
    assert counted_training == [1]  # the second call read the file
    fresh = model.RiskModel.from_pipeline(pipeline, auc)
    for name in ("mean", "scale", "coef"):  # float64 round-trips bit for bit
        np.testing.assert_array_equal(getattr(loaded, name), getattr(fresh, name), err_msg=name)
    assert (loaded.intercept, loaded.auc) == (fresh.intercept, fresh.auc)

    x, rows, items = _scoring_inputs()
    logit = loaded.contributions(x).sum(axis=1) + loaded.intercept
    np.testing.assert_allclose(logit, pipeline.decision_function(x), rtol=0, atol=1e-9)
    scored = loaded.score(rows, items)
    np.testing.assert_allclose([p for p, _ in scored], pipeline.predict_proba(x)[:, 1], rtol=0, atol=1e-9)
    assert scored == fresh.score(rows, items)  # the same top features, terms and values


def _write_npz(path: Path, **overrides: Any) -> None:
    """A model file as `save` writes it, with some arrays replaced, added (value) or removed (None)."""
    n = len(model.MODEL_FEATURES)
    arrays: dict[str, Any] = {
        "format": np.array(model.MODEL_FORMAT), "features": np.array(model.MODEL_FEATURES),
        "mean": np.zeros(n), "scale": np.ones(n), "coef": np.zeros(n),
        "intercept": np.array(0.0), "auc": np.array(0.9),
    }
    arrays.update(overrides)
    with path.open("wb") as f:
        np.savez(f, **{k: v for k, v in arrays.items() if v is not None})


@pytest.mark.parametrize(
    "content",
    ["raw-pickle", "joblib-of-the-old-format", "object-array-in-the-npz"],
)
def test_a_file_holding_a_pickle_is_refused_unread_and_the_model_trained_again(
        tmp_path: Path, counted_training: list[int], content: str) -> None:
    path = model.model_path(tmp_path)
    marker = tmp_path / "pickle-ran"
    if content == "raw-pickle":
        path.write_bytes(pickle.dumps({"format": model.MODEL_FORMAT, "trap": Trap(marker)}))
    elif content == "joblib-of-the-old-format":
        import joblib

        joblib.dump({"format": 1, "features": model.MODEL_FEATURES, "pipeline": Trap(marker),
                     "auc": 0.9}, path)
    else:
        trap = np.empty(len(model.MODEL_FEATURES), dtype=object)
        trap[:] = [Trap(marker)] * len(trap)
        _write_npz(path, coef=trap)
        with zipfile.ZipFile(path) as archive:  # the trap is really in there, as a pickle
            assert b"pickle-ran" in archive.read("coef.npy")
    m = model.load_or_train(tmp_path)
    assert not marker.exists()  # never unpickled
    assert counted_training == [1]  # refused, so trained and written over
    assert m.path == path and model._read(path).coef.dtype == np.float64


def test_the_old_joblib_file_is_ignored(tmp_path: Path, counted_training: list[int]) -> None:
    """The joblib file of the previous format sits beside the new one, never opened."""
    marker = tmp_path / "pickle-ran"
    old = model.model_path(tmp_path).with_suffix(".joblib")
    old.write_bytes(pickle.dumps(Trap(marker)))
    model.load_or_train(tmp_path)
    model.load_or_train(tmp_path)
    assert counted_training == [1] and not marker.exists() and old.exists()
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".joblib", ".npz"]


N = len(model.MODEL_FEATURES)


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        pytest.param({"format": np.array(1)}, "format", id="older-format"),
        pytest.param({"format": np.array(2.0)}, "format", id="float-format"),
        pytest.param({"features": np.array(model.MODEL_FEATURES[::-1])}, "feature list",
                     id="features-reordered"),
        pytest.param({"features": np.array(model.MODEL_FEATURES[:-1])}, "feature list",
                     id="feature-missing"),
        pytest.param({"coef": np.zeros(N - 1)}, "coef", id="coef-short"),
        pytest.param({"mean": np.zeros(N, dtype=np.float32)}, "mean", id="mean-float32"),
        pytest.param({"scale": np.zeros(N)}, "scale", id="scale-zero"),
        pytest.param({"intercept": np.array(float("nan"))}, "intercept", id="intercept-nan"),
        pytest.param({"auc": np.zeros(2)}, "auc", id="auc-not-a-scalar"),
        pytest.param({"auc": None}, "arrays", id="an-array-missing"),
        pytest.param({"extra": np.zeros(1)}, "arrays", id="an-array-too-many"),
    ],
)
def test_a_file_of_another_layout_is_refused(tmp_path: Path, overrides: dict[str, Any], words: str) -> None:
    path = tmp_path / "m.npz"
    _write_npz(path, **overrides)
    with pytest.raises(model._Unusable, match=words):
        model._read(path)
    assert model._load(path) is None


@pytest.mark.parametrize(
    "content", [b"", b"truncated", b"PK\x03\x04 not really a zip"], ids=["empty", "garbage", "bad-zip"])
def test_a_broken_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "m.npz"
    path.write_bytes(content)
    with pytest.raises(model._Unusable):
        model._read(path)


def test_a_lone_npy_array_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.npz"
    with path.open("wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(model._Unusable, match="npz"):
        model._read(path)


def test_a_good_file_is_read_as_written(tmp_path: Path) -> None:
    path = tmp_path / "m.npz"
    _write_npz(path, coef=np.arange(N, dtype=np.float64), intercept=np.array(-1.5))
    m = model._read(path)
    np.testing.assert_array_equal(m.coef, np.arange(N))
    assert (m.intercept, m.auc, m.path) == (-1.5, 0.9, path)


def test_saving_is_atomic_and_leaves_no_temporary(tmp_path: Path, trained: tuple[Any, float, float],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline, auc, _ = trained
    m = model.RiskModel.from_pipeline(pipeline, auc)
    path = tmp_path / "sub" / "m.npz"
    model.save(m, path)
    assert [p.name for p in path.parent.iterdir()] == ["m.npz"]

    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    before = path.read_bytes()
    monkeypatch.setattr(model.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        model.save(model.RiskModel.from_pipeline(pipeline, 0.5), path)
    assert path.read_bytes() == before  # the old file stands whole
    assert [p.name for p in path.parent.iterdir()] == ["m.npz"]  # the temporary was removed


# --- validation and decisions --------------------------------------------------------------------

GOOD = {"account_id": 1, "amount": 10.0, "merchant_category": "grocery", "hour": 12}


@pytest.mark.parametrize(
    ("change", "param"),
    [
        pytest.param({"amount": 0.0}, "amount", id="zero-amount"),
        pytest.param({"amount": -5.0}, "amount", id="negative-amount"),
        pytest.param({"amount": 1e9}, "amount", id="amount-too-large"),
        pytest.param({"amount": float("nan")}, "amount", id="nan-amount"),
        pytest.param({"amount": "10"}, "amount", id="str-amount"),
        pytest.param({"amount": True}, "amount", id="bool-amount"),
        pytest.param({"hour": 24}, "hour", id="hour-24"),
        pytest.param({"hour": -1}, "hour", id="hour-negative"),
        pytest.param({"hour": 3.0}, "hour", id="float-hour"),
        pytest.param({"merchant_category": "casino"}, "merchant_category", id="unknown-category"),
        pytest.param({"merchant_category": ["crypto"]}, "merchant_category", id="list-category"),
        pytest.param({"account_id": -1}, "account_id", id="negative-account"),
        pytest.param({"account_id": 2**63}, "account_id", id="account-over-bigint"),
        pytest.param({"account_id": None}, "account_id", id="missing-account"),
    ],
)
def test_validation_names_the_field(change: dict[str, Any], param: str) -> None:
    item = {**GOOD, **change}
    if change.get("account_id", 0) is None:
        del item["account_id"]
    error = validate_transaction(item)
    assert isinstance(error, ClientError) and not isinstance(error, NotFound)
    assert error.param == param and error.status == 400
    assert param in error.message


def test_valid_transaction_passes() -> None:
    assert validate_transaction(GOOD) is None
    assert validate_transaction({**GOOD, "amount": 5}) is None  # an int amount is a number


@pytest.mark.parametrize(
    ("score", "expected"),
    [(0.0, "approve"), (REVIEW_AT - 1e-9, "approve"), (REVIEW_AT, "review"),
     (DECLINE_AT - 1e-9, "review"), (DECLINE_AT, "decline"), (1.0, "decline")],
)
def test_decision_thresholds(score: float, expected: str) -> None:
    assert decision(score) == expected


# --- the scorer on an in-memory feature store -----------------------------------------------------

@pytest.fixture(params=[32 << 20, 0], ids=["feature-cache", "no-feature-cache"])
def scorer(request: pytest.FixtureRequest, trained: tuple[Any, float, float]) -> Any:
    pipeline, auc, _ = trained
    store = FeatureStore("sqlite:///:memory:")
    assert store.ensure_seeded(lambda: data.generate_accounts(50)) == 50
    service = RiskScorer()
    service.configure(store, model.RiskModel.from_pipeline(pipeline, auc), request.param)
    yield service
    service.teardown()


def test_score_results_and_error_slots(scorer: RiskScorer) -> None:
    items: list[Any] = [
        GOOD,
        {**GOOD, "account_id": 999_999},  # unknown account
        {**GOOD, "merchant_category": "casino"},  # bad input
        {**GOOD, "account_id": 7, "amount": 5_000.0, "merchant_category": "crypto", "hour": 3},
        GOOD,
    ]
    results = scorer.score(items)
    assert len(results) == len(items)
    unknown, bad = results[1], results[2]
    assert isinstance(unknown, NotFound) and unknown.status == 404 and unknown.param == "account_id"
    assert "999999" in unknown.message
    assert isinstance(bad, ClientError) and bad.status == 400 and bad.param == "merchant_category"
    for i in (0, 3, 4):
        r = results[i]
        assert set(r) == {"account_id", "score", "decision", "top_features", "model_version"}
        assert r["account_id"] == items[i]["account_id"] and r["model_version"] == "1"
        assert 0.0 <= r["score"] <= 1.0 and r["decision"] == decision(r["score"])
        assert [set(c) for c in r["top_features"]] == [{"name", "contribution", "value"}] * 3
    assert results[0] == results[4]
    assert results[3]["score"] > results[0]["score"]  # a big crypto buy at 3 am is riskier


def test_score_of_only_bad_items_touches_nothing(scorer: RiskScorer) -> None:
    results = scorer.score([{**GOOD, "hour": 99}])
    assert isinstance(results[0], ClientError) and results[0].param == "hour"
    assert scorer.score([]) == []


def test_account_and_update_see_each_other(scorer: RiskScorer) -> None:
    before = scorer.account(3)
    assert before["account_id"] == 3
    after = scorer.update_account(3, 250.0, chargeback=True, hour=2)
    assert after["tx_count"] == before["tx_count"] + 1 and after["last_amount"] == 250.0
    assert scorer.account(3) == after  # this replica's cached row was dropped
    with pytest.raises(NotFound) as info:
        scorer.account(424_242)
    assert info.value.param == "account_id"
    with pytest.raises(NotFound):
        scorer.update_account(424_242, 1.0)
    with pytest.raises(ClientError) as bad:
        scorer.update_account(3, -1.0)
    assert bad.value.param == "amount"


def test_invalidate_hook_drops_feature_rows(scorer: RiskScorer) -> None:
    scorer.account(5)
    scorer.store.apply_transaction(5, 99.0, False, 12)  # a write that bypassed this replica
    if scorer.features.enabled:
        assert scorer.account(5)["last_amount"] != 99.0  # still the cached row
    scorer.invalidate(["account:5"])
    assert scorer.account(5)["last_amount"] == 99.0
    assert scorer.cache_stats()["name"] == "risk_features"


def test_database_down_is_a_503_not_a_500(scorer: RiskScorer) -> None:
    scorer.invalidate(["account:1"])
    scorer.store.close()
    started = time.monotonic()
    with pytest.raises(DependencyUnavailable) as info:
        scorer.score([GOOD])
    assert info.value.status == 503 and time.monotonic() - started < 2.0


def test_handler_specs_describe_transactions_and_the_canary_validates() -> None:
    specs = handler_specs(RiskScorer)
    score = specs["score"]
    item = score.params[0]["type"]["item"]
    assert item["kind"] == "object" and item["name"] == "Transaction"
    assert item["required"] == ["account_id", "amount", "merchant_category", "hour"]
    assert score.options.batch and score.options.max_batch_size == 64 and score.options.cache
    assert score.options.cache_tags == ("account:{account_id}",) and score.options.affinity == "account_id"
    validate = compile_params(score.params)
    assert score.options.canary is not None and validate(score.options.canary) == score.options.canary
    with pytest.raises(ClientError) as info:
        validate({"transactions": [GOOD, GOOD, GOOD, {**GOOD, "amount": "x"}]})
    assert info.value.param == "transactions[3].amount"
    update = specs["update_account"]
    assert not update.options.idempotent and update.options.invalidates == ("account:{account_id}",)
    assert specs["account"].options.cache
