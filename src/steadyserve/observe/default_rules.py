"""The rules every deployment gets with no configuration, each with its runbook line and the
automatic responses it triggers. `RULE_ACTIONS` maps a rule name to action names
(see policies/actions.py); the responder runs them when the alert starts firing.

Each rule and its thresholds are declared here once: the built-in evaluator runs these
objects, and `steadyserve export prometheus-rules` (observe/prom_rules.py) renders the same
objects as PromQL (`rule.prometheus()`). LatencyAnomaly's EWMA has no PromQL equivalent;
its Prometheus stand-in is declared beside it.
"""

from __future__ import annotations

from ..config import AlertingConfig
from ..policies.alert_lifecycle import Inhibit
from ..policies.alert_rules import (
    BurnRate,
    EwmaAnomaly,
    ExportedRule,
    Threshold,
    gauge,
    histogram_quantile,
    rate,
    ratio,
)

REQUESTS = "steadyserve_requests_total"
UPSTREAM = "steadyserve_upstream_attempts_total"
DURATION_BUCKETS = "steadyserve_request_duration_seconds_bucket"


def default_rules(cfg: AlertingConfig) -> list[ExportedRule]:
    fast = cfg.fast_window_s

    def p99(window_s: float) -> str:
        return histogram_quantile(0.99, DURATION_BUCKETS, window_s, by=("deployment",)).promql

    return [
        Threshold(
            name="ReplicaCrashLooping", severity="page",
            # more than 3 restarts in 5 minutes; the half step keeps Prometheus' extrapolated
            # increase of exactly 3 restarts (a little over 3) on the same side as ours
            expr=rate("steadyserve_replica_restarts_total", 300, by=("deployment",)),
            op=">", threshold=3.5 / 300,
            annotations={
                "summary": "replicas of {deployment} restarted more than 3 times in 5 minutes",
                "runbook": "Read the replica logs around the exits (`steadyserve status` shows "
                           "exit codes); if it began with a rollout, roll back "
                           "(`steadyserve rollout {deployment} --service <previous>`); "
                           "an OOM shows as exit code -9.",
            },
        ),
        Threshold(
            name="DeploymentNotReady", severity="page", for_s=cfg.not_ready_for_s,
            expr=gauge("steadyserve_replicas", match={"state": "ready"}),
            op="<", threshold=1,
            annotations={
                "summary": "{deployment} has no ready replica",
                "runbook": "Every request to {deployment} gets 503. `steadyserve status`: are "
                           "replicas starting (slow setup?), in backoff (crashing at start?) "
                           "or unhealthy (failing checks)? Their logs say why.",
            },
        ),
        Threshold(
            name="ReplicaErrors", severity="ticket", for_s=cfg.fast_for_s,
            expr=ratio(UPSTREAM, UPSTREAM, fast, numerator_filter={"outcome": "5xx"},
                       by=("deployment", "replica")),
            op=">", threshold=0.5,
            annotations={
                "summary": "replica {replica} of {deployment} fails most of its calls "
                           "(error ratio {value:.2f})",
                "runbook": "Clients are mostly spared (retries go elsewhere, the replica gets "
                           "ejected); steadyserve restarts the replica. If it keeps failing "
                           "after the restart, its logs show the handler's exception.",
            },
        ),
        BurnRate(
            name="ErrorBudgetBurn", errors_counter=REQUESTS, total_counter=REQUESTS,
            error_filter={"code": "5xx"}, slo_target=cfg.slo_target, by=("deployment",),
            min_requests=cfg.slo_min_requests,
            annotations={
                "summary": "{deployment} is spending its error budget too fast ({value:.1f}x)",
                "runbook": "5xx answers above the SLO: check ReplicaErrors and "
                           "DeploymentNotReady for the cause; if a rollout started it, roll "
                           "back. A page means the monthly budget is gone within days.",
            },
        ),
        EwmaAnomaly(
            name="LatencyAnomaly", severity="ticket",
            expr=histogram_quantile(0.99, DURATION_BUCKETS, 60, by=("deployment",)),
            direction="up", sample_every_s=10,
            # PromQL has no EWMA z-score: Prometheus gets the usual stand-in instead, p99 over
            # 5 minutes above 3x the p99 over the last day, for 10 minutes (not equivalent)
            standin_promql=f"{p99(300)} > 3 * {p99(86_400)}", standin_for_s=600,
            annotations={
                "summary": "p99 latency of {deployment} is unusually high ({value:.3f} s)",
                "runbook": "Compare with load (requests/s) and the admission limit; a "
                           "slower model version, CPU contention or a slow replica "
                           "(outlier ejections) are the usual causes.",
            },
        ),
        Threshold(
            name="DatabaseDown", severity="page", for_s=30,
            expr=gauge("steadyserve_database_up"), op="<", threshold=1,
            annotations={
                "summary": "the state database does not answer",
                "runbook": "Alert history and actions are kept in memory meanwhile and are "
                           "lost if the gateway restarts; check the database URL and server.",
            },
        ),
        Threshold(
            name="CacheL2Down", severity="ticket", for_s=60,
            expr=gauge("steadyserve_cache_l2_up"), op="<", threshold=1,
            annotations={
                "summary": "the Redis L2 response cache does not answer",
                "runbook": "Clients are spared: each gateway serves from its own L1 and "
                           "reconnects by itself. Meanwhile hit ratios drop, gateways do not "
                           "share answers, and invalidations reach other gateways only when "
                           "Redis returns (they are replayed then). Check the redis_url and "
                           "the Redis server (`redis-cli ping`).",
            },
        ),
        Threshold(
            name="EventLoopLag", severity="ticket", for_s=60,
            expr=gauge("steadyserve_event_loop_lag_seconds"), op=">", threshold=0.1,
            annotations={
                "summary": "the gateway's event loop lags {value:.3f} s",
                "runbook": "Everything in the gateway queues behind a blocked loop: look for "
                           "CPU saturation of the gateway process (`top`), or blocking code; "
                           "run more gateway processes behind a load balancer.",
            },
        ),
    ]


# Not ErrorBudgetBurn → shed_batch by default: admission control already sheds batch traffic
# first under overload, and a blanket shed on top of it (503s count against the SLO) cut
# goodput to the interactive share in the 3x-overload chaos test. Opt in with
# [alerting] actions = {ErrorBudgetBurn = ["shed_batch"]}.
RULE_ACTIONS: dict[str, tuple[str, ...]] = {
    "ReplicaErrors": ("restart_replica",),
    "ReplicaCrashLooping": ("rollback",),
}

INHIBITS = (
    # no replica at all explains every other symptom of the deployment
    Inhibit({"alertname": "DeploymentNotReady"}, {"alertname": "LatencyAnomaly"}, ("deployment",)),
    Inhibit({"alertname": "DeploymentNotReady"}, {"alertname": "ErrorBudgetBurn"}, ("deployment",)),
    Inhibit({"alertname": "DeploymentNotReady"}, {"alertname": "ReplicaErrors"}, ("deployment",)),
)
