"""The operator's CLI against a live gateway: `status` (tables and --json), `top` (one
refresh), `bench` (a bounded load with its figures), and one clear line with a non-zero
exit code when the gateway cannot be reached (bench too: before any load)."""

from __future__ import annotations

import json
import subprocess

import pytest

from .conftest import ECHO, STEADYSERVE, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def cli(*args: str, cwd) -> subprocess.CompletedProcess[str]:
    """Run beside the gateway's steadyserve data directory, as an operator would (the CLI
    finds the local admin key there)."""
    return subprocess.run([*STEADYSERVE, *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env={"COLUMNS": "160", "PATH": "/usr/bin:/bin"})


def test_status_top_and_bench(serve, tmp_path) -> None:
    gw = serve([ECHO, "--replicas", "2"])
    shown = cli("status", "--url", gw.url, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "echo: 2/2 ready" in shown.stdout and "echo-0" in shown.stdout
    assert "alerts: 0 firing" in shown.stdout
    as_json = json.loads(cli("status", "--json", "--url", gw.url, cwd=tmp_path).stdout)
    assert [d["name"] for d in as_json["deployments"]] == ["echo"]
    assert as_json["cluster"] == {"enabled": False, "leading": True}

    loaded = cli("bench", "echo", "echo", "--body", '{"text": "hi"}', "--rate", "100",
                 "--duration-s", "2", "--json", "--url", gw.url, cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr
    figures = json.loads(loaded.stdout)
    assert figures["requests"] == 200 and figures["ok"] == 200 and figures["errors"] == {}
    assert figures["p50_ms"] > 0 and figures["p99_ms"] >= figures["p50_ms"]

    live = cli("top", "--iterations", "1", "--interval-s", "0.5", "--url", gw.url, cwd=tmp_path)
    assert live.returncode == 0, live.stderr
    assert "echo" in live.stdout and "req/s" in live.stdout

    refused = cli("bench", "echo", "echo", "--body", "{not json", "--url", gw.url, cwd=tmp_path)
    assert refused.returncode == 2 and "--body is not JSON" in refused.stderr


def test_an_unreachable_gateway_is_one_line_and_exit_1(tmp_path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["status", "--url", url], ["top", "--iterations", "1", "--url", url],
                 ["bench", "echo", "echo", "--body", "{}", "--url", url]):
        done = cli(*args, cwd=tmp_path)
        assert done.returncode == 1, (args, done)
        assert done.stderr.count("\n") == 1 and "cannot" in done.stderr, done.stderr
