"""Jobs through a real gateway with a data-plane worker ([gateway] workers = 2: a job route
that lands on the worker is forwarded to the gateway process, which keeps the queue), from
the Python client and the `steadyserve jobs` CLI; and a graceful stop that puts a running job
back in the queue for the next start."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from steadyserve.client import Client, SteadyserveError

from .conftest import HERE, STEADYSERVE

pytestmark = pytest.mark.integration

SERVICE = f"{HERE / 'services' / 'jobs_fast.py'}:JobsFast"


def config(tmp_path: Path, workers: int) -> None:
    (tmp_path / "steadyserve.toml").write_text(f"""
data_dir = "{tmp_path / 'state'}"
[gateway]
workers = {workers}
[alerting]
enabled = false
[jobs]
lease_s = 3.0
poll_s = 0.1
[deployments.fast]
service = "{SERVICE}"
replicas = 1
""")


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STEADYSERVE, "jobs", *args], text=True, capture_output=True,
                          timeout=120, cwd=tmp_path)


def test_jobs_through_a_worker_the_client_and_the_cli(serve, tmp_path: Path) -> None:
    config(tmp_path, workers=2)
    gw = serve([], ready_timeout_s=90)
    jobs = []
    for i in range(12):  # a connection each: the kernel spreads them over both processes
        with Client(gw.url, timeout_s=30) as one:
            jobs.append(one.submit_job("fast", "work", n=i, ms=1.0))
    assert all(j["state"] == "queued" for j in jobs)
    with Client(gw.url, timeout_s=30) as c:
        done = [c.wait_job(j["id"], timeout_s=60, poll_s=0.1) for j in jobs]
        assert [(d["state"], d["result"]["square"]) for d in done] == \
            [("succeeded", i * i) for i in range(12)]
        again = c.submit_job("fast", "work", n=1, ms=1.0, idempotency_key="same")
        assert c.submit_job("fast", "work", n=1, ms=1.0, idempotency_key="same")["id"] == \
            again["id"]
        slow = c.submit_job("fast", "work", n=1, ms=60_000.0)
        deadline = time.monotonic() + 30
        while c.job(slow["id"])["state"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert c.cancel_job(slow["id"])["state"] == "cancelled"
        with pytest.raises(SteadyserveError) as refused:
            c.submit_job("fast", "work", n="x")
        assert refused.value.status == 400 and "'n' must be int" in refused.value.message

    made = cli(tmp_path, "submit", "fast", "work", "--body", '{"n": 9, "ms": 1}', "--wait",
               "--url", gw.url)
    assert made.returncode == 0, made.stderr
    assert "succeeded" in made.stdout and '"square": 81' in made.stdout, made.stdout
    job_id = made.stdout.split()[0]
    shown = cli(tmp_path, "get", job_id, "--json", "--url", gw.url)
    assert shown.returncode == 0 and json.loads(shown.stdout)["result"]["n"] == 9
    listed = cli(tmp_path, "list", "--state", "succeeded", "--url", gw.url)
    # the CLI sends the local admin key: it sees every job (and the counts)
    assert listed.returncode == 0 and listed.stdout.count("succeeded") >= 14, listed.stdout
    assert "all jobs: cancelled 1, succeeded 14" in listed.stdout, listed.stdout
    late = cli(tmp_path, "cancel", job_id, "--url", gw.url)
    assert late.returncode == 1
    assert late.stderr.strip().splitlines() == [
        f"steadyserve: job {job_id} refused (409): job {job_id} is succeeded already: only a "
        "queued or running job can be cancelled"], late.stderr
    usage = cli(tmp_path, "get", "--url", gw.url)
    assert usage.returncode == 2 and "get takes 1 argument" in usage.stderr
    bad = cli(tmp_path, "submit", "fast", "work", "--body", "{nope", "--url", gw.url)
    assert bad.returncode == 2 and "--body is not JSON" in bad.stderr


def test_a_graceful_stop_puts_a_running_job_back_for_the_next_start(serve, tmp_path: Path) -> None:
    config(tmp_path, workers=1)
    (tmp_path / "steadyserve.toml").write_text(
        (tmp_path / "steadyserve.toml").read_text().replace(
            "[gateway]\n", "[gateway]\ngraceful_shutdown_s = 1.0\n"))
    gw = serve([])
    with Client(gw.url) as c:
        job = c.submit_job("fast", "work", n=4, ms=4000.0)
        deadline = time.monotonic() + 30
        while c.job(job["id"])["state"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert gw.stop() == []  # SIGTERM: drained for 1 s, then put back
    again = serve([])
    with Client(again.url) as c:
        done = c.wait_job(job["id"], timeout_s=60, poll_s=0.1)
    # the interrupted run is not counted as a failure: the second run is attempt 2
    assert (done["state"], done["attempt"], done["failures"]) == ("succeeded", 2, 0)
    assert done["result"]["square"] == 16
