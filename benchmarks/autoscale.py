"""Autoscaling: a burst against a deployment at zero, a load step up and back, constant load.

    make bench-autoscale     # or: .venv/bin/python benchmarks/autoscale.py [--quick]

1. Scale from zero (MiniLM, the default embedding model; autoscale min 0, max 2): 50
   concurrent /v1/embeddings requests hit the gateway while the deployment has no replica.
   Printed: errors, burst latency (p50 / max), the same 50 again once warm, the replica's load
   time (the gateway's "replica ready in" log line: spawn to ready), and the extra latency
   (burst max − warm max) against the target of load time + 1 s. Beside it, in the same run,
   the raw model's cold start (a fresh process: import, load, embed the 50 sentences) and a
   peer's (the FastAPI app of benchmarks/peers/fastapi_embed.py launched as the burst
   arrives, its clients retrying until it listens): each is the time to the last answer.
2. A load step (benchmarks/services/paced.py: each replica does 20 requests/s, like one
   accelerator): 10/s → 40/s → 10/s, open loop. Printed per phase: errors, p50 / p99 (and p99
   against the raw 50 ms service time), the replica count sampled every 0.5 s, and how long
   the autoscaler took to follow each step against its configured delays.
3. Constant load (20/s, ±noise from the open-loop schedule's jitter) for --constant-s:
   scaling decisions and changes of direction.

Figures only; nothing is asserted. Results go to benchmarks/results/autoscale-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving import (
    REPO,
    Server,
    _on_signal,
    free_port,
    git_state,
    http_get,
    log,
    machine_info,
    make_corpus,
    running,
    steadyserve_argv,
    uvicorn_argv,
)

from steadyserve.config import DEFAULT_SERVICE
from steadyserve.testing.load import in_window, percentile, run_load

RESULTS = REPO / "benchmarks" / "results"
BURST = 50
SAMPLE_S = 0.5
PACED_SERVICE_S = 0.05


def write_config(tmp: Path, port: int, deployment: str, service: str, autoscale: str,
                 *, replicas: int, env: str = "") -> Path:
    path = tmp / f"{deployment}.toml"
    path.write_text(f"""
data_dir = "{tmp / 'state'}"
[gateway]
port = {port}
[alerting]
enabled = false
[deployments.{deployment}]
service = "{service}"
replicas = {replicas}
torch_threads = 1
{env}
[deployments.{deployment}.autoscale]
{autoscale}
""")
    return path


def status(port: int, deployment: str) -> dict[str, Any]:
    code, body = http_get(port, f"/v1/deployments/{deployment}")
    if code != 200:
        raise RuntimeError(f"status {code}: {body[:200]!r}")
    return json.loads(body)


async def burst(url: str, bodies: list[dict[str, Any]], *, retry_refused: bool = False,
                timeout_s: float = 120.0) -> list[tuple[int | None, float, float]]:
    """All bodies at once; (status, seconds from the start to the answer, seconds from the
    request's own (last) send to the answer) each. `retry_refused`: a client whose
    connection is refused tries again every 50 ms (a server still starting)."""
    start = time.monotonic()

    async def one(session: aiohttp.ClientSession, body: dict[str, Any]) -> tuple[int | None, float, float]:
        while True:
            sent = time.monotonic()
            try:
                async with session.post(url, json=body) as r:
                    await r.read()
                    now = time.monotonic()
                    return r.status, now - start, now - sent
            except aiohttp.ClientConnectorError:
                if not retry_refused or time.monotonic() - start > timeout_s:
                    now = time.monotonic()
                    return None, now - start, now - sent
                await asyncio.sleep(0.05)
            except (aiohttp.ClientError, TimeoutError):
                now = time.monotonic()
                return None, now - start, now - sent

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s),
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        return await asyncio.gather(*(one(session, b) for b in bodies))


def summarise(replies: list[tuple[int | None, float, float]]) -> dict[str, Any]:
    took = [t for s, t, _ in replies if s == 200]
    return {"ok": len(took), "errors": len(replies) - len(took),
            "statuses": sorted({str(s) for s, _, _ in replies}),
            "p50_s": percentile(took, 50), "max_s": max(took) if took else None}


def load_times(log_path: Path) -> list[float]:
    """Spawn-to-ready seconds of each replica, from the gateway's "replica ready in" lines."""
    out = []
    for line in log_path.read_text(errors="replace").splitlines():
        m = re.search(r"replica ready in ([0-9.]+)s", line)
        if m:
            out.append(float(m.group(1)))
    return out


def raw_cold_start(sentences: list[str]) -> float:
    """A fresh process: import, load the model, embed the sentences; seconds to the answer."""
    code = ("import sys, time, json; t = time.monotonic(); "
            "from steadyserve.examples.embedding import Embedder; e = Embedder(); e.setup(); "
            "e.embed(json.loads(sys.stdin.read())); print(time.monotonic() - t)")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(sentences),
                          capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                               **{k: v for k, v in os.environ.items()
                                  if k not in ("OMP_NUM_THREADS",)}})
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return time.monotonic() - started


async def scale_from_zero(tmp: Path) -> dict[str, Any]:
    port = free_port()
    cfg = write_config(tmp, port, "minilm", DEFAULT_SERVICE, """
min_replicas = 0
max_replicas = 2
target_ongoing_requests = 8
scale_to_zero_delay_s = 600
""", replicas=0)
    sentences = make_corpus(BURST, seed=5)
    bodies = [{"model": "minilm", "input": s} for s in sentences]
    log_path = RESULTS / "logs" / "autoscale-zero.log"
    server = Server("steadyserve-zero", [*steadyserve_argv(None, None, port), "--config",
                                         str(cfg)], port, log_path)
    out: dict[str, Any] = {}
    url = f"http://127.0.0.1:{port}/v1/embeddings"
    with running(server, out):
        before = status(port, "minilm")
        out["replicas_before"] = before["ready_replicas"]
        cold = await burst(url, bodies)
        out["burst"] = summarise(cold)
        warm = await burst(url, bodies)
        out["warm"] = summarise(warm)
        out["events"] = status(port, "minilm")["autoscale"]["events"]
    out["load_times_s"] = load_times(log_path)
    first_load = min(out["load_times_s"]) if out["load_times_s"] else None
    out["load_s"] = first_load
    if out["burst"]["max_s"] is not None and out["warm"]["max_s"] is not None:
        out["extra_s"] = out["burst"]["max_s"] - out["warm"]["max_s"]
    out["raw_cold_s"] = await asyncio.to_thread(raw_cold_start, sentences)
    # the peer: launched as the burst arrives; its clients retry until it listens
    peer_port = free_port()
    peer = await asyncio.to_thread(
        subprocess.Popen, uvicorn_argv("fastapi_embed:app", peer_port), cwd=REPO,
        env={**os.environ, "BENCH_TORCH_THREADS": "1"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        replies = await burst(f"http://127.0.0.1:{peer_port}/v1/embeddings", bodies,
                              retry_refused=True)
        out["peer"] = summarise(replies)
    finally:
        peer.terminate()
        await asyncio.to_thread(peer.wait, 20)
    return out


class Sampler:
    """The deployment's desired and ready replica counts every SAMPLE_S, beside the load."""

    def __init__(self, port: int, deployment: str, t0: float) -> None:
        self.port, self.deployment, self.t0 = port, deployment, t0
        self.samples: list[tuple[float, int, int]] = []
        self._stop = False

    async def run(self) -> None:
        while not self._stop:
            try:
                s = await asyncio.to_thread(status, self.port, self.deployment)
                self.samples.append((round(time.monotonic() - self.t0, 2),
                                     s["desired_replicas"], s["ready_replicas"]))
            except (OSError, RuntimeError, ValueError):
                pass
            await asyncio.sleep(SAMPLE_S)

    def stop(self) -> None:
        self._stop = True

    def first(self, after_s: float, predicate) -> float | None:
        for t, desired, ready in self.samples:
            if t >= after_s and predicate(desired, ready):
                return round(t - after_s, 2)
        return None


def phase(result, start_s: float, end_s: float) -> dict[str, Any]:
    window = in_window(start_s, end_s)
    ok = [r.latency_s for r in result.select(window) if r.ok and r.latency_s is not None]
    p99 = percentile(ok, 99)
    return {"requests": len(result.select(window)), "errors": result.error_count(window),
            "error_codes": dict(result.error_codes(window)), "p50_s": percentile(ok, 50),
            "p99_s": p99, "p99_vs_raw": p99 / PACED_SERVICE_S if p99 else None}


AUTOSCALE_STEP = """
min_replicas = 1
max_replicas = 4
target_ongoing_requests = 0.7
upscale_delay_s = 2
downscale_delay_s = 10
stable_window_s = 10
panic_window_s = 2
"""


async def load_step(tmp: Path, low: float, high: float,
                    phase_s: tuple[float, float, float]) -> dict[str, Any]:
    port = free_port()
    cfg = write_config(tmp, port, "paced", "benchmarks/services/paced.py:Paced", AUTOSCALE_STEP,
                       replicas=1, env='env = { PACED_LOAD_S = "2" }')
    server = Server("steadyserve-step", [*steadyserve_argv(None, None, port), "--config",
                                         str(cfg)], port, RESULTS / "logs" / "autoscale-step.log")
    out: dict[str, Any] = {"rates": [low, high, low], "phase_s": list(phase_s)}
    url = f"http://127.0.0.1:{port}/v1/deployments/paced/work"
    a, b, c = phase_s
    with running(server, out):
        t0 = time.monotonic() + 0.5
        sampler = Sampler(port, "paced", t0)
        sampling = asyncio.ensure_future(sampler.run())
        body = {"x": 1}
        results = await asyncio.gather(
            run_load(url, low, a, body_fn=lambda i: body, t0=t0, timeout_s=10),
            run_load(url, high, b, body_fn=lambda i: body, t0=t0 + a, timeout_s=10),
            run_load(url, low, c, body_fn=lambda i: body, t0=t0 + a + b, timeout_s=10))
        sampler.stop()
        await sampling
        out["events"] = status(port, "paced")["autoscale"]["events"]
    # each load run's record times are relative to its own start
    out["phases"] = [phase(results[0], 0, a), phase(results[1], 0, b), phase(results[2], 0, c)]
    peak = max((d for _, d, _ in sampler.samples), default=0)
    out["peak_desired"] = peak
    out["up_decided_after_s"] = sampler.first(a, lambda d, r: d > 1)
    out["up_ready_after_s"] = sampler.first(a, lambda d, r: r >= peak and d == peak)
    out["down_decided_after_s"] = sampler.first(a + b, lambda d, r: d < peak)
    out["down_to_one_after_s"] = sampler.first(a + b, lambda d, r: d == 1 and r == 1)
    out["samples"] = sampler.samples
    return out


async def constant(tmp: Path, rate: float, duration_s: float) -> dict[str, Any]:
    port = free_port()
    cfg = write_config(tmp, port, "paced", "benchmarks/services/paced.py:Paced",
                       AUTOSCALE_STEP.replace("downscale_delay_s = 10", "downscale_delay_s = 30")
                       .replace("stable_window_s = 10", "stable_window_s = 30"),
                       replicas=1, env='env = { PACED_LOAD_S = "2" }')
    server = Server("steadyserve-constant", [*steadyserve_argv(None, None, port), "--config",
                                             str(cfg)], port,
                    RESULTS / "logs" / "autoscale-constant.log")
    out: dict[str, Any] = {"rate": rate, "duration_s": duration_s}
    url = f"http://127.0.0.1:{port}/v1/deployments/paced/work"
    with running(server, out):
        result = await run_load(url, rate, duration_s, body_fn=lambda i: {"x": i},
                                timeout_s=10)
        events = list(reversed(status(port, "paced")["autoscale"]["events"]))
    directions = [e["direction"] for e in events]
    out.update({"errors": result.error_count(), "error_codes": dict(result.error_codes()),
                "decisions": [(e["from"], e["to"], e["reason"]) for e in events],
                "direction_changes": sum(1 for x, y in itertools.pairwise(directions)
                                         if x != y)})
    return out


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f} ms"


def report(out: dict[str, Any]) -> str:
    lines = []
    if "zero" in out:
        lines += report_zero(out["zero"])
    if "step" in out:
        lines += report_step(out["step"])
    if "constant" in out:
        c = out["constant"]
        lines.append(f"3. constant {c['rate']:g} req/s for {c['duration_s']:g} s: "
                     f"{len(c['decisions'])} decision(s) "
                     f"{[(a, b) for a, b, _ in c['decisions']]}, {c['direction_changes']} "
                     f"change(s) of direction, errors {c['errors']}")
    return "\n".join(lines)


def report_zero(z: dict[str, Any]) -> list[str]:
    return [
        f"1. scale from zero, {BURST} concurrent /v1/embeddings (MiniLM, 0 replicas, max 2)",
        f"   steadyserve: {z['burst']['ok']}/{BURST} ok, errors {z['burst']['errors']}, "
        f"p50 {ms(z['burst']['p50_s'])}, max {ms(z['burst']['max_s'])}; warm again: p50 "
        f"{ms(z['warm']['p50_s'])}, max {ms(z['warm']['max_s'])}",
        f"   replica load time (spawn to ready) {z['load_s']:.2f} s; extra latency (burst max - "
        f"warm max) {z.get('extra_s', float('nan')):.2f} s; target <= load + 1 s = "
        f"{(z['load_s'] or 0) + 1:.2f} s",
        f"   raw model cold start (fresh process, load, embed the {BURST}): "
        f"{z['raw_cold_s']:.2f} s; served burst max / raw = "
        f"{(z['burst']['max_s'] or 0) / z['raw_cold_s']:.2f}",
        f"   peer (FastAPI launched as the burst arrives): {z['peer']['ok']}/{BURST} ok, last "
        f"answer {ms(z['peer']['max_s'])}; served / peer = "
        f"{(z['burst']['max_s'] or 0) / (z['peer']['max_s'] or float('nan')):.2f}",
    ]


def report_step(s: dict[str, Any]) -> list[str]:
    lines = [f"2. load step {s['rates'][0]:g} -> {s['rates'][1]:g} -> {s['rates'][2]:g} req/s "
             f"(phases {'/'.join(f'{p:g}' for p in s['phase_s'])} s; 20 req/s per replica)"]
    for name, p in zip(("low", "high", "back"), s["phases"], strict=True):
        lines.append(f"   {name:<5} {p['requests']:>5} requests, errors {p['errors']} "
                     f"{p['error_codes'] or ''}, p50 {ms(p['p50_s'])}, p99 {ms(p['p99_s'])} "
                     f"(p99/raw {p['p99_vs_raw'] or float('nan'):.1f})")
    lines.append(f"   peak {s['peak_desired']} replicas; up decided {s['up_decided_after_s']} s "
                 f"after the step (upscale_delay_s 2, panic at once), all ready "
                 f"{s['up_ready_after_s']} s; down decided {s['down_decided_after_s']} s after "
                 f"the drop (stable window 10 + downscale_delay_s 10), back at 1 "
                 f"{s['down_to_one_after_s']} s")
    return lines


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ss-bench-autoscale-") as tmp:
        if args.only in (None, "zero"):
            out["zero"] = await scale_from_zero(Path(tmp))
            log(f"scale from zero: {out['zero']}")
        if args.only in (None, "step"):
            out["step"] = await load_step(Path(tmp), 10, 40, args.phases)
            log(f"load step: { {k: v for k, v in out['step'].items() if k != 'samples'} }")
        if args.only in (None, "constant"):
            out["constant"] = await constant(Path(tmp), 20, args.constant_s)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--constant-s", type=float, default=600.0,
                   help="how long the constant-load part runs (default 600: ten minutes)")
    p.add_argument("--quick", action="store_true", help="a 120 s constant-load part")
    p.add_argument("--only", choices=["zero", "step", "constant"], help="one part")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)  # a stopped run stops the servers it started
    args.phases = (20.0, 40.0, 45.0)
    if args.quick:
        args.constant_s = 120.0
    started = time.time()
    out = asyncio.run(main_async(args))
    out.update({"args": {"constant_s": args.constant_s}, "git": git_state(),
                "machine": machine_info(), "wall_s": round(time.time() - started, 1)})
    text = report(out)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"autoscale-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out["report"] = text
    path.write_text(json.dumps(out, indent=1, default=str))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
