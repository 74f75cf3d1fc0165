"""The risk example's cascade (examples/risk/cascade.py): trained on generated feedback, judged on
held-out rows, and served by `RiskScorer.score_cascade` on a small in-memory feature store."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from steadyserve.config import Config, DeploymentConfig
from steadyserve.errors import ClientError, ConfigError, NotFound
from steadyserve.examples.risk import cascade as rc
from steadyserve.examples.risk import data, model, service
from steadyserve.examples.risk.features import FeatureStore
from steadyserve.examples.risk.service import (
    DECLINE_AT,
    CascadeSettings,
    RiskScorer,
    cascade_settings,
    decision,
)
from steadyserve.gateway.app import Gateway
from steadyserve.gateway.transport import InProcessTransport
from steadyserve.policies import cascade as policy
from steadyserve.schema import compile_params
from steadyserve.service import handler_specs
from steadyserve.testing import start_inprocess

N_FEEDBACK = 50_000  # 30,000 to fit, 10,000 to choose the threshold, 10,000 held out


@pytest.fixture(scope="module")
def accounts() -> data.Accounts:
    return data.generate_accounts()


@pytest.fixture(scope="module")
def cheap(accounts: data.Accounts) -> model.RiskModel:
    """The served kind of model, trained on fewer generated transactions (quicker)."""
    pipeline, auc = model.train(accounts, data.generate_transactions(accounts, 50_000))
    return model.RiskModel.from_pipeline(pipeline, auc)


@pytest.fixture(scope="module")
def feedback(accounts: data.Accounts) -> rc.Labelled:
    return rc.generated_feedback(N_FEEDBACK, accounts=accounts)


@pytest.fixture(scope="module")
def tuned(cheap: model.RiskModel, feedback: rc.Labelled) -> rc.Tuned:
    return rc.build(cheap, feedback)


def test_the_decision_cutoff_is_the_services() -> None:
    assert rc.DECISION_AT == DECLINE_AT


def test_generated_feedback_is_deterministic_and_has_the_patterns(accounts: data.Accounts) -> None:
    a, b = rc.generated_feedback(2_000, accounts=accounts), rc.generated_feedback(2_000, accounts=accounts)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.label, b.label)
    tx = data.generate_transactions(accounts, 20_000, rc.FEEDBACK_SEED)
    extra = rc.feedback_logit(accounts, tx) - data.fraud_logit(accounts, tx)
    assert set(np.round(np.unique(extra), 9).tolist()) <= {0.0, 4.0, 3.5, 7.5}
    assert 0.02 < (extra == 4.0).mean() < 0.10 and (extra == 3.5).mean() > 0.001
    plain = rc.generated_feedback(20_000, emerging=False, accounts=accounts)
    emerging = rc.generated_feedback(20_000, accounts=accounts)
    assert emerging.label.mean() > plain.label.mean()


def test_the_chosen_point_beats_cheap_on_quality_and_expensive_on_cost(
        tuned: rc.Tuned, feedback: rc.Labelled) -> None:
    choice = tuned.choice
    assert choice.met and choice.metric == "auc" and choice.point.kind == "cascade"
    threshold = tuned.cascade.threshold
    assert threshold == choice.point.threshold
    assert tuned.costs.expensive_us > 10 * (tuned.costs.cheap_us + tuned.costs.router_us)
    _, _, held_out = feedback.split()
    # the held-out rows: neither the models nor the threshold's choice saw them
    e = rc.evaluate(tuned.cascade, held_out)
    served = policy.cost_quality_curve(
        e.router_score, e.cheap_correct, e.expensive_correct, tuned.costs.cheap_us,
        tuned.costs.expensive_us, router_cost=tuned.costs.router_us, cheap_probability=e.cheap_p,
        expensive_probability=e.expensive_p, label=e.label, thresholds=[threshold])
    point = served.cascade[0]
    cheap, expensive = served.cheap_only, served.expensive_only
    assert cheap.auc is not None and expensive.auc is not None and point.auc is not None
    print(f"\nheld out: cheap AUC {cheap.auc:.4f} {cheap.cost:.1f} µs; cascade at {threshold:.4f}: "
          f"AUC {point.auc:.4f}, {point.escalated:.1%} escalated, {point.cost:.1f} µs; "
          f"expensive AUC {expensive.auc:.4f} {expensive.cost:.1f} µs")
    assert point.auc > cheap.auc + 0.05  # far better than the cheap path alone
    assert point.auc > expensive.auc - 0.02  # close to the expensive path's
    assert point.cost < expensive.cost / 2 and point.escalated < 0.4
    assert expensive.auc > cheap.auc + 0.05  # the patterns are out of the linear model's reach


def test_on_the_generators_own_labels_nothing_is_escalated(
        cheap: model.RiskModel, accounts: data.Accounts) -> None:
    """There the logistic regression is the true model: gradient boosting does not pay."""
    plain = rc.build(cheap, rc.generated_feedback(30_000, emerging=False, accounts=accounts))
    assert plain.choice.met and plain.choice.point.kind == "cheap-only"
    assert plain.cascade.threshold == policy.CHEAP_ONLY


def test_route_answers_each_path(tuned: rc.Tuned, feedback: rc.Labelled) -> None:
    x = feedback.x[:200]
    cheap_p = rc.cheap_probability(tuned.cascade.cheap, x)
    routed = tuned.cascade.route(x)
    assert routed.router_score is not None and routed.escalated.any() and not routed.escalated.all()
    np.testing.assert_array_equal(routed.escalated, routed.router_score >= tuned.cascade.threshold)
    np.testing.assert_array_equal(routed.probability[~routed.escalated], cheap_p[~routed.escalated])
    np.testing.assert_allclose(routed.probability[routed.escalated],
                               tuned.cascade.expensive_probability(x[routed.escalated]))
    for threshold, escalated in ((policy.CHEAP_ONLY, False), (policy.EXPENSIVE_ONLY, True)):
        alone = rc.Cascade(tuned.cascade.cheap, tuned.cascade.expensive, tuned.cascade.router, threshold)
        r = alone.route(x)
        assert r.router_score is None and (r.escalated == escalated).all()
    empty = tuned.cascade.route(x[:0])
    assert empty.probability.shape == (0,) and empty.escalated.shape == (0,)


def test_a_router_trained_on_one_class_is_constant() -> None:
    x = rc.generated_feedback(200).x
    router = rc.Router.fit(x, np.full(200, 0.01), np.zeros(200, dtype=np.bool_))  # never wrong
    score = router.score(x, np.full(200, 0.01))
    assert np.allclose(score, score[0]) and score[0] < 1e-6


def test_training_needs_both_classes(cheap: model.RiskModel) -> None:
    rows = rc.generated_feedback(100)
    with pytest.raises(ValueError, match="both classes"):
        rc.train_cascade(cheap, rc.Labelled(rows.x, np.zeros(100, dtype=np.bool_)))


# --- labelled rows from what the service saw -------------------------------------------------------

Seen = tuple[list[dict[str, Any]], list[dict[str, Any]], data.Transactions]


def _seen(accounts: data.Accounts, n: int) -> Seen:
    tx = data.generate_transactions(accounts, n, seed=77)
    rows = [accounts.rows(int(i), int(i) + 1)[0] for i in tx.account_index]
    items = [{"account_id": r["account_id"], "amount": float(a), "merchant_category": data.CATEGORY_NAMES[c],
              "hour": int(h)} for r, a, c, h in zip(rows, tx.amount, tx.category, tx.hour, strict=True)]
    return rows, items, tx


def test_labelled_rows_are_the_models_inputs(accounts: data.Accounts) -> None:
    rows, items, tx = _seen(accounts, 50)
    labelled = rc.labelled_rows(rows, items, tx.fraud.tolist())
    x, y = model.training_matrices(accounts, tx)
    np.testing.assert_allclose(labelled.x, x, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(labelled.label, y)
    with pytest.raises(ValueError, match="labels"):
        rc.labelled_rows(rows, items, [True])


def test_labelled_from_feedback_joins_corrections_to_the_logged_inputs(accounts: data.Accounts) -> None:
    rows, items, _ = _seen(accounts, 3)
    scored = {f"req-{i}": (rows[i], items[i]) for i in range(3)}
    feedback: list[dict[str, Any]] = [
        {"request_id": "req-0", "key": "label", "correction": "fraud"},
        {"request_id": "req-1", "key": "label", "correction": False},
        {"request_id": "req-2", "key": "rating", "score": 1.0, "correction": None},  # no label
        {"request_id": "req-9", "key": "label", "correction": True},  # not in the log
        {"request_id": "req-2", "key": "label", "correction": 1},
    ]
    labelled = rc.labelled_from_feedback(feedback, scored)
    assert labelled.label.tolist() == [True, False, True]
    np.testing.assert_array_equal(labelled.x, rc.inputs(rows, items))
    assert len(rc.labelled_from_feedback([], scored)) == 0


# --- settings -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param({}, None, id="unset-off"),
        pytest.param({"RISK_CASCADE_THRESHOLD": " "}, None, id="empty-off"),
        pytest.param({"RISK_CASCADE_THRESHOLD": "auto"}, CascadeSettings(None), id="auto"),
        pytest.param({"RISK_CASCADE_THRESHOLD": "AUTO", "RISK_CASCADE_MAX_AUC_LOSS": "0.01"},
                     CascadeSettings(None, 0.01), id="auto-with-loss"),
        pytest.param({"RISK_CASCADE_THRESHOLD": "0.25"}, CascadeSettings(0.25), id="fixed"),
        pytest.param({"RISK_CASCADE_THRESHOLD": "0"}, CascadeSettings(0.0), id="escalate-all"),
        pytest.param({"RISK_CASCADE_THRESHOLD": "1"}, CascadeSettings(1.0), id="one"),
    ],
)
def test_cascade_settings(env: dict[str, str], expected: CascadeSettings | None) -> None:
    assert cascade_settings(env) == expected


@pytest.mark.parametrize(
    ("env", "name"),
    [
        pytest.param({"RISK_CASCADE_THRESHOLD": "1.5"}, "RISK_CASCADE_THRESHOLD", id="over-1"),
        pytest.param({"RISK_CASCADE_THRESHOLD": "-0.1"}, "RISK_CASCADE_THRESHOLD", id="negative"),
        pytest.param({"RISK_CASCADE_THRESHOLD": "nan"}, "RISK_CASCADE_THRESHOLD", id="nan"),
        pytest.param({"RISK_CASCADE_THRESHOLD": "high"}, "RISK_CASCADE_THRESHOLD", id="word"),
        pytest.param({"RISK_CASCADE_THRESHOLD": "auto", "RISK_CASCADE_MAX_AUC_LOSS": "-1"},
                     "RISK_CASCADE_MAX_AUC_LOSS", id="negative-loss"),
        pytest.param({"RISK_CASCADE_THRESHOLD": "auto", "RISK_CASCADE_MAX_AUC_LOSS": "lots"},
                     "RISK_CASCADE_MAX_AUC_LOSS", id="word-loss"),
    ],
)
def test_bad_cascade_settings_are_a_config_error(env: dict[str, str], name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        cascade_settings(env)


def test_train_cascade_at_start_logs_the_operating_point(
        cheap: model.RiskModel, accounts: data.Accounts, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    small = rc.generated_feedback(20_000, accounts=accounts)
    monkeypatch.setattr(rc, "generated_feedback", lambda: small)
    with caplog.at_level(logging.INFO, logger=service.log.name):
        fixed = service.train_cascade(cheap, CascadeSettings(0.3))
    assert fixed.threshold == 0.3
    ready = [r for r in caplog.records if r.getMessage() == "risk cascade ready"]
    assert ready and ready[0].__dict__["chosen"] is False
    assert 0.0 < ready[0].__dict__["chosen_threshold"] < 1.0  # what "auto" would have served


# --- served: RiskScorer.score_cascade ------------------------------------------------------------------

GOOD: Any = {"account_id": 1, "amount": 10.0, "merchant_category": "grocery", "hour": 12}


@pytest.fixture
def store() -> Iterator[FeatureStore]:
    s = FeatureStore("sqlite:///:memory:")
    s.ensure_seeded(lambda: data.generate_accounts(50))
    yield s
    s.close()


def _scorer(store: FeatureStore, tuned: rc.Tuned, threshold: float | None) -> RiskScorer:
    scorer = RiskScorer()
    cascade = None if threshold is None else rc.Cascade(
        tuned.cascade.cheap, tuned.cascade.expensive, tuned.cascade.router, threshold)
    scorer.configure(store, tuned.cascade.cheap, 1 << 20, cascade)
    return scorer


@pytest.mark.parametrize(
    ("threshold", "path", "has_router"),
    [
        pytest.param(0.0, "expensive", True, id="escalate-all"),
        pytest.param(1.0, "cheap", True, id="router-never-reaches-1"),
        pytest.param(policy.CHEAP_ONLY, "cheap", False, id="cheap-only"),
        pytest.param(policy.EXPENSIVE_ONLY, "expensive", False, id="expensive-only"),
    ],
)
def test_score_cascade_answers_with_a_path(store: FeatureStore, tuned: rc.Tuned, threshold: float,
                                           path: str, has_router: bool) -> None:
    scorer = _scorer(store, tuned, threshold)
    items: list[Any] = [
        GOOD,
        {**GOOD, "account_id": 999_999},  # unknown account
        {**GOOD, "merchant_category": "casino"},  # bad input
        {**GOOD, "account_id": 7, "amount": 5_000.0, "merchant_category": "crypto", "hour": 3},
    ]
    results = scorer.score_cascade(items)
    plain = scorer.score(items)
    assert len(results) == len(items)
    assert isinstance(results[1], NotFound) and results[1].status == 404 and results[1].param == "account_id"
    assert isinstance(results[2], ClientError) and results[2].status == 400
    assert results[2].param == "merchant_category"
    for i in (0, 3):
        r = results[i]
        assert set(r) == {"account_id", "score", "decision", "path", "router_score", "model_version"}
        assert r["account_id"] == items[i]["account_id"] and r["path"] == path
        assert 0.0 <= r["score"] <= 1.0 and r["decision"] == decision(r["score"])
        assert (r["router_score"] is not None) == has_router
        if has_router:
            assert 0.0 <= r["router_score"] <= 1.0
        if path == "cheap":  # the cheap path is the served model: the same score as `score`
            assert r["score"] == pytest.approx(plain[i]["score"], rel=0, abs=1e-12)
    assert scorer.score_cascade([]) == []
    bad: Any = {**GOOD, "hour": 99}
    only_bad = scorer.score_cascade([bad])
    assert isinstance(only_bad[0], ClientError) and only_bad[0].param == "hour"


def test_score_cascade_with_the_cascade_off_is_a_404_not_a_500(store: FeatureStore, tuned: rc.Tuned) -> None:
    scorer = _scorer(store, tuned, None)
    with pytest.raises(NotFound) as info:
        scorer.score_cascade([GOOD])
    assert info.value.status == 404 and "RISK_CASCADE_THRESHOLD" in info.value.message
    assert scorer.score([GOOD])[0]["account_id"] == 1  # the other handlers are unchanged


def test_score_cascade_is_declared_like_score() -> None:
    specs = handler_specs(RiskScorer)
    spec, score = specs["score_cascade"], specs["score"]
    assert spec.params == score.params  # the same request schema
    assert spec.options.batch and spec.options.max_batch_size == 64 and spec.options.cache
    assert spec.options.cache_tags == ("account:{account_id}",) and spec.options.affinity == "account_id"
    assert spec.options.canary is None  # the deep health check must pass with the cascade off
    # the Open Inference Protocol serves the first batched handler: still `score`
    assert next(name for name, s in specs.items() if s.options.batch) == "score"
    validate = compile_params(spec.params)
    with pytest.raises(ClientError) as info:
        validate({"transactions": [GOOD, {**GOOD, "amount": "x"}]})
    assert info.value.param == "transactions[1].amount"


# --- through a gateway (in process, no sockets): status codes, never a 500 -------------------------

async def test_score_cascade_through_the_gateway(store: FeatureStore, tuned: rc.Tuned) -> None:
    cascade = tuned.cascade

    class Cascaded(RiskScorer):
        def setup(self) -> None:
            self.configure(store, cascade.cheap, 1 << 20, cascade)

    class Plain(RiskScorer):
        def setup(self) -> None:
            self.configure(store, cascade.cheap, 1 << 20)

    config = Config(deployments=(DeploymentConfig(name="risk", service="tests:Cascaded"),
                                 DeploymentConfig(name="plain", service="tests:Plain")))
    gw = Gateway(config, transport=InProcessTransport())
    deployments = [await start_inprocess(gw, "risk", Cascaded), await start_inprocess(gw, "plain", Plain)]
    token = getattr(gw, "admin_token", None)
    headers = {"authorization": f"Bearer {token}"} if token else {}
    url = "/v1/deployments/risk/score_cascade"
    try:
        transport = httpx.ASGITransport(app=gw)  # type: ignore[arg-type]  # dict vs MutableMapping
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost", headers=headers) as c:
            risky = {**GOOD, "account_id": 7, "amount": 5_000.0, "merchant_category": "crypto", "hour": 3}
            r = await c.post(url, json={"transactions": [GOOD, risky]})
            assert r.status_code == 200, r.text
            results = r.json()
            assert [x["path"] in ("cheap", "expensive") for x in results] == [True, True]
            assert all(0.0 <= x["router_score"] <= 1.0 for x in results)
            cases: list[tuple[Any, int, str]] = [
                ({"transactions": [{**GOOD, "merchant_category": "casino"}]}, 400, "merchant_category"),
                ({"transactions": [{**GOOD, "amount": "x"}]}, 400, "transactions[0].amount"),
                ({"transactions": [{**GOOD, "hour": 24}]}, 400, "hour"),
                ({"transactions": "all of them"}, 400, "transactions"),
                ({"transactions": [{**GOOD, "account_id": 999_999}]}, 404, "account_id"),
            ]
            for body, status, param in cases:
                r = await c.post(url, json=body)
                assert r.status_code == status, (body, r.text)
                assert param in r.text, (body, r.text)
            r = await c.post("/v1/deployments/plain/score_cascade", json={"transactions": [GOOD]})
            assert r.status_code == 404 and "RISK_CASCADE_THRESHOLD" in r.text
            r = await c.post("/v1/deployments/plain/score", json={"transactions": [GOOD]})
            assert r.status_code == 200 and "top_features" in r.json()[0]
    finally:
        for d in deployments:
            await d.stop()
