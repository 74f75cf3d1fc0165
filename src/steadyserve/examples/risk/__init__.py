"""Real-time transaction risk scoring: account features in a database, a local model.

    data.py      deterministic generator of accounts and labelled transactions (no downloads)
    features.py  the feature store: SQLite or PostgreSQL via SQLAlchemy Core; seeding, reads,
                 the transaction feed's updates
    model.py     logistic regression trained at first start, saved under the data directory;
                 scores with exact per-feature contributions
    cascade.py   the inference-path cascade: gradient boosting behind the logistic regression,
                 a learned router between them, the threshold from policies/cascade.py
    service.py   `RiskScorer`, the steadyserve service (`steadyserve.examples.risk.service:RiskScorer`)

The service is imported from `service` directly (`RiskScorer` pulls in the cache and the
database layer, which the generator and the model do not need).
"""
