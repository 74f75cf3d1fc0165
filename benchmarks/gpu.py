"""The serving path on a GPU: MiniLM raw on the GPU vs served by steadyserve with 1, 2, 4 and 8
gateway processes (`--workers`), and the FastAPI peer, in one run.

    .venv/bin/python benchmarks/gpu.py                       # on a machine with a CUDA GPU
    .venv/bin/python benchmarks/gpu.py --workers 1,2 --duration-s 5 --allow-cpu   # smoke run

1. raw: the embedding example in one process on the GPU (fp16 after its start-up check
   against fp32), batches of 1 / 32 / 256 / 1024 sentences, tokenisation included: the limit.
2. served: `steadyserve run` with a generated config — minilm on `--replicas` replicas that
   share the GPU (`num_gpus = 1 / replicas`), `[gateway] workers = N` — under wrk with
   `--connections` connections, one sentence per request (`POST /v1/embeddings`), for each N.
   Reports sentences/s, p50/p99, the ratio to raw, mean batch size, and CPU per request of
   the gateway processes and of the replicas.
3. peer: the FastAPI app (one forward per request, no batching) on the same GPU.

Prints a table and writes benchmarks/results/gpu-<timestamp>.json. Without a CUDA GPU it
refuses to run (exit 3) unless --allow-cpu (figures then say nothing about a GPU). Targets
are printed, never asserted; everything listens on 127.0.0.1; every load run is bounded.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import serving as sv  # noqa: E402  (benchmarks/serving.py: servers, wrk, CPU accounting)

log = sv.log


def cuda_devices() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def served_config(path: Path, data_dir: Path, replicas: int, workers: int, gpu: bool) -> None:
    share = f"num_gpus = {1 / replicas:.4f}" if gpu else ""
    path.write_text(f"""
data_dir = "{data_dir}"
[gateway]
workers = {workers}
[alerting]
enabled = false
[deployments.minilm]
service = "steadyserve.examples.embedding:Embedder"
replicas = {replicas}
{share}
""")


def steadyserve_argv(config: Path, port: int) -> list[str]:
    exe = sv.BIN / "steadyserve"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "steadyserve.cli.main"]
    return [*cmd, "run", "--config", str(config), "--port", str(port), "--log-format", "json"]


def wrk(b: sv.Bench, label: str, port: int, conns: int, seconds: int,
        pid: int) -> dict[str, Any]:
    g0, r0 = sv.split_cpu_s(pid)
    run = b.wrk(label, port, "/v1/embeddings", conns, seconds, "input", "minilm", watch=[pid])
    g1, r1 = sv.split_cpu_s(pid)
    ok = max(1, run["requests"] - run["non_2xx_3xx"])
    run["gateway_cpu_ms_per_request"] = 1000 * (g1 - g0) / ok
    run["replica_cpu_ms_per_request"] = 1000 * (r1 - r0) / ok
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="1,2,4,8", help="gateway process counts to measure")
    p.add_argument("--replicas", type=int, default=2, help="replicas sharing the GPU")
    p.add_argument("--connections", type=int, default=256, help="wrk connections")
    p.add_argument("--duration-s", type=int, default=20, help="seconds per measured wrk run")
    p.add_argument("--allow-cpu", action="store_true", help="run without a GPU (smoke test)")
    p.add_argument("--skip-peer", action="store_true", help="leave out the FastAPI peer")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/gpu-*.json)")
    args = p.parse_args(argv)
    counts = [int(n) for n in args.workers.split(",")]
    gpus = cuda_devices()
    if not gpus and not args.allow_cpu:
        print("no CUDA GPU here (torch.cuda.is_available() is False); --allow-cpu for a "
              "smoke run", file=sys.stderr)
        return 3
    if shutil.which("wrk") is None:
        print("wrk is not installed (make bench-deps installs it)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, sv._on_signal)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    sv.RESULTS.mkdir(parents=True, exist_ok=True)
    log_dir = sv.RESULTS / f"logs-gpu-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    corpus_path = sv.RESULTS / "corpus-gpu.txt"
    corpus_path.write_text("\n".join(sv.make_corpus(4000, 20240601)) + "\n")
    b = sv.Bench(duration_s=args.duration_s, warm_embed_s=5, warm_echo_s=3, raw_s=3.0,
                 corpus_path=corpus_path, log_dir=log_dir, peer_mode="async")
    res: dict[str, Any] = {"started": dt.datetime.now().isoformat(timespec="seconds"),
                           "machine": sv.machine_info(), "cuda_devices": gpus,
                           "settings": vars(args) | {"out": str(args.out)}, "failures": []}
    rows: list[sv.Row] = []
    cores = len(os.sched_getaffinity(0))
    try:
        log("raw model on the GPU" if gpus else "raw model (CPU: no GPU)")
        raw = sv.run_worker("raw", ["--threads", str(cores), "--seconds", str(b.raw_s),
                                    "--corpus", str(corpus_path), "--batches",
                                    "1,32,256,1024" if gpus else "1,32"], cores, 600)
        best_bs, best = max(((bs, r["sentences_per_s"]) for bs, r in raw["batches"].items()),
                            key=lambda x: x[1])
        res["raw"] = raw | {"best_sentences_per_s": best, "best_batch": int(best_bs)}
        for bs, r in raw["batches"].items():
            rows.append(("raw", f"batch {bs}", f"{r['sentences_per_s']:.0f} sent/s", "", ""))

        with tempfile.TemporaryDirectory(prefix="ss-gpu-") as tmp:
            for n in counts:
                port = sv.free_port()
                config = Path(tmp) / f"w{n}.toml"
                served_config(config, Path(tmp) / f"state-{n}", args.replicas, n, bool(gpus))
                srv = sv.Server(f"steadyserve-w{n}", steadyserve_argv(config, port), port,
                                log_dir / f"steadyserve-w{n}.log")
                out: dict[str, Any] = {}
                res[f"served_w{n}"] = out
                with sv.running(srv, out):
                    srv.wait_all_replicas("minilm", 300)
                    b.wrk(f"w{n}-warmup", port, "/v1/embeddings", args.connections,
                          b.warm_embed_s, "input", "minilm", watch=[srv.pid])
                    before = sv.scrape(port)
                    out["wrk"] = w = wrk(b, f"w{n}", port, args.connections, b.duration_s,
                                         srv.pid)
                    out["mean_batch_size"] = sv.batch_sizes(sv.delta(sv.scrape(port), before))
                ratio = w["ok_rps"] / best if best else 0.0
                out["served_over_raw"] = ratio
                rows.append(("served", f"--workers {n}: sentences/s, p50 / p99",
                             f"{w['ok_rps']:.0f}, {w['p50_ms']:.1f} / {w['p99_ms']:.1f} ms",
                             "", f"{w['errors']} errors" if w["errors"] else ""))
                rows.append(("served", f"--workers {n}: served / raw", f"{ratio:.2f}", "", ""))
                rows.append(("served", f"--workers {n}: CPU ms/request gateway, replicas",
                             f"{w['gateway_cpu_ms_per_request']:.3f}, "
                             f"{w['replica_cpu_ms_per_request']:.3f}", "", ""))
        if not args.skip_peer:
            port = sv.free_port()
            peer = sv.Server("fastapi-embed", sv.uvicorn_argv("fastapi_embed:app", port), port,
                             log_dir / "fastapi-embed.log")
            fa: dict[str, Any] = {}
            res["peer"] = fa
            with sv.running(peer, fa):
                b.wrk("peer-warmup", port, "/v1/embeddings", args.connections, b.warm_embed_s,
                      "input", "minilm", watch=[peer.pid])
                fa["wrk"] = w = b.wrk("peer", port, "/v1/embeddings", args.connections,
                                      b.duration_s, "input", "minilm", watch=[peer.pid])
            rows.append(("peer", "FastAPI (1 forward per request): sentences/s, p99",
                         f"{w['ok_rps']:.0f}, {w['p99_ms']:.1f} ms", "", ""))
    except (sv.StartFailed, OSError, ValueError) as exc:
        log(f"FAILED: {exc}")
        res["failures"].append(str(exc))
        rows.append(("run", "FAILED", str(exc).splitlines()[0][:80], "", "FAIL"))
    finally:
        sv._stop_all()
    res["table"] = sv.print_table(rows)
    path = args.out or sv.RESULTS / f"gpu-{stamp}.json"
    path.write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(f"\nJSON: {path}\nlogs: {log_dir}")
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
