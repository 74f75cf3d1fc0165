"""The risk example's feature store against real databases: a SQLite file and PostgreSQL.

PostgreSQL (127.0.0.1:5432, or STEADYSERVE_TEST_POSTGRES_URL) runs in a fresh schema per test
(search_path), dropped afterwards, so parallel runs never touch each other's tables. Without
PostgreSQL those cases skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from steadyserve.errors import DependencyUnavailable, NotFound
from steadyserve.examples.risk import data, model
from steadyserve.examples.risk.features import IN_CHUNK, FeatureStore
from steadyserve.examples.risk.service import RiskScorer
from steadyserve.store import DatabaseUnavailable

CLOSED_PG_URL = "postgresql://postgres@127.0.0.1:1/test"



@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'data' / 'steadyserve.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def open_store(url: str) -> Iterator[Callable[[], FeatureStore]]:
    stores: list[FeatureStore] = []

    def make() -> FeatureStore:
        stores.append(FeatureStore(url))
        return stores[-1]

    yield make
    for store in stores:
        store.close()


@pytest.fixture(scope="module")
def accounts() -> data.Accounts:
    return data.generate_accounts()


def _kind(url: str) -> str:
    return url.split(":", 1)[0]


def test_seed_100k_then_read_back(open_store: Callable[[], FeatureStore], url: str,
                                  accounts: data.Accounts) -> None:
    store = open_store()
    started = time.perf_counter()
    inserted = store.ensure_seeded(lambda: accounts)
    seconds = time.perf_counter() - started
    print(f"\nseeded {inserted:,} risk accounts into {_kind(url)} in {seconds:.2f} s")
    assert inserted == len(accounts) == 100_000
    assert seconds < 15.0
    assert store.count() == 100_000

    asked_for = np.random.default_rng(1).choice(len(accounts), 2 * IN_CHUNK + 17, replace=False) + 1
    ids = [int(i) for i in asked_for] + [0, 100_001, 2**63 - 1, -5, 2**70]  # the last ones unknown
    rows = store.get_many(ids)
    assert sorted(rows) == sorted(int(i) for i in asked_for)
    for account_id, row in rows.items():
        expected = accounts.rows(account_id - 1, account_id)[0]
        assert set(row) == {*expected, "updated_at"}
        for name, value in expected.items():
            assert row[name] == pytest.approx(value, rel=1e-12), name
        assert type(row["tx_count"]) is int and type(row["amount_mean"]) is float
    assert store.get(42)["account_id"] == 42
    assert store.get_many([]) == {}

    calls: list[int] = []
    again = open_store()  # a restarted replica: nothing to do, and no generation either
    assert again.ensure_seeded(lambda: calls.append(1) or accounts) == 0
    assert calls == [] and again.count() == 100_000


def _history_accounts(histories: list[list[float]]) -> data.Accounts:
    """Accounts whose features are exactly those of the given amount histories."""
    n = len(histories)
    return data.Accounts(
        account_id=np.arange(1, n + 1, dtype=np.int64),
        tx_count=np.array([len(h) for h in histories], dtype=np.int64),
        amount_mean=np.array([np.mean(h) for h in histories]),
        amount_std=np.array([np.std(h) for h in histories]),
        chargeback_rate=np.full(n, 0.0),
        account_age_days=np.full(n, 100, dtype=np.int64),
        country_risk=np.full(n, 0.2),
        night_share=np.full(n, 0.0),
        last_amount=np.array([h[-1] for h in histories]),
    )


def test_apply_transaction_matches_numpy(open_store: Callable[[], FeatureStore]) -> None:
    histories = [[12.5, 80.0, 33.3], [1000.0]]  # the second starts with std 0
    store = open_store()
    store.ensure_seeded(lambda: _history_accounts(histories))
    rng = np.random.default_rng(5)
    feed = [(float(round(rng.lognormal(3.5, 1.2), 2)), bool(rng.random() < 0.2), int(rng.integers(0, 24)))
            for _ in range(40)]
    for account_id, history in enumerate(histories, start=1):
        amounts = list(history)
        chargebacks = nights = 0
        before = store.get(account_id)
        for amount, chargeback, hour in feed:
            row = store.apply_transaction(account_id, amount, chargeback, hour)
            amounts.append(amount)
            chargebacks += chargeback
            nights += data.NIGHT_START_HOUR <= hour < data.NIGHT_END_HOUR
        assert row == store.get(account_id)  # what it returned is what is stored
        assert row["tx_count"] == len(amounts)
        assert row["amount_mean"] == pytest.approx(np.mean(amounts), rel=1e-9)
        assert row["amount_std"] == pytest.approx(np.std(amounts), rel=1e-9)
        assert row["chargeback_rate"] == pytest.approx(chargebacks / len(amounts), rel=1e-9)
        assert row["night_share"] == pytest.approx(nights / len(amounts), rel=1e-9)
        assert row["last_amount"] == feed[-1][0]
        assert row["account_age_days"] == before["account_age_days"]
        assert row["updated_at"] >= before["updated_at"]


def test_concurrent_updates_of_one_account_lose_nothing(open_store: Callable[[], FeatureStore]) -> None:
    store = open_store()
    store.ensure_seeded(lambda: _history_accounts([[10.0]]))
    errors: list[BaseException] = []

    def feed() -> None:
        try:
            for _ in range(25):
                store.apply_transaction(1, 20.0, False, 12)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=feed) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    row = store.get(1)
    assert row["tx_count"] == 101
    amounts = [10.0] + [20.0] * 100
    assert row["amount_mean"] == pytest.approx(np.mean(amounts))
    assert row["amount_std"] == pytest.approx(np.std(amounts))


def test_two_seeders_at_once_both_succeed(open_store: Callable[[], FeatureStore], url: str,
                                          accounts: data.Accounts) -> None:
    stores = [open_store(), open_store()]  # two replicas: separate engines and connections
    for store in stores:
        store.create_tables()
        # both see an empty store, so both really race in the seeding transaction
        store.is_seeded = lambda: False  # type: ignore[method-assign]
    barrier = threading.Barrier(len(stores))
    inserted: list[int] = []
    errors: list[BaseException] = []

    def seed(store: FeatureStore) -> None:
        try:
            barrier.wait()
            inserted.append(store.ensure_seeded(lambda: accounts))
        except BaseException as exc:
            errors.append(exc)

    started = time.perf_counter()
    threads = [threading.Thread(target=seed, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"\ntwo concurrent seeders on {_kind(url)}: inserted {sorted(inserted)} "
          f"in {time.perf_counter() - started:.2f} s")
    assert errors == []
    assert sorted(inserted) == [0, 100_000]
    assert stores[0].count() == stores[1].count() == 100_000
    assert FeatureStore.is_seeded(stores[0])


def test_unknown_account(open_store: Callable[[], FeatureStore]) -> None:
    store = open_store()
    store.ensure_seeded(lambda: data.generate_accounts(10))
    for call in (lambda: store.get(11), lambda: store.apply_transaction(11, 5.0, False, 12),
                 lambda: store.apply_transaction(2**64, 5.0, False, 12)):
        with pytest.raises(NotFound) as info:
            call()
        assert info.value.status == 404 and info.value.param == "account_id"
    assert store.get_many([11, 12]) == {}
    assert store.get(10)["tx_count"] >= 1  # nothing else changed


@pytest.mark.parametrize("kind", ["postgresql-closed-port", "sqlite-unopenable"])
def test_database_down_is_unavailable_quickly(kind: str, tmp_path: Path) -> None:
    if kind == "postgresql-closed-port":
        url = CLOSED_PG_URL
    else:
        (tmp_path / "db-is-a-directory").mkdir()
        url = f"sqlite:///{tmp_path / 'db-is-a-directory'}"
    store = FeatureStore(url)  # connects to nothing yet
    try:
        for call in (store.ensure_seeded, lambda: store.get_many([1, 2]),
                     lambda: store.apply_transaction(1, 5.0, False, 12), store.count):
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable) as info:
                call()
            assert time.monotonic() - started < 3.0
            assert info.value.status == 503 and isinstance(info.value.__cause__, Exception)
    finally:
        store.close()


def test_postgres_sessions_killed_underneath_recover_by_themselves(
    pg_url: str, pg_admin: psycopg.Connection[tuple[Any, ...]]
) -> None:
    store = FeatureStore(pg_url)
    try:
        store.ensure_seeded(lambda: data.generate_accounts(100))
        assert len(store.get_many(range(1, 11))) == 10
        app = pg_url.rsplit("application_name=", 1)[-1]
        killed = pg_admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s",
            (app,),
        ).fetchone()
        assert killed is not None and killed[0] >= 1
        assert len(store.get_many(range(1, 11))) == 10  # pre-ping found the dead one, reconnected
        assert store.apply_transaction(1, 5.0, False, 12)["last_amount"] == 5.0
    finally:
        store.close()


def test_scorer_setup_end_to_end(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """setup() from the environment: seed, train (or load), cache; then the handlers."""
    monkeypatch.setenv("STEADYSERVE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("STEADYSERVE_DATABASE_URL", url)
    monkeypatch.setenv("RISK_FEATURE_CACHE_BYTES", str(1 << 20))
    scorer = RiskScorer()
    started = time.perf_counter()
    scorer.setup()
    print(f"\nRiskScorer.setup on {_kind(url)} (seed + train): {time.perf_counter() - started:.2f} s")
    try:
        assert scorer.store.count() == 100_000
        assert scorer.model.path is not None and scorer.model.path.parent == tmp_path / "data"
        canary = {"account_id": 1, "amount": 10.0, "merchant_category": "grocery", "hour": 12}
        first = scorer.score([canary])[0]
        assert first["decision"] in ("approve", "review", "decline")
        before = scorer.account(1)
        updated = scorer.update_account(1, 9_000.0, chargeback=True, hour=3)
        assert updated["tx_count"] == before["tx_count"] + 1
        assert scorer.account(1) == updated
        assert scorer.score([canary])[0]["score"] > first["score"]  # a chargeback raises risk
        stats = scorer.cache_stats()
        assert stats["enabled"] and stats["loads"] >= 2
    finally:
        scorer.teardown()
    again = RiskScorer()  # a second start loads the saved model and seeds nothing
    again.setup()
    try:
        assert again.model.path == scorer.model.path
        np.testing.assert_array_equal(again.model.coef, scorer.model.coef)
    finally:
        again.teardown()


def test_scorer_with_database_down_answers_503(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STEADYSERVE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("STEADYSERVE_DATABASE_URL", CLOSED_PG_URL)
    with pytest.raises(DatabaseUnavailable):  # a replica cannot start without its features
        RiskScorer().setup()

    small = data.generate_accounts(5_000)  # a quick model: only the failure path matters here
    pipeline, auc = model.train(small, data.generate_transactions(small, 20_000))
    scorer = RiskScorer()
    scorer.configure(FeatureStore(CLOSED_PG_URL), model.RiskModel.from_pipeline(pipeline, auc), 1 << 20)
    try:
        started = time.monotonic()
        with pytest.raises(DependencyUnavailable) as info:  # after 3 quick attempts, not a hang
            scorer.score([{"account_id": 1, "amount": 10.0, "merchant_category": "grocery", "hour": 12}])
        assert info.value.status == 503 and time.monotonic() - started < 8.0
        assert isinstance(info.value.__cause__, DatabaseUnavailable)
    finally:
        scorer.teardown()
