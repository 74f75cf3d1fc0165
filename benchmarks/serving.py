"""Serving benchmark for steadyserve: throughput, latency, memory, start time, wire sizes.

    .venv/bin/python benchmarks/serving.py            # the full run (≤ ~8 minutes)
    .venv/bin/python benchmarks/serving.py --quick    # a ~1 minute smoke run
    .venv/bin/python benchmarks/serving.py --only echo --duration-s 10

Parts (--only picks one):
  embed        raw model in process (batch 1/8/32/64, 2 and 1 torch threads; then one
               1-thread process per core side by side at batch 64, packed and in padded
               chunks of 16: raw_best is the best layout of all), then `steadyserve run`
               (minilm, 2 replicas) in --pairs runs, the best raw layout measured again
               before each after the first (served/raw: the median pair; with the CPU per
               sentence split into model, replica I/O, gateway, wrk), and a FastAPI peer
               under the same wrk load
  echo         steadyserve gateway + 1 echo replica vs a FastAPI echo app, wrk -c64 and -c1
  dashboard    echo throughput (wrk -c64) with no dashboard, with one open (a poller doing
               what the page does: /v1/dashboard every 2 s, history first), and with none
               again: the cost of an open dashboard (not in the default run)
  workers      the echo service behind `--workers 1` and `--workers 2` (2 replicas), and the
               FastAPI echo app under uvicorn --workers 1 and 2: req/s and CPU per request
               of the gateway processes and of the replicas (not in the default run)
  coalesce     the echo service's batched handler, 1 replica, wrk -c64, with the gateway
               coalescing calls and without, alternating twice: req/s, p50/p99, CPU per
               request of gateway and replica (not in the default run)
  memory       launch → /readyz 200 time; idle RSS of the gateway and of each replica
  compression  body sizes and µs: identity / gzip / zstd; msgpack vs JSON for the replica hop

Prints a table (every figure with its ratio and target) and writes
benchmarks/results/serving-<timestamp>.json. Targets are reported, never asserted: the
exit status is non-zero only when something failed to start. Everything listens on
127.0.0.1 only; every load run is bounded in time; only processes started here are stopped.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as dt
import gzip
import hashlib
import http.client
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
LUA = BENCH / "wrk" / "corpus.lua"
ECHO_SERVICE = "benchmarks/services/echo.py:Echo"
PEERS = BENCH / "peers"
BIN = Path(sys.executable).parent
MiB = 1024 * 1024

TARGETS = {
    "served_over_raw": 0.90,        # served embeddings / the best raw layout's sentences/s (≥)
    "echo_rps": 2500.0,             # steadyserve echo, wrk -c64 (≥)
    "echo_p50_ms": 0.6,             # steadyserve echo, wrk -c1, p50 (≤)
    "ready_s": 15.0,                # launch → /readyz 200 for the default minilm (≤)
    "replica_rss_mib": 600.0,       # idle RSS per replica (≤)
    "gateway_rss_mib": 150.0,       # idle RSS of the gateway (≤)
}

# A fixed list of common English words; the corpus is seeded sampling over it.
WORDS = """
the of and to a in is it you that he was for on are with as his they be at one have this
from or had by hot word but what some we can out other were all there when up use your how
said an each she which do their time if will way about many then them write would like so
these her long make thing see him two has look more day could go come did number sound no
most people my over know water than call first who may down side been now find any new work
part take get place made live where after back little only round man year came show every
good me give our under name very through just form sentence great think say help low line
differ turn cause much mean before move right boy old too same tell does set three want air
well also play small end put home read hand port large spell add even land here must big
high such follow act why ask men change went light kind off need house picture try us again
animal point mother world near build self earth father head stand own page should country
found answer school grow study still learn plant cover food sun four between state keep eye
never last let thought city tree cross farm hard start might story saw far sea draw left
late run while press close night real life few north open seem together next white children
begin got walk example ease paper group always music those both mark often letter until
mile river car feet care second book carry took science eat room friend began idea fish
mountain stop once base hear horse cut sure watch color face wood main enough plain girl
usual young ready above ever red list though feel talk bird soon body dog family direct
pose leave song measure door product black short numeral class wind question happen
complete ship area half rock order fire south problem piece told knew pass since top whole
king space heard best hour better true during hundred five remember step early hold west
ground interest reach fast verb sing listen six table travel less morning ten simple
several vowel toward war lay against pattern slow center love person money serve appear
road map rain rule govern pull cold notice voice unit power town fine certain fly fall
lead cry dark machine note wait plan figure star box noun field rest correct able pound
done beauty drive stood contain front teach week final gave green oh quick develop ocean
warm free minute strong special mind behind clear tail produce fact street inch multiply
nothing course stay wheel full force blue object decide surface deep moon island foot
system busy test record boat common gold possible plane stead dry wonder laugh thousand
ago ran check game shape equate miss brought heat snow tire bring yes distant fill east
paint language among
""".split()

_children: list[subprocess.Popen[bytes]] = []


# ---------------------------------------------------------------------------------------------
# small helpers

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_corpus(n: int, seed: int) -> list[str]:
    """n sentences of 8–30 words; about one in ten has a "quoted" word (exercises escaping)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(8, 30))]
        if rng.random() < 0.1:
            i = rng.randrange(len(words))
            words[i] = f'"{words[i]}"'
        words[0] = words[0].capitalize()
        out.append(" ".join(words) + ".")
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _timed(fn: Callable[[], Any], min_time_s: float = 0.2, repeats: int = 5) -> float:
    """Best-of-`repeats` seconds per call, each repeat looping for at least min_time_s."""
    loops = 1
    while True:
        t = time.perf_counter()
        for _ in range(loops):
            fn()
        took = time.perf_counter() - t
        if took >= min_time_s / 4:
            break
        loops *= 4
    loops = max(1, int(loops * (min_time_s / max(took, 1e-9))))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(loops):
            fn()
        best = min(best, (time.perf_counter() - t) / loops)
    return best


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 20.0) -> dict[str, Any]:
    """SIGTERM, wait up to grace_s, then SIGKILL. Returns how it went."""
    if proc.poll() is not None:
        return {"exit_code": proc.returncode, "stop_s": 0.0, "killed": False, "already_exited": True}
    t = time.monotonic()
    killed = False
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        killed = True
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=10)
    if proc in _children:
        _children.remove(proc)
    return {"exit_code": proc.returncode, "stop_s": round(time.monotonic() - t, 3),
            "killed": killed, "already_exited": False}


@atexit.register
def _stop_all() -> None:
    for proc in list(_children):
        stop_process(proc)


def _on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every `finally`, which stops our servers


class CpuWatch:
    """How much CPU *other* processes used during a measurement (the machine may be shared).

    foreign = all busy CPU time (/proc/stat) − what this benchmark's processes used: the
    watched server trees (gateway + replicas, or a peer) and this runner with its reaped
    children (wrk, the raw-model workers). Shown as a share of all cores, with VM steal.
    """

    def __init__(self, pids: list[int] | None = None) -> None:
        self.pids = pids or []
        self.tick = os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _stat() -> list[int]:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]

    def _tree(self) -> float:
        import psutil

        total = 0.0
        for pid in self.pids:
            try:
                root = psutil.Process(pid)
                for proc in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        t = proc.cpu_times()
                        total += t.user + t.system
            except psutil.Error:
                pass
        return total

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __enter__(self) -> CpuWatch:
        self.t0, self.stat0, self.tree0, self.own0 = (time.monotonic(), self._stat(),
                                                      self._tree(), self._own())
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.monotonic() - self.t0
        stat = self._stat()
        d = [b - a for a, b in zip(self.stat0, stat, strict=False)]
        # user nice system idle iowait irq softirq steal guest guest_nice
        steal = d[7] / self.tick if len(d) > 7 else 0.0
        # user + nice + system; irq/softirq (loopback network work, charged to nobody) left out
        busy = (d[0] + d[1] + d[2]) / self.tick
        ours = (self._tree() - self.tree0) + (self._own() - self.own0)
        cores = len(os.sched_getaffinity(0))
        foreign = max(0.0, busy - ours)
        self.result = {
            "wall_s": round(wall, 2), "busy_cpu_s": round(busy, 2), "ours_cpu_s": round(ours, 2),
            "foreign_cpu_s": round(foreign, 2),
            "foreign_pct": round(100 * foreign / (wall * cores), 1) if wall else 0.0,
            "steal_pct": round(100 * steal / (wall * cores), 1) if wall else 0.0,
            "loadavg_1m": os.getloadavg()[0],
        }


NOISY_PCT = 5.0  # other processes using more than this share of the CPU: flag the figure


# ---------------------------------------------------------------------------------------------
# servers

class StartFailed(RuntimeError):
    pass


@dataclass
class Server:
    name: str
    argv: list[str]
    port: int
    log_path: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None
    launched_at: float = 0.0
    ready_s: float | None = None
    child_pids: list[int] = field(default_factory=list)

    def start(self, ready_timeout_s: float = 120.0) -> float:
        if not _port_free(self.port):
            raise StartFailed(f"{self.name}: port {self.port} is already in use")
        env = dict(os.environ)
        env.update(self.env or {})
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_path, "wb")
        log(f"start {self.name}: {' '.join(self.argv)}")
        self.launched_at = time.monotonic()
        self.proc = subprocess.Popen(self.argv, cwd=REPO, env=env, stdout=logf,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        logf.close()
        _children.append(self.proc)
        deadline = self.launched_at + ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StartFailed(f"{self.name} exited with {self.proc.returncode} before it was "
                                  f"ready; see {self.log_path}:\n{_tail(self.log_path)}")
            try:
                status, _ = http_get(self.port, "/readyz", timeout=1.0)
                if status == 200:
                    self.ready_s = time.monotonic() - self.launched_at
                    log(f"{self.name} ready in {self.ready_s:.2f} s on 127.0.0.1:{self.port}")
                    self.child_pids = [c.pid for c in self.children()]
                    return self.ready_s
            except OSError:
                pass
            time.sleep(0.05)
        raise StartFailed(f"{self.name} not ready after {ready_timeout_s:.0f} s; "
                          f"see {self.log_path}:\n{_tail(self.log_path)}")

    def wait_all_replicas(self, deployment: str, timeout_s: float = 120.0) -> float:
        """/readyz is 200 once every deployment has one ready replica; this waits for all of
        them (GET /v1/deployments/<name>: ready_replicas == desired_replicas)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                status, body = http_get(self.port, f"/v1/deployments/{deployment}")
                if status == 200:
                    d = json.loads(body)
                    if d["ready_replicas"] >= d["desired_replicas"]:
                        took = time.monotonic() - self.launched_at
                        log(f"{self.name}: all {d['desired_replicas']} replica(s) ready "
                            f"{took:.2f} s after launch")
                        self.child_pids = [c.pid for c in self.children()]
                        return took
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        raise StartFailed(f"{self.name}: not all replicas of {deployment} ready after "
                          f"{timeout_s:.0f} s")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def children(self) -> list[Any]:
        import psutil

        assert self.proc is not None
        try:
            return list(psutil.Process(self.proc.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            return []

    def memory(self) -> dict[str, Any]:
        """RSS (and USS: memory private to the process) of this process and each child."""
        import psutil

        assert self.proc is not None

        def one(p: Any) -> dict[str, Any]:
            try:
                info = p.memory_full_info()
                return {"pid": p.pid, "rss_mib": info.rss / MiB, "uss_mib": info.uss / MiB,
                        "cmd": " ".join(p.cmdline()[1:8])}
            except psutil.Error as exc:
                return {"pid": p.pid, "error": str(exc)}

        return {"self": one(psutil.Process(self.proc.pid)),
                "children": [one(c) for c in self.children()]}

    def stop(self) -> dict[str, Any]:
        if self.proc is None:
            return {}
        out = stop_process(self.proc)
        # the gateway stops its replicas: check none is left behind
        import psutil

        time.sleep(0.2)
        left = [pid for pid in self.child_pids if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        out["children_left"] = left
        if left:
            log(f"WARNING: {self.name} exited but left children {left}; killing them")
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        log(f"stopped {self.name}: exit {out['exit_code']} in {out['stop_s']:.2f} s"
            + (" (SIGKILL)" if out["killed"] else ""))
        return out


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


@contextlib.contextmanager
def running(server: Server, into: dict[str, Any]) -> Iterator[Server]:
    try:
        into["ready_s"] = round(server.start(), 3)
        yield server
    finally:
        into["stop"] = server.stop()


def steadyserve_argv(target: str | None, replicas: int | None, port: int,
                     workers: int = 1) -> list[str]:
    exe = BIN / "steadyserve"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "steadyserve.cli.main"]
    cmd.append("run")
    if target:
        cmd.append(target)
    if replicas is not None:
        cmd += ["--replicas", str(replicas)]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    return [*cmd, "--port", str(port), "--log-format", "json"]


def uvicorn_argv(app: str, port: int, workers: int = 1) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "--app-dir", str(PEERS), app,
            "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
            "--log-level", "warning", "--no-access-log"]


def split_cpu_s(pid: int) -> tuple[float, float]:
    """(CPU seconds of the gateway's processes — itself and its data-plane workers —, CPU
    seconds of its replicas), so far."""
    import psutil

    gateway = replicas = 0.0
    try:
        root = psutil.Process(pid)
        procs = [(root, True)] + [(c, "spawn_main" in " ".join(c.cmdline()))
                                  for c in root.children(recursive=True)]
    except psutil.Error:
        return 0.0, 0.0
    for proc, is_gateway in procs:
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            if is_gateway:
                gateway += t.user + t.system
            elif "resource_tracker" not in " ".join(proc.cmdline()):
                replicas += t.user + t.system
    return gateway, replicas


# ---------------------------------------------------------------------------------------------
# wrk

@dataclass
class Bench:
    duration_s: int
    warm_embed_s: int
    warm_echo_s: int
    raw_s: float
    corpus_path: Path
    log_dir: Path
    peer_mode: str
    rounds: int = 1
    pairs: int = 1  # served runs, each with the best raw layout measured next to it
    noise: dict[str, dict[str, Any]] = field(default_factory=dict)

    def note_noise(self, label: str, watch: CpuWatch) -> dict[str, Any]:
        r = watch.result
        self.noise[label] = r
        if r["foreign_pct"] > NOISY_PCT or r["steal_pct"] > NOISY_PCT:
            log(f"  WARNING: other processes used {r['foreign_pct']:.0f}% of the CPU "
                f"(steal {r['steal_pct']:.0f}%) during {label}: this figure is disturbed")
        return r

    def noisy(self, *labels: str) -> bool:
        return any(self.noise.get(label, {}).get("foreign_pct", 0.0) > NOISY_PCT
                   or self.noise.get(label, {}).get("steal_pct", 0.0) > NOISY_PCT
                   for label in labels)

    def wrk(self, label: str, port: int, path: str, conns: int, seconds: int, fld: str,
            model: str | None = None, watch: list[int] | None = None) -> dict[str, Any]:
        argv = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, int(seconds))}s", "--timeout", "10s",
                "-s", str(LUA), f"http://127.0.0.1:{port}{path}", "--",
                str(self.corpus_path), fld] + ([model] if model else [])
        log(f"wrk {label}: -c{conns} {seconds}s {path}")
        r, cpu = run_wrk(argv, label, self.log_dir, seconds, watch)
        out = {
            "connections": conns, **wrk_figures(r), "ok_2xx_3xx": r["requests"] - r["status"],
            "socket_error_detail": {k: r[k] for k in ("connect", "read", "write", "timeout")},
            "bytes_per_response": r["bytes"] / r["requests"] if r["requests"] else 0,
            "other_load": self.note_noise(label, cpu),
        }
        log(f"  {out['ok_rps']:.0f} ok req/s  p50 {out['p50_ms']:.2f} ms  p99 {out['p99_ms']:.2f} ms  "
            f"errors {out['errors']} (non-2xx {out['non_2xx_3xx']}, socket {out['socket_errors']})")
        return out


def run_wrk(
    argv: list[str], label: str, log_dir: Path, seconds: float, watch: list[int] | None,
    watcher: type[CpuWatch] | None = None,
) -> tuple[dict[str, Any], CpuWatch]:
    """Run wrk with one of the wrk/ scripts, keep its output in log_dir, return its WRK_RESULT
    (see wrk/result.lua) and the CPU others used meanwhile (`watcher`: a CpuWatch class, e.g.
    cache.py's, which also counts reaped children). Shared with cache.py."""
    with (watcher or CpuWatch)(watch) as cpu:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60,
                              check=False)
    (log_dir / f"wrk-{label}.txt").write_text(" ".join(argv) + "\n\n" + proc.stdout + proc.stderr)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("WRK_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise StartFailed(f"wrk {label} failed (exit {proc.returncode}):\n"
                          f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return json.loads(line[len("WRK_RESULT "):]), cpu


def wrk_figures(r: dict[str, Any]) -> dict[str, Any]:
    """Rates, latencies (ms) and error counts from one WRK_RESULT."""
    secs = r["duration_us"] / 1e6
    socket_errors = r["connect"] + r["read"] + r["write"] + r["timeout"]
    return {
        "duration_s": round(secs, 3), "requests": r["requests"],
        "rps": r["requests"] / secs if secs else 0.0,  # every response, errors included
        "ok_rps": (r["requests"] - r["status"]) / secs if secs else 0.0,  # 2xx/3xx only
        "p50_ms": r["p50_us"] / 1000, "p90_ms": r["p90_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000, "mean_ms": r["mean_us"] / 1000,
        "max_ms": r["max_us"] / 1000, "non_2xx_3xx": r["status"], "socket_errors": socket_errors,
        "errors": r["status"] + socket_errors,
    }


# ---------------------------------------------------------------------------------------------
# workers (run as subprocesses of this script so torch's thread pools start clean)

def worker_raw(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    from steadyserve.examples import embedding
    from steadyserve.examples.embedding import Embedder

    corpus = Path(args.corpus).read_text().splitlines()
    e = Embedder()
    t = time.perf_counter()
    e.setup()
    setup_s = time.perf_counter() - t
    if args.padded_chunk:  # the layout before packing: sorted, padded chunks of N texts
        embedding.CHUNK_CPU = args.padded_chunk
        e._forward = e.forward_padded  # type: ignore[method-assign]
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "setup_s": setup_s, "batches": {},
                           "padded_chunk": args.padded_chunk}
    pos = 0

    def next_batch(n: int) -> list[str]:
        nonlocal pos
        batch = [corpus[(pos + i) % len(corpus)] for i in range(n)]
        pos = (pos + n) % len(corpus)
        return batch

    for _ in range(args.rounds):  # the best round counts (the machine may be shared)
        for bs in [int(b) for b in args.batches.split(",")]:
            for _ in range(2):  # warm the shapes
                e.embed(next_batch(bs))
            done = 0
            calls = 0
            t = time.perf_counter()
            cpu0 = time.process_time()
            while True:
                e.embed(next_batch(bs))  # tokenisation included, as in a replica
                done += bs
                calls += 1
                elapsed = time.perf_counter() - t
                if elapsed >= args.seconds and calls >= 3:
                    break
            rate = done / elapsed
            prev = out["batches"].get(str(bs))
            rates = [*(prev["rounds"] if prev else []), round(rate, 1)]
            if prev is None or rate > prev["sentences_per_s"]:
                out["batches"][str(bs)] = {
                    "sentences_per_s": rate, "calls": calls, "ms_per_call": elapsed / calls * 1000,
                    # the whole process (its threads together): what a replica's model costs
                    "cpu_ms_per_sentence": (time.process_time() - cpu0) / done * 1000}
            out["batches"][str(bs)]["rounds"] = rates
    return out


def worker_wire(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import orjson
    import torch
    import zstandard

    torch.set_num_threads(1)
    from steadyserve import codec
    from steadyserve.examples.embedding import Embedder
    from steadyserve.gateway.encoding import compress
    from steadyserve.gateway.http import json_response

    corpus = Path(args.corpus).read_text().splitlines()
    e = Embedder()
    e.setup()
    n = 32
    budget = args.seconds  # seconds per timing repeat

    def timed(fn: Callable[[], Any]) -> float:
        return _timed(fn, min_time_s=budget)

    results = e.embed(corpus[:n])

    def openai_body(items: list[dict[str, Any]]) -> bytes:
        # what gateway/openai.py builds, serialised the way the gateway sends it
        data = [{"object": "embedding", "index": i,
                 "embedding": np.asarray(r["embedding"], dtype=np.float32)}
                for i, r in enumerate(items)]
        tokens = sum(int(r["tokens"]) for r in items)
        return json_response({"object": "list", "data": data, "model": "minilm",
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}).body

    body = openai_body(results)
    one = openai_body(results[:1])
    gz = compress(body, "gzip")
    zs = compress(body, "zstd")
    assert gzip.decompress(gz) == body
    assert zstandard.ZstdDecompressor().decompress(zs) == body
    edge = {
        "sentences": n,
        "identity_bytes": len(body),
        "single_sentence_body_bytes": len(one),
        "gzip_bytes": len(gz), "zstd_bytes": len(zs),
        "gzip_us": timed(lambda: compress(body, "gzip")) * 1e6,
        "zstd_us": timed(lambda: compress(body, "zstd")) * 1e6,
        "orjson_body_us": timed(lambda: openai_body(results)) * 1e6,
    }

    packed = codec.encode(results)
    as_json = orjson.dumps(results, option=orjson.OPT_SERIALIZE_NUMPY)

    def json_decode() -> list[dict[str, Any]]:
        # back to the same objects the msgpack path yields: float32 arrays, not lists
        return [{"embedding": np.asarray(r["embedding"], dtype=np.float32), "tokens": r["tokens"]}
                for r in orjson.loads(as_json)]

    back_m = codec.decode(packed)
    back_j = json_decode()
    hop = {
        "msgpack_bytes": len(packed), "json_bytes": len(as_json),
        "msgpack_encode_us": timed(lambda: codec.encode(results)) * 1e6,
        "msgpack_decode_us": timed(lambda: codec.decode(packed)) * 1e6,
        "json_encode_us": timed(
            lambda: orjson.dumps(results, option=orjson.OPT_SERIALIZE_NUMPY)) * 1e6,
        "json_decode_us": timed(json_decode) * 1e6,
        "msgpack_lossless": all(np.array_equal(a["embedding"], b["embedding"])
                                and a["tokens"] == b["tokens"] for a, b in zip(results, back_m, strict=True)),
        "json_lossless": all(np.array_equal(a["embedding"], b["embedding"])
                             for a, b in zip(results, back_j, strict=True)),
    }
    return {"edge": edge, "hop": hop}


def run_worker(kind: str, extra: list[str], env_threads: int, timeout_s: float) -> dict[str, Any]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
        env[var] = str(env_threads)
    env["TOKENIZERS_PARALLELISM"] = "false"  # as in a replica
    argv = [sys.executable, str(Path(__file__).resolve()), "--_worker", kind, *extra]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False,
                          env=env, cwd=REPO)
    if proc.returncode != 0:
        raise StartFailed(f"{kind} worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_workers_parallel(n: int, extra: list[str], timeout_s: float) -> list[dict[str, Any]]:
    """n 1-thread raw workers at the same time (each measures its own rate)."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
        env[var] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    argv = [sys.executable, str(Path(__file__).resolve()), "--_worker", "raw", *extra]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env, cwd=REPO) for _ in range(n)]
    out = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=timeout_s)
            if proc.returncode != 0:
                raise StartFailed(f"raw worker failed (exit {proc.returncode}):\n{stderr[-3000:]}")
            out.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return out


# ---------------------------------------------------------------------------------------------
# metrics scraped from the gateway

def scrape(port: int, save: Path | None = None) -> dict[str, float]:
    """Every steadyserve_* counter/gauge sample of the gateway's /metrics (histogram buckets
    left out), keyed `name{labels}`; the replica label is kept only for batch sizes."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        status, body = http_get(port, "/metrics", timeout=5.0)
    except OSError:
        return {}
    if status != 200:
        return {}
    if save is not None:
        save.write_bytes(body)
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            if not s.name.startswith("steadyserve_") or s.name.endswith("_bucket") \
                    or s.name.endswith("_created") or "_process_" in s.name:
                continue
            labels = dict(s.labels)
            if not s.name.startswith("steadyserve_replica_batch_size"):
                labels.pop("replica", None)
            key = s.name + "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"
            out[key] = out.get(key, 0.0) + s.value
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


def batch_sizes(d: dict[str, float]) -> dict[str, float]:
    """Mean items per executed batch, by replica, from a delta of scrape()s."""
    out = {}
    for k, v in d.items():
        if k.startswith("steadyserve_replica_batch_size_sum{"):
            labels = k[k.index("{"):]
            count = d.get("steadyserve_replica_batch_size_count" + labels, 0.0)
            replica = dict(x.split("=", 1) for x in labels[1:-1].split(",") if "=" in x)
            if count:
                out[replica.get("replica", labels)] = v / count
    return out


def summarise_counters(c: dict[str, float]) -> str:
    """'HTTP 503 ×3, HTTP 499 ×64, shed 3' from error_counts()."""
    parts = []
    for k, v in sorted(c.items(), key=lambda kv: -kv[1]):
        name, _, labels = k.partition("{")
        lab = dict(x.split("=", 1) for x in labels.rstrip("}").split(",") if "=" in x)
        if name == "steadyserve_request_errors_total":
            parts.append(f"HTTP {lab.get('error', '?')} ×{v:.0f}")
        elif name == "steadyserve_upstream_attempts_total":
            if lab.get("outcome") != "ok":
                parts.append(f"upstream {lab.get('outcome', '?')} ×{v:.0f}")
        else:
            short = name.replace("steadyserve_", "").replace("_total", "")
            parts.append(f"{short} ×{v:.0f}")
    return ", ".join(parts)


def error_counts(d: dict[str, float]) -> dict[str, float]:
    """The error-ish counters in a delta: request errors by code, shed, retries, ejections."""
    keep = ("error", "shed", "retr", "eject", "outlier", "restart", "quarantin", "hedge",
            "budget", "upstream_attempts")
    return {k: v for k, v in d.items()
            if any(word in k.split("{")[0] for word in keep) and not k.endswith("_sum")}


# ---------------------------------------------------------------------------------------------
# sections

Row = tuple[str, str, str, str, str]  # section, what, value, target, verdict


def verdict(value: float | None, target: float, higher_is_better: bool) -> str:
    if value is None:
        return "n/a"
    ok = value >= target if higher_is_better else value <= target
    return "ok" if ok else "MISS"


def raw_single(b: Bench, threads: int, batches: str, label: str) -> dict[str, Any]:
    """One raw-model process with `threads` torch threads at each of `batches`."""
    with CpuWatch() as cpu:
        run = run_worker(
            "raw", ["--threads", str(threads), "--seconds", str(b.raw_s),
                    "--rounds", str(b.rounds), "--corpus", str(b.corpus_path),
                    "--batches", batches],
            threads, timeout_s=120 + 8 * b.raw_s * b.rounds)
    run["other_load"] = b.note_noise(label, cpu)
    return run


def raw_parallel(b: Bench, cores: int, padded: int, label: str) -> dict[str, Any]:
    """`cores` 1-thread raw-model processes side by side at batch 64, each sorting windows of
    64 texts by token count and running them packed (`padded` 0) or in padded chunks of
    `padded`: their summed sentences/s and their mean CPU ms per sentence."""
    with CpuWatch() as cpu:
        parallel = run_workers_parallel(
            cores, ["--threads", "1", "--seconds", str(2 * b.raw_s), "--corpus",
                    str(b.corpus_path), "--batches", "64", "--rounds", str(b.rounds),
                    "--padded-chunk", str(padded)], timeout_s=120 + 8 * b.raw_s * b.rounds)
    b.note_noise(label, cpu)
    return {"processes": cores, "batch": 64, "padded_chunk": padded,
            "sentences_per_s": sum(r["batches"]["64"]["sentences_per_s"] for r in parallel),
            "cpu_ms_per_sentence": statistics.mean(r["batches"]["64"]["cpu_ms_per_sentence"]
                                                   for r in parallel),
            "runs": parallel}


def section_raw(b: Bench, res: dict[str, Any], rows: list[Row]) -> None:
    cores = len(os.sched_getaffinity(0))
    runs = {}
    for threads in sorted({cores, 1}, reverse=True):
        log(f"raw model in process: {threads} torch thread(s), batches 1/8/32/64, "
            f"{b.raw_s:g} s each")
        runs[str(threads)] = raw_single(b, threads, "1,8,32,64", f"raw-{threads}-thread")
        for bs, r in runs[str(threads)]["batches"].items():
            log(f"  batch {bs:>2}: {r['sentences_per_s']:.1f} sentences/s")
    # the served layout: one 1-thread process per core, run side by side and summed. Each
    # sorts windows of 64 texts by token count; the model's own path runs them packed, the
    # padded layout in chunks of 16 (the best layout before packing).
    layouts: dict[str, dict[str, Any]] = {}
    for name, padded in (("packed", 0), ("padded chunks of 16", 16)):
        log(f"raw model: {cores} processes × 1 thread side by side, batch 64, {name}")
        layouts[name] = lay = raw_parallel(b, cores, padded, f"raw-{cores}x1-thread-{padded}")
        log(f"  {lay['sentences_per_s']:.1f} sentences/s together")
    # (name, sentences/s, CPU ms per sentence, how to measure it again)
    candidates: list[tuple[str, float, float, dict[str, int]]] = [
        (f"1 process × {n} thread(s), batch {bs}", r["sentences_per_s"],
         r["cpu_ms_per_sentence"], {"threads": int(n), "batch": int(bs)})
        for n, run in runs.items() for bs, r in run["batches"].items()]
    candidates += [(f"{cores} processes × 1 thread, batch 64, {name}", lay["sentences_per_s"],
                    lay["cpu_ms_per_sentence"], {"processes": cores, "padded": lay["padded_chunk"]})
                   for name, lay in layouts.items()]
    best_name, best, best_cpu, best_spec = max(candidates, key=lambda x: x[1])
    res["raw"] = {"cores": cores, "runs": runs, "best_sentences_per_s": best,
                  "best_cpu_ms_per_sentence": best_cpu, "best_layout": best_name,
                  "best_spec": best_spec, "parallel_1_thread": layouts}
    for n_threads, run in runs.items():
        for bs, r in run["batches"].items():
            rows.append(("raw model", f"{n_threads} thread(s), batch {bs}",
                         f"{r['sentences_per_s']:.1f} sent/s", "", ""))
    for name, lay in layouts.items():
        rows.append(("raw model", f"{cores} processes × 1 thread at once, batch 64, {name}",
                     f"{lay['sentences_per_s']:.1f} sent/s (sum)", "", ""))
    rows.append(("raw model", "best layout (= raw_best)", f"{best:.1f} sent/s ({best_name}, "
                 f"{best_cpu:.2f} ms CPU/sentence)", "", ""))


def raw_again(b: Bench, raw: dict[str, Any], label: str) -> tuple[float, float]:
    """The best raw layout measured again: (sentences/s, CPU ms per sentence)."""
    spec = raw["best_spec"]
    if "processes" in spec:
        lay = raw_parallel(b, spec["processes"], spec["padded"], label)
        return lay["sentences_per_s"], lay["cpu_ms_per_sentence"]
    r = raw_single(b, spec["threads"], str(spec["batch"]), label)["batches"][str(spec["batch"])]
    return r["sentences_per_s"], r["cpu_ms_per_sentence"]


def minor_faults(pid: int) -> int:
    """A process's minor page faults so far (/proc/<pid>/stat field 10), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[7])
    except (OSError, ValueError, IndexError):
        return 0


class ServedCpu:
    """CPU seconds of a served tree, split: the gateway's processes, each replica's busiest
    thread (its model thread: the forward pass and tokenisation), and the rest of each
    replica (its HTTP server, parsing, batcher, log thread)."""

    def __init__(self, root_pid: int) -> None:
        self.root_pid = root_pid

    def snapshot(self) -> dict[str, Any]:
        import psutil

        out: dict[str, Any] = {"gateway": 0.0, "replicas": {}, "faults": {}}
        try:
            root = psutil.Process(self.root_pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return out
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                cmd = " ".join(proc.cmdline())
                if proc.pid == self.root_pid or "spawn_main" in cmd:
                    t = proc.cpu_times()
                    out["gateway"] += t.user + t.system
                elif "resource_tracker" not in cmd:
                    out["replicas"][proc.pid] = {th.id: th.user_time + th.system_time
                                                 for th in proc.threads()}
                    out["faults"][proc.pid] = minor_faults(proc.pid)
        return out

    @staticmethod
    def split(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
        model = other = 0.0
        for pid, threads in after["replicas"].items():
            was = before["replicas"].get(pid, {})
            used = [cpu - was.get(tid, 0.0) for tid, cpu in threads.items()]
            if used:
                model += max(used)
                other += sum(used) - max(used)
        faults = sum(n - before["faults"].get(pid, n) for pid, n in after["faults"].items())
        return {"gateway_s": after["gateway"] - before["gateway"], "model_s": model,
                "replica_other_s": other, "replica_minor_faults": faults}


def served_once(b: Bench, port: int, pid: int, label: str) -> dict[str, Any]:
    """One measured wrk run against the served deployment, with where the CPU went, per
    sentence answered: the replicas' model threads, the rest of the replicas, the gateway,
    wrk, and everything else the machine ran (the kernel's loopback work included)."""
    watch = ServedCpu(pid)
    before, own0 = watch.snapshot(), os.times()
    w = b.wrk(label, port, "/v1/embeddings", 64, b.duration_s, "input", "minilm", watch=[pid])
    split = ServedCpu.split(before, watch.snapshot())
    own1 = os.times()
    wrk_s = (own1.children_user + own1.children_system) - (own0.children_user + own0.children_system)
    busy_s = w["other_load"]["busy_cpu_s"]
    n = max(1, w["ok_2xx_3xx"])
    per = {"model": split["model_s"], "replica_other": split["replica_other_s"],
           "gateway": split["gateway_s"], "wrk": wrk_s}
    per["other"] = max(0.0, busy_s - sum(per.values()))
    w["cpu_ms_per_sentence"] = {k: round(v / n * 1000, 3) for k, v in per.items()}
    w["cpu_ms_per_sentence"]["total"] = round(busy_s / n * 1000, 3)
    w["replica_minor_faults_per_sentence"] = round(split["replica_minor_faults"] / n, 1)
    return w


def section_served(b: Bench, res: dict[str, Any], rows: list[Row]) -> None:
    """`b.pairs` served runs; before each one after the first, the best raw layout runs
    again (the served deployment idle meanwhile), so each served figure has a raw figure
    measured next to it on this machine, whose speed drifts by ±10 % over minutes.
    served/raw is the median of the pairs' ratios."""
    out: dict[str, Any] = {}
    res["served"] = out
    raw = res.get("raw", {})
    port = free_port()
    srv = Server("steadyserve-minilm", steadyserve_argv(None, None, port), port,
                 b.log_dir / "steadyserve-minilm.log")
    pairs: list[dict[str, Any]] = []
    with running(srv, out):
        out["all_replicas_ready_s"] = round(srv.wait_all_replicas("minilm"), 3)
        out["memory_idle"] = srv.memory()
        b.wrk("served-warmup", port, "/v1/embeddings", 64, b.warm_embed_s, "input", "minilm",
              watch=[srv.pid])
        before = scrape(port, b.log_dir / "metrics-served-before.txt")
        for i in range(b.pairs):
            pair: dict[str, Any] = {}
            if raw:
                if i == 0:
                    pair["raw_sentences_per_s"] = raw["best_sentences_per_s"]
                    pair["raw_cpu_ms_per_sentence"] = raw["best_cpu_ms_per_sentence"]
                else:
                    log(f"raw model again ({raw['best_layout']}), pair {i + 1} of {b.pairs}")
                    rate, cpu_ms = raw_again(b, raw, f"raw-again-{i + 1}")
                    log(f"  {rate:.1f} sentences/s")
                    pair["raw_sentences_per_s"], pair["raw_cpu_ms_per_sentence"] = rate, cpu_ms
            label = "served" if i == 0 else f"served-{i + 1}"
            pair["wrk"] = w = served_once(b, port, srv.pid, label)
            pair["label"] = label
            if raw:
                pair["served_over_raw"] = w["ok_rps"] / pair["raw_sentences_per_s"]
            pairs.append(pair)
        out["metrics_delta"] = d = delta(scrape(port, b.log_dir / "metrics-served-after.txt"),
                                         before)
        out["mean_batch_size"] = batch_sizes(d)
        out["gateway_counters"] = error_counts(d)
        out["memory_after_load"] = srv.memory()
    out["pairs"] = pairs
    ratios = [p["served_over_raw"] for p in pairs if "served_over_raw" in p]
    ratio = statistics.median(ratios) if ratios else None
    out["served_over_raw"] = ratio
    # the headline figures are the median pair's (the first pair's without a raw run)
    mid = min(pairs, key=lambda p: abs(p.get("served_over_raw", 0.0) - (ratio or 0.0)))
    w = out["wrk"] = mid["wrk"]
    errors = sum(p["wrk"]["errors"] for p in pairs)
    non_2xx = sum(p["wrk"]["non_2xx_3xx"] for p in pairs)
    rows.append(("served embeddings", "sentences/s (wrk -c64, 1 sentence/request, 2xx only)",
                 f"{w['ok_rps']:.1f}" + (f" (all answers {w['rps']:.1f})"
                                         if w["non_2xx_3xx"] else "")
                 + (f" ({mid['label']}, the median pair)" if len(pairs) > 1 else ""), "", ""))
    rows.append(("served embeddings", "latency p50 / p99",
                 f"{w['p50_ms']:.1f} / {w['p99_ms']:.1f} ms", "", ""))
    rows.append(("served embeddings", f"errors (non-2xx + socket), all {len(pairs)} run(s)",
                 f"{errors} ({non_2xx} + {errors - non_2xx})", "0",
                 "ok" if errors == 0 else "MISS"))
    for p in pairs:
        if "served_over_raw" in p:
            rows.append(("served embeddings", f"pair: {p['label']} / raw next to it",
                         f"{p['wrk']['ok_rps']:.1f} / {p['raw_sentences_per_s']:.1f} = "
                         f"{p['served_over_raw']:.3f}", "", ""))
    # any raw measurement (the best layout may be any of them) or served run disturbed
    noisy = b.noisy(*(label for label in b.noise if label.startswith(("raw", "served"))
                      and not label.endswith("warmup")))
    rows.append(("served embeddings", f"served/raw (median of {len(ratios)} pair(s))",
                 f"{ratio:.2f}" if ratio is not None else "n/a",
                 f"≥ {TARGETS['served_over_raw']:.2f}",
                 verdict(ratio, TARGETS["served_over_raw"], True) + (" (noisy)" if noisy else "")))
    c = w["cpu_ms_per_sentence"]
    raw_cpu = mid.get("raw_cpu_ms_per_sentence")
    rows.append(("served embeddings", "CPU ms per sentence: model threads"
                 + (" (raw layout next to it)" if raw_cpu else ""),
                 f"{c['model']:.2f}" + (f" ({raw_cpu:.2f}: ×{c['model'] / raw_cpu:.3f})"
                                        if raw_cpu else ""), "", ""))
    rows.append(("served embeddings", "  replicas' other threads / gateway / wrk / rest",
                 f"{c['replica_other']:.2f} / {c['gateway']:.2f} / {c['wrk']:.2f} / "
                 f"{c['other']:.2f}; all {c['total']:.2f}", "", ""))
    rows.append(("served embeddings", "replicas' page faults per sentence (minor)",
                 f"{w['replica_minor_faults_per_sentence']:.1f}", "", ""))
    if w["non_2xx_3xx"] and out.get("gateway_counters"):
        rows.append(("served embeddings", "gateway counters during the runs",
                     summarise_counters(out["gateway_counters"]), "", ""))
    after = out.get("memory_after_load", {})
    if after:
        rss = [after["self"].get("rss_mib", 0.0)] + [c.get("rss_mib", 0.0)
                                                     for c in after["children"]]
        rows.append(("served embeddings", "RSS after the runs: gateway / replicas",
                     " / ".join(f"{x:.0f}" for x in rss) + " MiB", "", ""))
    if out["mean_batch_size"]:
        sizes = ", ".join(f"{v:.1f}" for v in out["mean_batch_size"].values())
        rows.append(("served embeddings", "mean batch size per replica", sizes, "", ""))


def section_peer_embed(b: Bench, res: dict[str, Any], rows: list[Row]) -> None:
    out: dict[str, Any] = {"mode": b.peer_mode}
    res["peer_embed"] = out
    port = free_port()
    cores = len(os.sched_getaffinity(0))
    srv = Server("fastapi-embed", uvicorn_argv("fastapi_embed:app", port), port,
                 b.log_dir / "fastapi-embed.log",
                 env={"BENCH_TORCH_THREADS": str(cores), "BENCH_PEER_MODE": b.peer_mode,
                      "TOKENIZERS_PARALLELISM": "false"})
    with running(srv, out):
        b.wrk("peer-embed-warmup", port, "/v1/embeddings", 64, b.warm_embed_s, "input", "minilm",
              watch=[srv.pid])
        out["wrk"] = w = b.wrk("peer-embed", port, "/v1/embeddings", 64, b.duration_s, "input",
                               "minilm", watch=[srv.pid])
    served = res.get("served", {}).get("wrk", {}).get("ok_rps")
    ratio = served / w["ok_rps"] if served and w["ok_rps"] else None
    out["served_over_peer"] = ratio
    rows.append(("fastapi peer (embed)", f"sentences/s (1 forward/request, {cores} threads)",
                 f"{w['ok_rps']:.1f}", "", ""))
    rows.append(("fastapi peer (embed)", "latency p50 / p99",
                 f"{w['p50_ms']:.1f} / {w['p99_ms']:.1f} ms", "", ""))
    rows.append(("fastapi peer (embed)", "errors (non-2xx + socket)",
                 f"{w['errors']} ({w['non_2xx_3xx']} + {w['socket_errors']})", "", ""))
    rows.append(("fastapi peer (embed)", "served/peer",
                 f"{ratio:.2f}" if ratio is not None else "n/a", "", ""))


def section_echo(b: Bench, res: dict[str, Any], rows: list[Row]) -> None:
    out: dict[str, Any] = {}
    res["echo"] = out
    path = "/v1/deployments/echo/echo"
    port = free_port()
    srv = Server("steadyserve-echo", steadyserve_argv(ECHO_SERVICE, 1, port), port,
                 b.log_dir / "steadyserve-echo.log")
    ss: dict[str, Any] = {}
    out["steadyserve"] = ss
    with running(srv, ss):
        srv.wait_all_replicas("echo")
        b.wrk("echo-warmup", port, path, 64, b.warm_echo_s, "text", watch=[srv.pid])
        before = scrape(port, b.log_dir / "metrics-echo-before.txt")
        ss["c64"] = b.wrk("echo-c64", port, path, 64, b.duration_s, "text", watch=[srv.pid])
        ss["c1"] = b.wrk("echo-c1", port, path, 1, b.duration_s, "text", watch=[srv.pid])
        ss["metrics_delta"] = d = delta(scrape(port, b.log_dir / "metrics-echo-after.txt"), before)
        ss["gateway_counters"] = error_counts(d)
    port = free_port()
    peer = Server("fastapi-echo", uvicorn_argv("fastapi_echo:app", port), port,
                  b.log_dir / "fastapi-echo.log")
    fa: dict[str, Any] = {}
    out["fastapi"] = fa
    with running(peer, fa):
        b.wrk("peer-echo-warmup", port, path, 64, b.warm_echo_s, "text", watch=[peer.pid])
        fa["c64"] = b.wrk("peer-echo-c64", port, path, 64, b.duration_s, "text", watch=[peer.pid])
        fa["c1"] = b.wrk("peer-echo-c1", port, path, 1, b.duration_s, "text", watch=[peer.pid])
    rps, p50 = ss["c64"]["ok_rps"], ss["c1"]["p50_ms"]
    out["rps_ratio"] = rps / fa["c64"]["ok_rps"] if fa["c64"]["ok_rps"] else 0.0
    out["p50_ratio"] = p50 / fa["c1"]["p50_ms"] if fa["c1"]["p50_ms"] else None
    rows.append(("echo", "steadyserve req/s (c64)", f"{rps:.0f}",
                 f"≥ {TARGETS['echo_rps']:.0f}", verdict(rps, TARGETS["echo_rps"], True)
                 + (" (noisy)" if b.noisy("echo-c64") else "")))
    rows.append(("echo", "steadyserve p50 / p99 (c64)",
                 f"{ss['c64']['p50_ms']:.2f} / {ss['c64']['p99_ms']:.2f} ms", "", ""))
    rows.append(("echo", "steadyserve p50 (c1)", f"{p50:.3f} ms",
                 f"≤ {TARGETS['echo_p50_ms']:.1f} ms", verdict(p50, TARGETS["echo_p50_ms"], False)
                 + (" (noisy)" if b.noisy("echo-c1") else "")))
    rows.append(("echo", "steadyserve p99 (c1)", f"{ss['c1']['p99_ms']:.3f} ms", "", ""))
    errors = ss["c64"]["errors"] + ss["c1"]["errors"]
    rows.append(("echo", "steadyserve errors (non-2xx + socket)", str(errors), "0",
                 "ok" if errors == 0 else "MISS"))
    if errors and ss.get("gateway_counters"):
        rows.append(("echo", "gateway counters during c64 + c1",
                     summarise_counters(ss["gateway_counters"]), "", ""))
    rows.append(("echo", "fastapi direct req/s (c64)", f"{fa['c64']['ok_rps']:.0f}", "", ""))
    rows.append(("echo", "fastapi direct p50 (c1)", f"{fa['c1']['p50_ms']:.3f} ms", "", ""))
    rows.append(("echo", "steadyserve/fastapi-direct req/s (c64)", f"{out['rps_ratio']:.2f}",
                 "", ""))
    rows.append(("echo", "steadyserve/fastapi-direct p50 (c1)",
                 f"{out['p50_ratio']:.2f}" if out["p50_ratio"] else "n/a", "", ""))


def _c64_with_cpu(b: Bench, label: str, port: int, path: str,
                  pid: int) -> tuple[dict[str, Any], float, float]:
    """One measured wrk -c64 run, and the CPU ms per answered request of the server's
    gateway processes and of its other children (split_cpu_s)."""
    g0, r0 = split_cpu_s(pid)
    run = b.wrk(f"{label}-c64", port, path, 64, b.duration_s, "text", watch=[pid])
    g1, r1 = split_cpu_s(pid)
    ok = max(1, run["requests"] - run["non_2xx_3xx"])
    return run, 1000 * (g1 - g0) / ok, 1000 * (r1 - r0) / ok


def section_workers(b: Bench, res: dict[str, Any], rows: list[Row]) -> None:
    """Echo through 1 and 2 gateway processes (SO_REUSEPORT), 2 replicas, wrk -c64; the
    FastAPI echo app under uvicorn --workers 1 and 2 as the peer, in the same run."""
    out: dict[str, Any] = {}
    res["workers"] = out
    path = "/v1/deployments/echo/echo"
    for n in (1, 2):
        port = free_port()
        srv = Server(f"steadyserve-echo-w{n}", steadyserve_argv(ECHO_SERVICE, 2, port, n), port,
                     b.log_dir / f"steadyserve-echo-w{n}.log")
        ss: dict[str, Any] = {}
        out[f"steadyserve_w{n}"] = ss
        with running(srv, ss):
            srv.wait_all_replicas("echo")
            b.wrk(f"workers{n}-warmup", port, path, 64, b.warm_echo_s, "text", watch=[srv.pid])
            ss["c64"], gateway_ms, replica_ms = _c64_with_cpu(b, f"workers{n}", port, path,
                                                              srv.pid)
            ss["gateway_cpu_ms_per_request"] = gateway_ms
            ss["replica_cpu_ms_per_request"] = replica_ms
    for n in (1, 2):
        port = free_port()
        peer = Server(f"fastapi-echo-w{n}", uvicorn_argv("fastapi_echo:app", port, n), port,
                      b.log_dir / f"fastapi-echo-w{n}.log")
        fa: dict[str, Any] = {}
        out[f"fastapi_w{n}"] = fa
        with running(peer, fa):
            b.wrk(f"peer-w{n}-warmup", port, path, 64, b.warm_echo_s, "text", watch=[peer.pid])
            fa["c64"], main_ms, children_ms = _c64_with_cpu(b, f"peer-w{n}", port, path,
                                                            peer.pid)
            # uvicorn's workers are its children: the server's CPU is all of it
            fa["cpu_ms_per_request"] = main_ms + children_ms
    one, two = out["steadyserve_w1"]["c64"], out["steadyserve_w2"]["c64"]
    out["rps_ratio_2_to_1"] = two["ok_rps"] / one["ok_rps"] if one["ok_rps"] else 0.0
    for n in (1, 2):
        s = out[f"steadyserve_w{n}"]
        rows.append(("workers", f"steadyserve --workers {n}: req/s, p50 / p99 (c64)",
                     f"{s['c64']['ok_rps']:.0f}, {s['c64']['p50_ms']:.2f} / "
                     f"{s['c64']['p99_ms']:.2f} ms", "", "" if not s["c64"]["errors"]
                     else f"{s['c64']['errors']} errors"))
        rows.append(("workers", f"steadyserve --workers {n}: CPU ms/request gateway, replicas",
                     f"{s['gateway_cpu_ms_per_request']:.3f}, "
                     f"{s['replica_cpu_ms_per_request']:.3f}", "", ""))
    rows.append(("workers", "steadyserve req/s, 2 workers / 1", f"{out['rps_ratio_2_to_1']:.2f}",
                 "", ""))
    for n in (1, 2):
        f = out[f"fastapi_w{n}"]
        rows.append(("workers", f"fastapi uvicorn --workers {n}: req/s, CPU ms/request",
                     f"{f['c64']['ok_rps']:.0f}, {f['cpu_ms_per_request']:.3f}", "", ""))


def section_coalesce(b: Bench, res: dict[str, Any], rows: list[Row]) -> None:
    """The echo service's batched handler (no work in it), 1 replica, wrk -c64, with the
    gateway coalescing calls ([gateway] coalesce_max_items = 64, the default) and without
    (0), alternating twice so the machine's drift falls on both sides: req/s, p50/p99 and
    the CPU per request of the gateway and of the replica."""
    out: dict[str, Any] = {"on": [], "off": []}
    res["coalesce"] = out
    path = "/v1/deployments/echo/echo_batch"
    for rnd in range(2):
        for mode, items in (("on", 64), ("off", 0)):
            cfg = b.log_dir / f"coalesce-{mode}.toml"
            cfg.write_text(f"[gateway]\ncoalesce_max_items = {items}\n\n[deployments.echo]\n"
                           f'service = "{ECHO_SERVICE}"\nreplicas = 1\n')
            port = free_port()
            argv = [*steadyserve_argv(None, None, port), "--config", str(cfg)]
            srv = Server(f"steadyserve-coalesce-{mode}-{rnd}", argv, port,
                         b.log_dir / f"steadyserve-coalesce-{mode}-{rnd}.log")
            one: dict[str, Any] = {}
            with running(srv, one):
                srv.wait_all_replicas("echo")
                b.wrk(f"coalesce-{mode}-{rnd}-warmup", port, path, 64, b.warm_echo_s, "texts[]",
                      watch=[srv.pid])
                g0, r0 = split_cpu_s(srv.pid)
                before = scrape(port)
                run = b.wrk(f"coalesce-{mode}-{rnd}", port, path, 64, b.duration_s, "texts[]",
                            watch=[srv.pid])
                g1, r1 = split_cpu_s(srv.pid)
                d = delta(scrape(port), before)
            ok = max(1, run["requests"] - run["non_2xx_3xx"])
            exchanges = d.get("steadyserve_upstream_exchanges_total{}", 0.0)
            one.update(wrk=run, gateway_cpu_us=1e6 * (g1 - g0) / ok,
                       replica_cpu_us=1e6 * (r1 - r0) / ok,
                       calls_per_exchange=(d.get("steadyserve_upstream_exchange_calls_total{}", 0.0)
                                           / exchanges if exchanges else None))
            out[mode].append(one)

    def med(mode: str, f: Callable[[dict[str, Any]], float]) -> float:
        return statistics.median(f(x) for x in out[mode])

    for mode in ("on", "off"):
        rps = med(mode, lambda x: x["wrk"]["ok_rps"])
        cpe = [x["calls_per_exchange"] for x in out[mode] if x["calls_per_exchange"]]
        rows.append(("coalescing", f"{mode}: req/s, p50 / p99 (c64, medians of 2)",
                     f"{rps:.0f}, {med(mode, lambda x: x['wrk']['p50_ms']):.1f} / "
                     f"{med(mode, lambda x: x['wrk']['p99_ms']):.1f} ms", "", ""))
        rows.append(("coalescing", f"{mode}: CPU µs/request gateway, replica",
                     f"{med(mode, lambda x: x['gateway_cpu_us']):.0f}, "
                     f"{med(mode, lambda x: x['replica_cpu_us']):.0f}"
                     + (f" ({statistics.median(cpe):.1f} calls per exchange)" if cpe else ""),
                     "", ""))
    on, off = med("on", lambda x: x["wrk"]["ok_rps"]), med("off", lambda x: x["wrk"]["ok_rps"])
    out["rps_on_over_off"] = on / off if off else None
    rows.append(("coalescing", "req/s on / off", f"{on / off:.2f}" if off else "n/a", "", ""))


def section_dashboard(b: Bench, res: dict[str, Any], rows: list[Row]) -> None:
    """wrk -c64 on echo, alternating three times without and with an open dashboard (a
    poller doing what the page does), so the machine's drift over the run falls on both
    sides; the cost is 1 - median(with) / median(without)."""
    import threading

    out: dict[str, Any] = {"without": [], "with": []}
    res["dashboard"] = out
    path = "/v1/deployments/echo/echo"
    port = free_port()
    srv = Server("steadyserve-echo-dash", steadyserve_argv(ECHO_SERVICE, 1, port), port,
                 b.log_dir / "steadyserve-echo-dash.log")
    polls: list[float] = []

    def page(stop: threading.Event) -> None:  # what an open dashboard asks of the gateway
        first = True
        while not stop.is_set():
            t = time.perf_counter()
            try:
                status, _ = http_get(port, "/v1/dashboard" + ("?history=180" if first else ""),
                                     timeout=5.0)
            except OSError:
                status = 0
            if status == 200:
                polls.append(time.perf_counter() - t)
            first = False
            stop.wait(2.0)

    with running(srv, out):
        srv.wait_all_replicas("echo")
        b.wrk("dash-warmup", port, path, 64, b.warm_echo_s, "text", watch=[srv.pid])
        for i in range(3):
            out["without"].append(b.wrk(f"dash-without-{i}", port, path, 64, b.duration_s,
                                        "text", watch=[srv.pid])["ok_rps"])
            stop = threading.Event()
            poller = threading.Thread(target=page, args=(stop,), daemon=True)
            poller.start()
            try:
                out["with"].append(b.wrk(f"dash-with-{i}", port, path, 64, b.duration_s,
                                         "text", watch=[srv.pid])["ok_rps"])
            finally:
                stop.set()
                poller.join(10)
    base, open_ = statistics.median(out["without"]), statistics.median(out["with"])
    out["polls"] = len(polls)
    out["poll_ms_p50"] = 1000 * statistics.median(polls) if polls else None
    out["cost"] = 1 - open_ / base if base else None
    rows.append(("dashboard", "echo req/s without an open dashboard (3 runs)",
                 " / ".join(f"{v:.0f}" for v in out["without"]), "", ""))
    rows.append(("dashboard", "echo req/s with one open (3 runs, alternating)",
                 " / ".join(f"{v:.0f}" for v in out["with"]), "", ""))
    rows.append(("dashboard", "throughput cost of an open dashboard (medians)",
                 f"{100 * out['cost']:.1f} %" if out["cost"] is not None else "n/a", "< 5 %",
                 verdict(out["cost"], 0.05, False) if out["cost"] is not None else ""))
    rows.append(("dashboard", "/v1/dashboard polls during the run, median time",
                 f"{len(polls)}, {out['poll_ms_p50']:.1f} ms" if polls else "0", "", ""))


def section_memory(b: Bench, res: dict[str, Any], rows: list[Row]) -> None:
    out: dict[str, Any] = {}
    res["memory"] = out
    port = free_port()
    srv = Server("steadyserve-minilm-start", steadyserve_argv(None, None, port), port,
                 b.log_dir / "steadyserve-minilm-start.log")
    with running(srv, out):
        out["all_replicas_ready_s"] = round(srv.wait_all_replicas("minilm"), 3)
        time.sleep(3.0)  # let start-up settle; no requests are sent
        out["idle"] = mem = srv.memory()
    ready = out["ready_s"]
    gw = mem["self"].get("rss_mib")
    replicas = [c for c in mem["children"] if "steadyserve.replica" in c.get("cmd", "")]
    others = [c for c in mem["children"] if c not in replicas]
    rows.append(("memory & start", "launch → /readyz 200 (minilm, 2 replicas)", f"{ready:.2f} s",
                 f"≤ {TARGETS['ready_s']:.0f} s", verdict(ready, TARGETS["ready_s"], False)))
    rows.append(("memory & start", "launch → all 2 replicas ready",
                 f"{out['all_replicas_ready_s']:.2f} s", "", ""))
    rows.append(("memory & start", "gateway idle RSS (USS)",
                 f"{gw:.0f} MiB ({mem['self'].get('uss_mib', 0):.0f})",
                 f"≤ {TARGETS['gateway_rss_mib']:.0f} MiB",
                 verdict(gw, TARGETS["gateway_rss_mib"], False)))
    for i, c in enumerate(replicas):
        rows.append(("memory & start", f"replica {i} idle RSS (USS)",
                     f"{c.get('rss_mib', 0):.0f} MiB ({c.get('uss_mib', 0):.0f})",
                     f"≤ {TARGETS['replica_rss_mib']:.0f} MiB",
                     verdict(c.get("rss_mib"), TARGETS["replica_rss_mib"], False)))
    for c in others:
        rows.append(("memory & start", f"other child {c['pid']} RSS",
                     f"{c.get('rss_mib', 0):.0f} MiB", "", ""))
    rows.append(("memory & start", "SIGTERM → exit",
                 f"{out['stop'].get('stop_s', 0):.2f} s, exit {out['stop'].get('exit_code')}"
                 + (f", left {out['stop']['children_left']}"
                    if out["stop"].get("children_left") else ""), "", ""))


def section_compression(b: Bench, res: dict[str, Any], rows: list[Row]) -> None:
    log("compression and wire encoding (in process)")
    out = run_worker("wire", ["--corpus", str(b.corpus_path),
                              "--seconds", str(0.05 if b.raw_s < 1 else 0.2)], 1, timeout_s=180)
    res["compression"] = out
    e, h = out["edge"], out["hop"]
    ident = e["identity_bytes"]
    rows.append(("compression", f"{e['sentences']}-sentence /v1/embeddings body, identity",
                 f"{ident:,} B", "", ""))
    rows.append(("compression", "gzip level 5", f"{e['gzip_bytes']:,} B "
                 f"(×{ident / e['gzip_bytes']:.2f} smaller), {e['gzip_us']:.0f} µs", "", ""))
    rows.append(("compression", "zstd level 3", f"{e['zstd_bytes']:,} B "
                 f"(×{ident / e['zstd_bytes']:.2f} smaller), {e['zstd_us']:.0f} µs", "", ""))
    rows.append(("compression", "orjson of the body (for scale)", f"{e['orjson_body_us']:.0f} µs",
                 "", ""))
    rows.append(("replica hop", "msgpack (codec.encode) bytes",
                 f"{h['msgpack_bytes']:,} B", "", ""))
    rows.append(("replica hop", "JSON float text bytes",
                 f"{h['json_bytes']:,} B (msgpack is ×{h['json_bytes'] / h['msgpack_bytes']:.2f} "
                 "smaller)", "", ""))
    rows.append(("replica hop", "msgpack encode / decode",
                 f"{h['msgpack_encode_us']:.1f} / {h['msgpack_decode_us']:.1f} µs", "", ""))
    rows.append(("replica hop", "JSON encode / decode (to arrays)",
                 f"{h['json_encode_us']:.1f} / {h['json_decode_us']:.1f} µs", "", ""))
    if not (h["msgpack_lossless"] and h["json_lossless"]):
        rows.append(("replica hop", "round trip lossless (msgpack, json)",
                     f"{h['msgpack_lossless']}, {h['json_lossless']}", "True, True", "MISS"))


# ---------------------------------------------------------------------------------------------

def print_table(rows: list[Row]) -> str:
    headers = ("section", "measure", "value", "target", "")
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(5)]
    lines = []
    sep = "  "
    lines.append(sep.join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    lines.append(sep.join("-" * w for w in widths).rstrip())
    last = None
    for r in rows:
        cells = list(r)
        if cells[0] == last:
            cells[0] = ""
        else:
            last = cells[0]
        lines.append(sep.join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    text = "\n".join(lines)
    print(text)
    return text


def git_state() -> dict[str, Any]:
    """HEAD and whether src/ differs from it (servers import src/ when they start)."""
    out: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        out["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                    capture_output=True, text=True, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=REPO,
                               capture_output=True, text=True, check=False).stdout.strip()
        out["src_dirty"] = bool(dirty)
        out["src_digest"] = hashlib.sha256(b"".join(
            p.read_bytes() for p in sorted((REPO / "src").rglob("*.py")))).hexdigest()[:16]
    return out


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
        "platform": platform.platform(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(Exception):
        import torch

        info["torch"] = torch.__version__
    with contextlib.suppress(Exception):
        import steadyserve

        info["steadyserve"] = steadyserve.__version__
    info.update(git_state())
    with contextlib.suppress(Exception):
        info["wrk"] = subprocess.run(["wrk", "--version"], capture_output=True, text=True,
                                     check=False).stdout.splitlines()[0].strip()
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short smoke run, about a minute")
    p.add_argument("--only", choices=["echo", "embed", "memory", "compression", "workers", "coalesce",
                                      "dashboard"],
                   help="run one part (embed = raw model + served + FastAPI peer)")
    p.add_argument("--duration-s", type=int, help="seconds per measured wrk run "
                   "(default 30; 4 with --quick)")
    p.add_argument("--peer-mode", choices=["async", "threadpool"], default="async",
                   help="how the FastAPI embedding peer runs its forward (see peers/)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help=f"first wait up to S seconds for other processes to use ≤ {NOISY_PCT:.0f}%% "
                   "of the CPU (a shared machine); default 0: just report it")
    p.add_argument("--pairs", type=int, help="served MiniLM runs, each after the best raw "
                   "layout measured again; served/raw is the median ratio (default 3; 1 with "
                   "--quick)")
    p.add_argument("--sentences", type=int, default=2000, help="corpus size")
    p.add_argument("--seed", type=int, default=20240601, help="corpus seed")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/"
                   "serving-<timestamp>.json)")
    # internal: the in-process model measurements run as subprocesses of this script
    p.add_argument("--_worker", choices=["raw", "wire"], help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=3.0, help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--batches", default="1,8,32,64", help=argparse.SUPPRESS)
    p.add_argument("--padded-chunk", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._worker:
        result = worker_raw(args) if args._worker == "raw" else worker_wire(args)
        print(json.dumps(result))
        return 0

    if shutil.which("wrk") is None and args.only not in ("memory", "compression"):
        print("wrk is not installed (make bench-deps installs it)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_signal)
    started = time.monotonic()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    log_dir = RESULTS / f"logs-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    corpus = make_corpus(args.sentences, args.seed)
    corpus_path = RESULTS / f"corpus-{args.sentences}-{args.seed}.txt"
    corpus_path.write_text("\n".join(corpus) + "\n")
    words = [len(s.split()) for s in corpus]

    quick = args.quick
    b = Bench(
        duration_s=args.duration_s or (4 if quick else 30),
        warm_embed_s=2 if quick else 5,
        warm_echo_s=2 if quick else 3,
        raw_s=0.75 if quick else 1.5,
        rounds=1 if quick else 3,
        pairs=max(1, args.pairs or (1 if quick else 3)),
        corpus_path=corpus_path, log_dir=log_dir, peer_mode=args.peer_mode,
    )
    res: dict[str, Any] = {
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "settings": {"quick": quick, "only": args.only, "duration_s": b.duration_s,
                     "warm_embed_s": b.warm_embed_s, "warm_echo_s": b.warm_echo_s,
                     "raw_s_per_point": b.raw_s, "raw_rounds": b.rounds, "pairs": b.pairs,
                     "wrk": "-t1, --timeout 10s",
                     "peer_mode": b.peer_mode},
        "targets": TARGETS,
        "corpus": {"sentences": len(corpus), "seed": args.seed, "path": str(corpus_path),
                   "sha256": hashlib.sha256(corpus_path.read_bytes()).hexdigest(),
                   "words_min": min(words), "words_max": max(words),
                   "words_mean": statistics.mean(words)},
        "failures": [],
    }
    rows: list[Row] = []
    plan: list[tuple[str, Callable[[Bench, dict[str, Any], list[Row]], None]]] = []
    if args.only in (None, "compression"):
        plan.append(("compression", section_compression))
    if args.only in (None, "embed"):
        plan += [("raw", section_raw), ("served", section_served),
                 ("peer_embed", section_peer_embed)]
    if args.only in (None, "echo"):
        plan.append(("echo", section_echo))
    if args.only in (None, "memory"):
        plan.append(("memory", section_memory))
    if args.only == "workers":
        plan.append(("workers", section_workers))
    if args.only == "dashboard":
        plan.append(("dashboard", section_dashboard))
    if args.only == "coalesce":
        plan.append(("coalesce", section_coalesce))

    wait_until = time.monotonic() + args.wait_quiet
    while True:
        with CpuWatch() as cpu:
            time.sleep(2.0 if not quick else 1.0)
        if cpu.result["foreign_pct"] <= NOISY_PCT or time.monotonic() >= wait_until:
            break
        log(f"waiting for a quiet machine: other processes use {cpu.result['foreign_pct']:.0f}% "
            "of the CPU")
    res["preflight_other_load"] = pre = cpu.result
    log(f"before starting: other processes use {pre['foreign_pct']:.0f}% of the CPU "
        f"(steal {pre['steal_pct']:.0f}%, load average {pre['loadavg_1m']:.2f})"
        + ("  <- the machine is busy; figures will be disturbed"
           if pre["foreign_pct"] > NOISY_PCT else ""))
    try:
        for name, fn in plan:
            try:
                fn(b, res, rows)
            except (StartFailed, subprocess.TimeoutExpired) as exc:
                msg = f"{name}: {exc}"
                log(f"FAILED {msg}")
                res["failures"].append(msg)
                rows.append((name, "FAILED", str(exc).splitlines()[0][:80], "", "FAIL"))
    finally:
        _stop_all()
        res["other_load"] = b.noise
        rows.append(("other load", "before starting (idle)",
                     f"{pre['foreign_pct']:.0f}% of CPU, steal {pre['steal_pct']:.0f}%",
                     f"≤ {NOISY_PCT:.0f}%", "noisy" if pre["foreign_pct"] > NOISY_PCT else "ok"))
        for label, r in b.noise.items():
            if label.endswith("warmup"):
                continue
            noisy = r["foreign_pct"] > NOISY_PCT or r["steal_pct"] > NOISY_PCT
            rows.append(("other load", f"during {label}",
                         f"{r['foreign_pct']:.0f}% of CPU, steal {r['steal_pct']:.0f}%",
                         f"≤ {NOISY_PCT:.0f}%", "noisy" if noisy else "ok"))
        res["elapsed_s"] = round(time.monotonic() - started, 1)
        res["git_at_end"] = end_state = git_state()
        if end_state.get("src_digest") != res["machine"].get("src_digest"):
            log("WARNING: src/ changed while the benchmark ran: parts measured different code")
            rows.append(("run", "src/ changed during the run",
                         f"{res['machine'].get('git')} → {end_state.get('git')}", "", "MISS"))
        out_path = args.out or RESULTS / f"serving-{stamp}.json"
        print()
        print(f"steadyserve serving benchmark, {res['started']}, git {res['machine'].get('git')}"
              f"{' + uncommitted src/' if res['machine'].get('src_dirty') else ''}, "
              f"{res['machine'].get('cores')} cores ({res['machine'].get('cpu', '?')}), "
              f"{'--quick' if quick else 'full'} run, wrk {b.duration_s} s per measurement, "
              f"{res['elapsed_s']:.0f} s in all")
        res["table"] = print_table(rows)
        res["rows"] = rows
        out_path.write_text(json.dumps(res, indent=2, default=str) + "\n")
        print(f"\nJSON: {out_path}\nlogs: {log_dir}")
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
