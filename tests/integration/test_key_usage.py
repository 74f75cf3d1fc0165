"""Per-key usage on the real databases (a SQLite file, PostgreSQL) and end to end: requests
sent with a key through a gateway with two processes are counted per key and deployment,
shown by GET /v1/admin/keys/usage, the dashboard and `steadyserve keys usage`, and still
there after the gateway restarts."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from steadyserve.store import Database
from steadyserve.store.usage import DAY_S, UsageStore

from .conftest import ECHO, STEADYSERVE, start

pytestmark = [pytest.mark.integration]




def test_usage_rows_add_up_per_day_and_are_pruned(db: Database) -> None:
    store = UsageStore(db)
    today = 20_000 * DAY_S + 3600.0
    store.add({("k1", "echo"): [3, 1, 0, today], ("k2", "echo"): [1, 0, 1, today]}, today)
    store.add({("k1", "echo"): [2, 0, 1, today + 5]}, today + 5)  # another gateway's flush
    store.add({("k1", "echo"): [10, 0, 0, today - DAY_S]}, today - DAY_S)  # yesterday
    assert store.totals(today, 10) == [
        {"key_id": "k1", "deployment": "echo", "requests": 5, "errors": 1, "rejected": 1,
         "last_seen": today + 5},
        {"key_id": "k2", "deployment": "echo", "requests": 1, "errors": 0, "rejected": 1,
         "last_seen": today}]
    assert store.totals(today - DAY_S, 1)[0]["requests"] == 15
    store.prune(today)  # days before today's go: yesterday's rows
    assert store.totals(today - 5 * DAY_S, 10)[0]["requests"] == 5


def keys_cli(*args: str, cwd: Path) -> Any:
    out = subprocess.run([*STEADYSERVE, "keys", *args], capture_output=True, text=True,
                         timeout=60, cwd=cwd, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.slow
def test_usage_per_key_through_workers_and_a_restart(tmp_path: Path) -> None:
    (tmp_path / "steadyserve.toml").write_text(f"""
data_dir = "{tmp_path / 'state'}"
[gateway]
workers = 2
[auth]
usage_flush_s = 0.5
[deployments.echo]
service = "{ECHO}"
replicas = 1
""")
    gw = start([], tmp_path)
    try:
        gw.wait_ready(60)
        admin = gw.admin_headers()
        with httpx.Client(base_url=gw.url, timeout=10) as c:
            made = c.post("/v1/admin/keys", headers=admin, json={"name": "web-app",
                                                               "scopes": ["infer"]})
            assert made.status_code == 201, made.text
            key_id, web = made.json()["id"], {"authorization": f"Bearer {made.json()['key']}"}
            time.sleep(1.0)  # every process has read the new key ([auth] key_refresh_s)
            for i in range(40):  # new connections: the kernel spreads them over both processes
                with httpx.Client(base_url=gw.url, timeout=10) as fresh:
                    r = fresh.post("/v1/deployments/echo/echo", headers=web, json={"text": str(i)})
                    assert r.status_code == 200, r.text
            bad = c.post("/v1/deployments/echo/echo", headers=web, json={"txt": "typo"})
            assert bad.status_code == 400, bad.text

            def usage() -> list[dict[str, Any]]:
                r = c.get("/v1/admin/keys/usage", headers=admin, params={"days": 1})
                assert r.status_code == 200, r.text
                return [u for u in r.json()["usage"] if u["key_id"] == key_id]

            deadline = time.monotonic() + 15  # workers report every second
            while usage() and usage()[0]["requests"] < 41 and time.monotonic() < deadline:
                time.sleep(0.2)
            got = usage()
            assert len(got) == 1, got
            assert {k: got[0][k] for k in ("name", "deployment", "requests", "errors",
                                           "rejected")} == {
                "name": "web-app", "deployment": "echo", "requests": 41, "errors": 0,
                "rejected": 1}
            for params in ({"days": "0"}, {"days": "367"}, {"limit": "x"}):
                r = c.get("/v1/admin/keys/usage", headers=admin, params=params)
                assert r.status_code == 400, (params, r.text)
            assert c.get("/v1/admin/keys/usage", headers=web).status_code == 403
            dash = c.get("/v1/dashboard", headers=admin)
            assert dash.status_code == 200, dash.text
            assert [k["requests"] for k in dash.json()["keys"] if k["key_id"] == key_id] == [41]
            time.sleep(1.5)  # stored (usage_flush_s)
    finally:
        gw.stop()
    again = start([], tmp_path)
    try:
        deadline = time.monotonic() + 60  # keys exist now: /v1/deployments needs one too
        while True:
            try:
                r = httpx.get(f"{again.url}/v1/admin/keys/usage", headers=again.admin_headers(),
                              timeout=10)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert again.proc.poll() is None and time.monotonic() < deadline, \
                again.log.read_text()[-4000:]
            time.sleep(0.2)
        assert [u["requests"] for u in r.json()["usage"] if u["key_id"] == key_id] == [41]
    finally:
        again.stop()
    listed = json.loads(keys_cli("usage", "--days", "1", "--json", cwd=tmp_path))
    assert [(u["name"], u["requests"]) for u in listed if u["key_id"] == key_id] == [
        ("web-app", 41)]
    assert "web-app" in keys_cli("usage", cwd=tmp_path)
