"""The risk example's inference-path cascade: its cost/quality curve on held-out rows (issue 11).

    .venv/bin/python benchmarks/cascade.py [--quick] [--steps 20]

In process, no server. Trains what `RISK_CASCADE_THRESHOLD=auto` trains at a replica's start
(examples/risk/cascade.py): the served logistic regression (`model.train()`, the same model
file a replica writes), then gradient boosting and the router on 60 % of the generated
feedback; measures each path's time per request on this CPU (batches of 1, as a lone
transaction is served, and of 64, the handler's largest batch); chooses the threshold on
the next 20 % (the cheapest point with AUC within 0.005 of gradient boosting alone); and
reports the curve on the last 20 %, which neither the models nor the choice saw. Twice: on
the feedback with the two emerging fraud patterns, and on the generator's own labels, where
the logistic regression is the true model and the cascade should escalate nothing.

Then the whole handler, in process: `RiskScorer.score` against `score_cascade` at the chosen
threshold and with everything escalated, one transaction per call, over an in-memory SQLite
feature store with the 100,000 accounts and a warm feature cache — what the saving is worth
once the feature lookup and the answer's assembly are counted.

Figures only; nothing is asserted. Results go to benchmarks/results/cascade-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving import REPO, git_state, log, machine_info

from steadyserve.examples.risk import cascade as rc
from steadyserve.examples.risk import data, model
from steadyserve.policies import cascade as policy

RESULTS = REPO / "benchmarks" / "results"


def point_json(p: policy.CurvePoint) -> dict[str, Any]:
    return {"threshold": p.threshold if np.isfinite(p.threshold) else str(p.threshold),
            "kind": p.kind, "escalated": p.escalated, "cost_us": p.cost, "accuracy": p.accuracy,
            "auc": p.auc, "brier": p.brier}


def curve_at(e: rc.Evaluated, costs: rc.Costs, steps: int, extra: list[float]) -> policy.Curve:
    """The held-out curve over the default grid plus the thresholds in `extra`."""
    grid = policy.cost_quality_curve(e.router_score, e.cheap_correct, e.expensive_correct, 0.0, 0.0,
                                     steps=steps)
    thresholds = sorted({p.threshold for p in grid.cascade} | {t for t in extra if np.isfinite(t)})
    return policy.cost_quality_curve(
        e.router_score, e.cheap_correct, e.expensive_correct, costs.cheap_us, costs.expensive_us,
        router_cost=costs.router_us, cheap_probability=e.cheap_p, expensive_probability=e.expensive_p,
        label=e.label, thresholds=thresholds)


def table(curve: policy.Curve, single: rc.Costs, batched: rc.Costs, chosen: float) -> str:
    """The curve; the batch-64 column models one call of the expensive model on the k
    escalated rows of a batch as fixed + k × per-row, fitted to the two measured batch sizes
    (its fixed part is paid once per batch that escalates anything)."""
    size = batched.batch_size
    per_row = max(0.0, (batched.expensive_us * size - single.expensive_us) / (size - 1))
    fixed = max(0.0, single.expensive_us - per_row)

    def cost64(p: policy.CurvePoint) -> float:
        if p.kind == "cheap-only":
            return batched.cheap_us
        if p.kind == "expensive-only":
            return batched.expensive_us
        k = p.escalated * size
        any_escalated = 1.0 - (1.0 - p.escalated) ** size  # a batch escalating at least one row
        return (batched.cheap_us + batched.router_us
                + (fixed * any_escalated + per_row * k) / size)

    lines = [f"{'threshold':>14} {'escalated':>9} {'µs/req (1)':>11} {'µs/req (64)':>12} "
             f"{'accuracy':>9} {'AUC':>7} {'Brier':>8}"]
    for p in curve.points:
        name = p.kind if p.kind != "cascade" else f"{p.threshold:.4f}"
        mark = "  ← chosen" if p.threshold == chosen else ""
        lines.append(f"{name:>14} {p.escalated:>9.1%} {p.cost:>11.1f} {cost64(p):>12.2f} "
                     f"{p.accuracy or 0:>9.4f} {p.auc or 0:>7.4f} {p.brier or 0:>8.5f}{mark}")
    return "\n".join(lines)


def summary(curve: policy.Curve, chosen: float) -> tuple[str, dict[str, Any]]:
    point = next(p for p in curve.points if p.threshold == chosen)
    cheap, expensive = curve.cheap_only, curve.expensive_only
    out = {"chosen": point_json(point), "cheap_only": point_json(cheap),
           "expensive_only": point_json(expensive),
           "cost_vs_expensive": point.cost / expensive.cost,
           "cost_vs_cheap": point.cost / cheap.cost}
    text = (f"chosen ({point.kind}, threshold {point.threshold:.4g}): {point.escalated:.1%} escalated, "
            f"{point.cost:.1f} µs/request = {point.cost / expensive.cost:.3f} × expensive-only "
            f"({expensive.cost:.1f} µs), {point.cost / cheap.cost:.1f} × cheap-only ({cheap.cost:.1f} µs); "
            f"AUC {point.auc:.4f} vs cheap {cheap.auc:.4f} / expensive {expensive.auc:.4f}; "
            f"accuracy {point.accuracy:.4f} vs {cheap.accuracy:.4f} / {expensive.accuracy:.4f}")
    return text, out


def world(name: str, cheap: model.RiskModel, accounts: data.Accounts, args: argparse.Namespace,
          emerging: bool) -> dict[str, Any]:
    feedback = rc.generated_feedback(args.feedback, accounts=accounts, emerging=emerging)
    started = time.perf_counter()
    tuned = rc.build(cheap, feedback)
    build_s = time.perf_counter() - started
    _, _, held_out = feedback.split()
    single = rc.measure_costs(tuned.cascade, held_out.x, batch_size=1, min_s=args.min_s)
    batched = rc.measure_costs(tuned.cascade, held_out.x, batch_size=64, n_batches=20, min_s=args.min_s)
    chosen = tuned.cascade.threshold
    curve = curve_at(rc.evaluate(tuned.cascade, held_out), single, args.steps, [chosen])
    text, out = summary(curve, chosen)
    print(f"\n== {name}: {len(feedback):,} labelled rows (fit / choose / held out "
          f"{' / '.join(str(len(p)) for p in feedback.split())}); fraud {feedback.label.mean():.2%}; "
          f"trained + chosen in {build_s:.1f} s")
    print(f"costs per request, batch 1: cheap {single.cheap_us:.1f} µs, router {single.router_us:.1f} µs, "
          f"expensive {single.expensive_us:.1f} µs; batch 64: {batched.cheap_us:.2f} / "
          f"{batched.router_us:.2f} / {batched.expensive_us:.2f} µs")
    print(f"chosen on the choice split: {tuned.choice.reason}")
    print(table(curve, single, batched, chosen))
    print(text)
    return {"name": name, "emerging": emerging, "rows": len(feedback), "build_s": build_s,
            "costs_batch1": vars_of(single), "costs_batch64": vars_of(batched),
            "choice_reason": tuned.choice.reason, "choice_on_choice_split": point_json(tuned.choice.point),
            "held_out": [point_json(p) for p in curve.points], **out, "tuned": tuned}


def vars_of(costs: rc.Costs) -> dict[str, Any]:
    return {"cheap_us": costs.cheap_us, "router_us": costs.router_us,
            "expensive_us": costs.expensive_us, "batch_size": costs.batch_size}


def handler_times(tuned: rc.Tuned, accounts: data.Accounts, n: int, min_s: float) -> dict[str, Any]:
    """µs per call of the served handlers, one transaction per call, warm feature cache."""
    from steadyserve.examples.risk.features import FeatureStore
    from steadyserve.examples.risk.service import RiskScorer

    store = FeatureStore("sqlite:///:memory:")
    try:
        started = time.perf_counter()
        store.ensure_seeded(lambda: accounts)
        log(f"seeded {len(accounts):,} accounts in {time.perf_counter() - started:.1f} s")
        tx = data.generate_transactions(accounts, n, seed=rc.FEEDBACK_SEED + 7)
        items: list[Any] = [
            {"account_id": int(accounts.account_id[i]), "amount": float(a),
             "merchant_category": data.CATEGORY_NAMES[c], "hour": int(h)}
            for i, a, c, h in zip(tx.account_index, tx.amount, tx.category, tx.hour, strict=True)]
        out: dict[str, Any] = {}
        paths = (("score (cheap only)", None), ("score_cascade, chosen", tuned.cascade.threshold),
                 ("score_cascade, all escalated", policy.EXPENSIVE_ONLY))
        for label, threshold in paths:
            scorer = RiskScorer()
            cascade = None if threshold is None else rc.Cascade(
                tuned.cascade.cheap, tuned.cascade.expensive, tuned.cascade.router, threshold)
            scorer.configure(store, tuned.cascade.cheap, 64 << 20, cascade)
            call = scorer.score if threshold is None else scorer.score_cascade
            for item in items:  # warm the feature cache
                call([item])
            rounds: list[float] = []
            deadline = time.perf_counter() + min_s
            while len(rounds) < 3 or time.perf_counter() < deadline:
                t0 = time.perf_counter()
                for item in items:
                    call([item])
                rounds.append((time.perf_counter() - t0) / len(items) * 1e6)
            out[label] = statistics.median(rounds)
        return out
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--feedback", type=int, default=rc.N_FEEDBACK, help="generated labelled rows")
    p.add_argument("--steps", type=int, default=20, help="escalation shares on the printed curve")
    p.add_argument("--min-s", type=float, default=1.0, help="seconds of timing per path at least")
    p.add_argument("--handler-calls", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1,
                   help="OpenMP/BLAS threads (a replica gets OMP_NUM_THREADS = its torch_threads: "
                        "1 for the risk replica of a bare `steadyserve run` on 2 cores)")
    p.add_argument("--quick", action="store_true", help="50,000 rows, 0.2 s timings")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.feedback, args.min_s, args.handler_calls = 50_000, 0.2, 500
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=args.threads):
        return run(args)


def run(args: argparse.Namespace) -> int:
    started = time.time()
    accounts = data.generate_accounts()
    t0 = time.perf_counter()
    pipeline, auc = model.train(accounts)
    cheap = model.RiskModel.from_pipeline(pipeline, auc)
    machine = machine_info()
    print(f"risk cascade benchmark, {time.strftime('%Y-%m-%dT%H:%M:%S')}, {machine.get('cpu', '?')}, "
          f"{machine['cores']} cores, {args.threads} OpenMP/BLAS thread(s); the served logistic "
          f"regression trained in "
          f"{time.perf_counter() - t0:.1f} s (AUC {auc:.4f} on the generator's held-out rows)")
    worlds = [world("feedback with the emerging patterns", cheap, accounts, args, emerging=True),
              world("the generator's own labels", cheap, accounts, args, emerging=False)]
    handlers = handler_times(worlds[0]["tuned"], accounts, args.handler_calls, args.min_s)
    base = handlers["score (cheap only)"]
    print("\n== the served handlers, in process, one transaction per call, warm feature cache")
    for label, us in handlers.items():
        print(f"{label:<32}{us:>9.1f} µs/call  ({us / base:.2f} × score)")
    load = os.getloadavg()
    print(f"load average at the end (1, 5, 15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"on {machine['cores']} cores (this run's own share included)")
    out = {"load_average": load, "worlds": [{k: v for k, v in w.items() if k != "tuned"} for w in worlds],
           "handlers_us": handlers, "args": {k: str(v) for k, v in vars(args).items()},
           "git": git_state(), "machine": machine, "wall_s": round(time.time() - started, 1)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = args.out or RESULTS / f"cascade-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2, default=str))
    log(f"results: {path} ({out['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
