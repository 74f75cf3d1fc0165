"""`steadyserve logs` against a live gateway: a request's lines from the gateway and from the
replica that served it (the service's own lines too, from the model thread), filters by
deployment and level, --follow showing a new request's lines, the files on disk, and the
API's answers to a missing key and to bad filters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import HERE, STEADYSERVE

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHATTY = f"{HERE / 'services' / 'chatty.py'}:Chatty"
ECHO_SERVICE = f"{HERE / 'services' / 'echo.py'}:Echo"


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Beside the gateway's data directory, as an operator runs it (the CLI finds the local
    admin key there)."""
    return subprocess.run([*STEADYSERVE, "logs", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})


def lines_of(out: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def say(gw: Any, text: str, fail: bool = False) -> str:
    r = httpx.post(f"{gw.url}/v1/deployments/chatty/say", json={"text": text, "fail": fail},
                   timeout=10)
    assert r.status_code == (500 if fail else 200), r.text
    return r.headers["x-request-id"]


def wait_for(check: Any, timeout_s: float = 10) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def test_logs_of_a_request_a_deployment_and_a_follow(serve: Any, tmp_path: Path) -> None:
    (tmp_path / "steadyserve.toml").write_text(f"""
[deployments.chatty]
service = "{CHATTY}"
replicas = 1
[deployments.echo]
service = "{ECHO_SERVICE}"
replicas = 1
""")
    gw = serve([])
    ok_id = say(gw, "hello")
    failed_id = say(gw, "goodbye", fail=True)
    r = httpx.post(f"{gw.url}/v1/deployments/echo/echo", json={"text": "x"}, timeout=10)
    assert r.status_code == 200, r.text

    def of_failed() -> list[dict[str, Any]]:
        got = lines_of(cli("--request-id", failed_id, "--json", "--url", gw.url, cwd=tmp_path))
        return got if len(got) >= 3 else []

    got = wait_for(of_failed)
    assert {r["request_id"] for r in got} == {failed_id}
    by_msg = {r["msg"]: r for r in got}
    assert by_msg["saying goodbye"]["replica"] == "chatty-0"  # the service's own line
    assert by_msg["saying goodbye"]["deployment"] == "chatty"
    assert by_msg["saying goodbye"]["chars"] == 7
    assert "ValueError: cannot say 'goodbye'" in by_msg["handler say failed"]["exc"]
    assert by_msg["request"]["status"] == 500 and by_msg["request"]["process"] == "gateway"

    errors = lines_of(cli("--deployment", "chatty", "--level", "error", "--json",
                          "--url", gw.url, cwd=tmp_path))
    assert errors and all(r["level"] == "error" for r in errors)
    assert failed_id in {r.get("request_id") for r in errors}
    assert ok_id not in {r.get("request_id") for r in errors}
    echo_only = lines_of(cli("--deployment", "echo", "--json", "--url", gw.url, cwd=tmp_path))
    assert echo_only and all(r.get("deployment") == "echo" or r.get("replica", "").startswith(
        "echo-") for r in echo_only)
    assert not {ok_id, failed_id} & {r.get("request_id") for r in echo_only}

    text = cli("--request-id", ok_id, "--url", gw.url, cwd=tmp_path)  # the readable form
    assert text.returncode == 0, text.stderr
    assert "INFO    chatty-0 saying hello" in text.stdout

    # --follow: the lines of a request sent after it started, then SIGTERM ends it cleanly
    # (SIGTERM, not SIGINT: a shell starting the suite in the background ignores SIGINT for
    # its children, and Python keeps an inherited SIG_IGN)
    follow = subprocess.Popen([*STEADYSERVE, "logs", "--follow", "--deployment", "chatty",
                               "--json", "--lines", "1", "--interval-s", "0.2", "--url", gw.url],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    try:
        time.sleep(1.0)
        later_id = say(gw, "later")
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + 20
        assert follow.stdout is not None
        os.set_blocking(follow.stdout.fileno(), False)
        while time.monotonic() < deadline and not {"saying later", "request"} <= {
                r["msg"] for r in seen if r.get("request_id") == later_id}:
            line = follow.stdout.readline()
            if line:
                seen.append(json.loads(line))
            else:
                time.sleep(0.05)
        later = [r for r in seen if r.get("request_id") == later_id]
        assert {r["msg"] for r in later} >= {"saying later", "request"}, seen
        shown = [json.dumps(r, sort_keys=True) for r in seen]
        assert len(shown) == len(set(shown))  # no line twice
    finally:
        follow.send_signal(signal.SIGTERM)
        assert follow.wait(10) == 0, follow.stderr.read() if follow.stderr else ""

    logs_dir = gw.data_dir / "logs"
    assert {"gateway.jsonl", "chatty-0.jsonl", "echo-0.jsonl"} <= {
        p.name for p in logs_dir.iterdir()}
    assert logs_dir.stat().st_mode & 0o777 == 0o700


def test_the_log_api_needs_the_admin_key_and_refuses_bad_filters(serve: Any,
                                                                  tmp_path: Path) -> None:
    gw = serve([ECHO_SERVICE, "--name", "echo"])
    anonymous = httpx.get(f"{gw.url}/v1/logs", timeout=10)
    assert anonymous.status_code == 401, anonymous.text
    admin = gw.admin_headers()
    good = httpx.get(f"{gw.url}/v1/logs", params={"limit": 5}, headers=admin, timeout=10)
    assert good.status_code == 200 and 0 < len(good.json()["lines"]) <= 5, good.text
    for params, status, param in [
        ({"level": "loud"}, 400, "level"), ({"since": "yesterday"}, 400, "since"),
        ({"since": "nan"}, 400, "since"), ({"since": "-1"}, 400, "since"),
        ({"limit": "0"}, 400, "limit"), ({"limit": "99999999"}, 400, "limit"),
        ({"replica": "x" * 500}, 400, "replica"), ({"request_id": "a\x00b"}, 400, "request_id"),
        ({"deployment": "nope"}, 404, "deployment")]:
        r = httpx.get(f"{gw.url}/v1/logs", params=params, headers=admin, timeout=10)
        assert r.status_code == status, (params, r.text)
        assert r.json()["error"]["param"] == param, (params, r.text)
