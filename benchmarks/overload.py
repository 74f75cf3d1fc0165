"""Overload with one priority class: the real MiniLM service on 2 replicas, interactive
traffic only, offered at 3x its measured capacity, open loop (no coordinated omission).

    make bench-overload          # or: .venv/bin/python benchmarks/overload.py [--quick]

Phases, each against a fresh server on 127.0.0.1, in one run:
  1. unloaded: 5 requests/s, before anything else; p50 / p99 of what a calm client sees
  2. capacity: offered well above what it can do for a few seconds; goodput = capacity
     (after each push, wait until a lone request is fast again: a server without
     admission control works off its backlog long after its clients gave up)
  3. 3x capacity for --duration-s: goodput (x capacity), accepted p50 / p99 (x unloaded),
     rejection p99 (ms), share of rejections carrying Retry-After, error kinds;
     meanwhile /metrics is scraped every second and the gateway's event-loop lag read
     from it (worst 1 s window)
  4. the peer: the same model behind FastAPI (benchmarks/peers/fastapi_embed.py, no
     admission control), the same unloaded probe and the same 3x load: what a client of a
     server without overload protection sees
  5. the raw model in process (no HTTP): batch-1 and batch-32 sentences/s, the limit

Targets (issue 9): goodput >= 0.9x capacity, rejections <= 50 ms p99 with Retry-After,
accepted p99 <= 2x unloaded. Figures only; nothing is asserted. Results go to
benchmarks/results/overload-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving import (
    REPO,
    CpuWatch,
    Server,
    free_port,
    git_state,
    log,
    machine_info,
    make_corpus,
    running,
    steadyserve_argv,
    uvicorn_argv,
)

from steadyserve.testing.load import (
    LoadResult,
    all_of,
    in_window,
    is_ok,
    is_rejection,
    run_load,
)

RESULTS = REPO / "benchmarks" / "results"
NO_STORE = {"Cache-Control": "no-store"}
UNLOADED_RATE = 5.0  # requests/s: "unloaded" (each server here does 60+)


def body_fn(corpus: list[str], model: str = "minilm"):  # type: ignore[no-untyped-def]
    def body(i: int) -> dict[str, Any]:
        return {"model": model, "input": [corpus[i % len(corpus)]]}
    return body


async def scrape_lag(port: int, stop: asyncio.Event, into: list[float]) -> None:
    """GET /metrics every second (as Prometheus would) and keep the loop-lag gauge."""
    async with aiohttp.ClientSession() as s:
        while not stop.is_set():
            try:
                async with s.get(f"http://127.0.0.1:{port}/metrics",
                                 timeout=aiohttp.ClientTimeout(total=5)) as r:
                    text = await r.text()
                for line in text.splitlines():
                    if line.startswith("steadyserve_event_loop_lag_seconds "):
                        into.append(float(line.split()[1]))
            except (aiohttp.ClientError, TimeoutError):
                into.append(float("nan"))
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass


async def measure(url: str, port: int | None, corpus: list[str], rate: float, seconds: float,
                  warmup_s: float, *, scrape: bool = False) -> tuple[LoadResult, list[float]]:
    lags: list[float] = []
    stop = asyncio.Event()
    scraper = asyncio.create_task(scrape_lag(port, stop, lags)) if scrape and port else None
    try:
        # no-store: the corpus repeats, and cache hits would measure the cache, not overload
        result = await run_load(url, rate, seconds, body_fn=body_fn(corpus), timeout_s=10.0,
                                headers_fn=lambda i: NO_STORE)
    finally:
        stop.set()
        if scraper is not None:
            await scraper
    return result, lags[int(warmup_s):]


def summary(result: LoadResult, start_s: float, end_s: float) -> dict[str, Any]:
    window = in_window(start_s, end_s)
    rejected = result.select(all_of(is_rejection, window))
    accepted = all_of(is_ok, window)
    return {
        "sent": result.sent,
        "goodput_per_s": round(result.goodput_per_s(start_s, end_s), 1),
        "accepted_p50_ms": _ms(result.p50(accepted)),
        "accepted_p99_ms": _ms(result.p99(accepted)),
        "rejected": len(rejected),
        "rejection_p99_ms": _ms(result.p99(all_of(is_rejection, window))),
        "rejections_with_retry_after": round(
            sum(1 for r in rejected if r.retry_after) / len(rejected), 3) if rejected else None,
        "errors": dict(result.errors(window)),
    }


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 2)


async def settle(url: str, corpus: list[str], limit_s: float = 60.0) -> float:
    """Wait until a lone request is answered fast again (a server with no admission control
    works through the backlog of a push long after its clients gave up): seconds waited."""
    started = time.monotonic()
    fast = 0
    async with aiohttp.ClientSession() as s:
        while fast < 3 and time.monotonic() - started < limit_s:
            t = time.monotonic()
            try:
                async with s.post(url, json=body_fn(corpus)(0), headers=NO_STORE,
                                  timeout=aiohttp.ClientTimeout(total=10)) as r:
                    await r.read()
                fast = fast + 1 if time.monotonic() - t < 0.25 else 0
            except (aiohttp.ClientError, TimeoutError):
                fast = 0
            await asyncio.sleep(0.5)
    return round(time.monotonic() - started, 1)


async def phases(url: str, port: int | None, corpus: list[str], args: argparse.Namespace,
                 guess: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # unloaded first, at a rate far below any capacity here, before any push backs it up
    unloaded, _ = await measure(url, port, corpus, UNLOADED_RATE, args.unloaded_s, 0)
    out["unloaded"] = summary(unloaded, 1, args.unloaded_s)
    if guess is None:  # a first guess of capacity from a short push
        probe, _ = await measure(url, port, corpus, 400.0, 4, 0)
        guess = max(5.0, probe.goodput_per_s(1, 4))
        out["settle_after_probe_s"] = await settle(url, corpus)
    push, _ = await measure(url, port, corpus, guess * 1.6, 8, 0)
    capacity = push.goodput_per_s(2, 8)
    out["capacity_per_s"] = round(capacity, 1)
    out["settle_after_capacity_s"] = await settle(url, corpus)
    rate = 3 * capacity
    window_start = time.time()
    over, lags = await measure(url, port, corpus, rate, args.duration_s, 2, scrape=True)
    s = summary(over, 2, args.duration_s)
    s["offered_per_s"] = round(rate, 1)
    s["goodput_x_capacity"] = round(s["goodput_per_s"] / capacity, 3) if capacity else None
    unloaded_p99 = out["unloaded"]["accepted_p99_ms"]
    s["accepted_p99_x_unloaded"] = round(s["accepted_p99_ms"] / unloaded_p99, 2) \
        if s["accepted_p99_ms"] and unloaded_p99 else None
    finite = [v for v in lags if v == v]
    s["loop_lag_max_ms"] = round(1000 * max(finite), 2) if finite else None
    s["metrics_scrapes"] = len(lags)
    s["wall_window"] = [window_start + 2, window_start + args.duration_s]
    out["overload_3x"] = s
    return out


LOAD_NICE = 5  # the load generator runs as nice as the replicas (the gateway stays at 0)


def load_process(url: str, port: int | None, args: argparse.Namespace) -> dict[str, Any]:
    """Run the phases in a child process at the replicas' niceness: on a 2-core machine the
    load generator shares the cores with the server, and a client favoured over the model
    would slow it down in a way no remote client does."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--_phases", url,
            "--_port", str(port or 0), "--duration-s", str(args.duration_s),
            "--unloaded-s", str(args.unloaded_s)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=REPO,
                          preexec_fn=lambda: os.nice(LOAD_NICE))
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def run(coro: Any) -> Any:
    """The load generator on uvloop: on a 2-core machine its CPU is taken from the server."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def raw_model(corpus: list[str]) -> dict[str, Any]:
    """Sentences/s of the model in process (the limit), in a child with 1 torch thread per
    replica's worth: 2 processes would share the 2 cores as the replicas do."""
    code = (
        "import time, json, sys\n"
        "import torch; torch.set_num_threads(1)\n"
        "from steadyserve.examples.embedding import Embedder\n"
        "e = Embedder(); e.setup()\n"
        "corpus = json.loads(sys.stdin.read())\n"
        "out = {}\n"
        "for b in (1, 32):\n"
        "    e.embed(corpus[:b]); n = 0; t = time.perf_counter()\n"
        "    while time.perf_counter() - t < 3:\n"
        "        e.embed(corpus[n % 1000: n % 1000 + b]); n += b\n"
        "    out[f'batch_{b}_per_s'] = round(n / (time.perf_counter() - t), 1)\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(corpus),
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    one = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**one, "two_processes_batch_32_per_s": round(2 * one["batch_32_per_s"], 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short phases (a smoke run)")
    p.add_argument("--duration-s", type=float, default=20.0, help="seconds at 3x capacity")
    p.add_argument("--unloaded-s", type=float, default=8.0)
    p.add_argument("--no-peer", action="store_true", help="skip the FastAPI peer")
    p.add_argument("--server-src", type=Path, metavar="DIR",
                   help="serve steadyserve from this source tree (the src/ of another "
                        "checkout, e.g. a `git worktree` of an older commit): A/B in one run")
    p.add_argument("--resilience", action="append", default=[], metavar="KEY=VALUE",
                   help="a [resilience] setting for the served deployment (repeatable), "
                        "e.g. limit_latency_tolerance=0 to see throughput-first admission")
    p.add_argument("--out", type=Path)
    p.add_argument("--_phases", help=argparse.SUPPRESS)  # the child: run the load phases
    p.add_argument("--_port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._phases:
        corpus = make_corpus(2000, 20240601)
        print(json.dumps(run(phases(args._phases, args._port or None, corpus, args, None))))
        return 0
    if args.quick:
        args.duration_s, args.unloaded_s = 8.0, 4.0
    corpus = make_corpus(2000, 20240601)
    res: dict[str, Any] = {"machine": machine_info(), "git": git_state(),
                           "args": {k: str(v) if isinstance(v, Path) else v
                                    for k, v in vars(args).items()}}
    run_dir = RESULTS / time.strftime("overload-%Y%m%d-%H%M%S")
    port = free_port()
    env = {"STEADYSERVE_DATA_DIR": str(run_dir / "data")}
    if args.server_src:
        env["PYTHONPATH"] = str(args.server_src.resolve())
    ours = Server("steadyserve", steadyserve_argv(None, None, port), port,
                  run_dir / "steadyserve.log", env=env)
    (run_dir / "data").mkdir(parents=True, exist_ok=True)
    config = run_dir / "steadyserve.toml"
    config.write_text("[resilience]\n" + "".join(f"{kv}\n" for kv in args.resilience)
                      + '[deployments.minilm]\nservice = '
                      '"steadyserve.examples.embedding:Embedder"\nreplicas = 2\n')
    ours.argv = [*ours.argv[:2], "--config", str(config), *ours.argv[2:]]
    url = f"http://127.0.0.1:{port}/v1/embeddings"
    with running(ours, res.setdefault("steadyserve_server", {})):
        ours.wait_all_replicas("minilm")
        with CpuWatch([*ours.child_pids, ours.pid]) as watch:
            res["steadyserve"] = load_process(url, port, args)
        res["steadyserve"]["cpu"] = watch.result
    res["steadyserve"]["overload_3x"]["gateway_side"] = gateway_side(
        run_dir / "steadyserve.log", res["steadyserve"]["overload_3x"]["wall_window"])
    if not args.no_peer:
        peer_port = free_port()
        peer = Server("fastapi-peer", uvicorn_argv("fastapi_embed:app", peer_port), peer_port,
                      run_dir / "peer.log", env={"BENCH_TORCH_THREADS": "2"})
        with running(peer, res.setdefault("peer_server", {})):
            with CpuWatch([peer.pid]) as watch:
                res["peer"] = load_process(f"http://127.0.0.1:{peer_port}/v1/embeddings", None,
                                           args)
            res["peer"]["cpu"] = watch.result
    res["raw_model"] = raw_model(corpus[:1000])
    print_report(res)
    out = args.out or run_dir / "overload.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    log(f"results: {out}")
    return 0


def gateway_side(log_path: Path, window: list[float]) -> dict[str, Any]:
    """Accepted and rejected latency as the gateway measured it (its access log), without
    the client's own scheduling delays on a machine it shares with the server."""
    ok: list[float] = []
    shed: list[float] = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("msg") != "request" or not window[0] <= rec.get("ts", 0) <= window[1]:
            continue
        (ok if rec["status"] == 200 else shed).append(float(rec["duration_ms"]))

    def q(values: list[float], p: float) -> float | None:
        values = sorted(values)
        return round(values[min(len(values) - 1, int(len(values) * p))], 2) if values else None

    return {"accepted_p50_ms": q(ok, 0.5), "accepted_p99_ms": q(ok, 0.99),
            "rejection_p99_ms": q(shed, 0.99), "accepted": len(ok), "rejected": len(shed)}


def print_report(res: dict[str, Any]) -> None:
    s = res["steadyserve"]
    o = s["overload_3x"]
    lines = [
        "overload, one class (interactive), MiniLM x 2 replicas, open loop",
        f"  unloaded            p50 {s['unloaded']['accepted_p50_ms']} ms, "
        f"p99 {s['unloaded']['accepted_p99_ms']} ms",
        f"  capacity            {s['capacity_per_s']} req/s",
        f"  3x ({o['offered_per_s']} req/s offered)",
        f"    goodput           {o['goodput_per_s']} req/s = {o['goodput_x_capacity']} x capacity"
        "   (target >= 0.9)",
        f"    accepted          p50 {o['accepted_p50_ms']} ms, p99 {o['accepted_p99_ms']} ms = "
        f"{o['accepted_p99_x_unloaded']} x unloaded   (target <= 2)",
        f"    rejections        {o['rejected']}, p99 {o['rejection_p99_ms']} ms   (target <= 50), "
        f"Retry-After on {o['rejections_with_retry_after']}",
        f"    errors            {o['errors']}",
        f"    gateway-side      {o.get('gateway_side')}",
        f"    event-loop lag    worst {o['loop_lag_max_ms']} ms over {o['metrics_scrapes']} "
        "scrapes of /metrics (1/s)",
        f"    cpu               {s['cpu']}",
    ]
    if "peer" in res:
        q = res["peer"]
        po = q["overload_3x"]
        lines += [
            "  FastAPI peer (no admission control), the same phases:",
            f"    unloaded p99 {q['unloaded']['accepted_p99_ms']} ms, capacity "
            f"{q['capacity_per_s']} req/s; at 3x: goodput {po['goodput_x_capacity']} x, "
            f"accepted p99 {po['accepted_p99_ms']} ms = {po['accepted_p99_x_unloaded']} x, "
            f"errors {po['errors']}",
        ]
    raw = res.get("raw_model", {})
    lines.append(f"  raw model in process (1 thread): {raw}")
    if raw.get("two_processes_batch_32_per_s") and s["capacity_per_s"]:
        lines.append(f"  served capacity / raw (2 x batch 32): "
                     f"{s['capacity_per_s'] / raw['two_processes_batch_32_per_s']:.2f}")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
