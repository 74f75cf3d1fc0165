"""Balancers side by side on replicas that differ, and on equal ones (issue 10).

    make bench-balancers     # or: .venv/bin/python benchmarks/balancers.py [--quick]

benchmarks/services/uneven.py on 3 replicas: each request computes for 8 ms × (1 + chars /
2000) on its replica's one model thread (texts of 100–4,000 characters, so request sizes
differ 3x), and in the "uneven" scenario replica 0 takes 3x as long. For each scenario, each
of power_of_two, peak_ewma and least_squares serves the same open-loop load (the same
request sequence at the same rate, after a warm-up) from a fresh gateway, in interleaved
rounds. Printed per balancer: p50 / p99 of the answers, errors, the slow replica's share of
the traffic, p99 against the raw model (the same requests' compute alone, on a fast replica,
no HTTP) and against power_of_two in the same run. Figures only; nothing is asserted.
Results go to benchmarks/results/balancers-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from services.uneven import service_time_s
from serving import REPO, Server, free_port, git_state, log, machine_info, running, steadyserve_argv

from steadyserve.testing.load import all_of, in_window, is_ok, percentile, run_load

RESULTS = REPO / "benchmarks" / "results"
BALANCER_NAMES = ("power_of_two", "peak_ewma", "least_squares")
SERVICE = "benchmarks/services/uneven.py:Uneven"


def texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["x" * rng.randint(100, 4000) for _ in range(n)]


def raw_model(corpus: list[str]) -> dict[str, float]:
    """The compute alone for the same requests on a fast replica: the floor of any latency."""
    times = [service_time_s(len(t)) for t in corpus]
    return {"p50_s": percentile(times, 50) or 0.0, "p99_s": percentile(times, 99) or 0.0,
            "mean_s": statistics.fmean(times)}


async def one(balancer: str, slow_factor: float, rate: float, duration_s: float,
              warm_s: float, corpus: list[str]) -> dict[str, Any]:
    port = free_port()
    server = Server(f"{balancer}-x{slow_factor:g}",
                    [*steadyserve_argv(SERVICE, 3, port), "--balancer", balancer],
                    port, RESULTS / "logs" / f"balancers-{balancer}-x{slow_factor:g}.log",
                    env={"UNEVEN_SLOW_FACTOR": str(slow_factor)})
    info: dict[str, Any] = {"balancer": balancer, "slow_factor": slow_factor}
    url = f"http://127.0.0.1:{port}/v1/deployments/uneven/work"

    def body(i: int) -> dict[str, str]:
        return {"text": corpus[i % len(corpus)]}

    with running(server, info):
        # warm-up: every balancer starts from what it learns here, at the same rate
        await run_load(url, rate, warm_s, body_fn=lambda i: body(i + 7919))
        result = await run_load(url, rate, duration_s, body_fn=body, timeout_s=10.0)
    window = in_window(1.0, duration_s)
    share = result.replica_share(1.0, duration_s)
    info.update({
        "requests": result.total, "errors": result.error_count(),
        "error_kinds": dict(result.errors()), "error_codes": dict(result.error_codes()),
        "p50_s": result.p50(all_of(is_ok, window)), "p99_s": result.p99(all_of(is_ok, window)),
        "max_send_lag_s": result.max_send_lag_s(),
        "slow_share": share.get("uneven-0", 0.0), "share": share,
    })
    log(f"{balancer} x{slow_factor:g}: p50 {info['p50_s']} p99 {info['p99_s']} "
        f"errors {info['error_codes'] or info['error_kinds']} share {share}")
    return info


def table(runs: list[dict[str, Any]], raw: dict[str, float], slow_factor: float) -> str:
    mine = [r for r in runs if r["slow_factor"] == slow_factor]
    base = [r["p99_s"] for r in mine if r["balancer"] == "power_of_two" and r["p99_s"]]
    base_p99 = statistics.median(base) if base else None
    lines = [f"scenario: replica 0 {slow_factor:g}x slower" if slow_factor != 1
             else "scenario: equal replicas",
             f"{'balancer':<15}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'slow share':>12}"
             f"{'p99/raw':>9}{'p99/p2c':>9}"]
    for name in BALANCER_NAMES:
        for r in (x for x in mine if x["balancer"] == name):
            p50, p99 = r["p50_s"], r["p99_s"]
            lines.append(
                f"{name:<15}{p50 * 1000 if p50 else float('nan'):>9.1f}"
                f"{p99 * 1000 if p99 else float('nan'):>9.1f}{r['errors']:>8}"
                f"{r['slow_share']:>12.1%}"
                f"{(p99 / raw['p99_s']) if p99 else float('nan'):>9.2f}"
                f"{(p99 / base_p99) if p99 and base_p99 else float('nan'):>9.2f}")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    corpus = texts(4000, seed=11)
    raw = raw_model(corpus)
    runs: list[dict[str, Any]] = []
    for round_ in range(args.rounds):
        for slow_factor in (args.slow_factor, 1.0):
            # interleaved, and rotated each round: no balancer always runs first or last
            order = BALANCER_NAMES[round_ % 3:] + BALANCER_NAMES[:round_ % 3]
            for balancer in order:
                runs.append(await one(balancer, slow_factor, args.rate, args.duration_s,
                                      args.warm_s, corpus))
    return {"raw_model": raw, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=110.0,
                   help="requests/s offered (uneven capacity ~150/s, equal ~185/s)")
    p.add_argument("--duration-s", type=float, default=25.0)
    p.add_argument("--warm-s", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--slow-factor", type=float, default=3.0)
    p.add_argument("--quick", action="store_true", help="one round of 10 s")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.duration_s, args.warm_s = 1, 10.0, 3.0
    started = time.time()
    out = asyncio.run(main_async(args))
    out.update({"args": vars(args), "git": git_state(), "machine": machine_info(),
                "wall_s": round(time.time() - started, 1)})
    raw = out["raw_model"]
    text = "\n\n".join([
        f"raw model (the same requests' compute on a fast replica): p50 "
        f"{raw['p50_s'] * 1000:.1f} ms, p99 {raw['p99_s'] * 1000:.1f} ms; offered "
        f"{args.rate:g} req/s, {args.rounds} round(s) of {args.duration_s:g} s",
        table(out["runs"], raw, args.slow_factor), table(out["runs"], raw, 1.0)])
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"balancers-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2, default=str))
    log(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
