"""The dashboard in a real headless Chromium (Debian's, driven by Playwright): the page loads
with no console error, its charts draw the requests sent during the test, the batched
handler's batch sizes show, replicas show actual against target and their outstanding
requests, asynchronous jobs show by state with the expired one's error, the history window
changes, the replica that never starts says why it exited, an alert fired
in the test appears and is silenced from the page (which asks for the admin key first), a
restart not confirmed does nothing, a confirmed one rolls out and is cancelled from the page,
the data needs a key once keys exist; a screenshot is kept in test-artifacts/dashboard.png."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from .conftest import ECHO, HERE, start, unavailable

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ARTIFACTS = HERE.parents[1] / "test-artifacts"


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        unavailable("Debian's chromium (.ci/run installs it)", FileNotFoundError("chromium"))
    return str(path)


def test_the_dashboard_in_a_real_browser(tmp_path: Path) -> None:
    browser_path = chromium()
    from playwright.sync_api import sync_playwright

    (tmp_path / "steadyserve.toml").write_text(f"""
data_dir = "{tmp_path / 'state'}"
[alerting]
evaluation_interval_s = 0.5
not_ready_for_s = 1
[supervisor]
rollout_max_restarts = 1000  # a rollout of `down` runs until it is cancelled
[deployments.echo]
service = "{ECHO}"
replicas = 2
[deployments.down]
service = "{HERE / 'services' / 'echo.py'}:Broken"
replicas = 1
""")
    gw = start([], tmp_path)
    try:
        gw.wait_ready_replicas("echo", 2, 60)  # `down` never gets ready
        problems: list[str] = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=browser_path,
                                         args=["--no-sandbox"] if os.geteuid() == 0 else [])
            # bypass_csp: the test evaluates its own probes in the page (the CSP stays on)
            page = browser.new_page(viewport={"width": 1280, "height": 1400}, bypass_csp=True)
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(f"{gw.url}/")
            page.wait_for_function("window.__steadyserve && window.__steadyserve.polls >= 1",
                                   timeout=15_000)
            with httpx.Client(base_url=gw.url, timeout=10) as c:
                for i in range(100):
                    r = c.post("/v1/deployments/echo/echo", json={"text": f"t{i}"})
                    assert r.status_code == 200
                for i in range(10):  # the batched handler
                    r = c.post("/v1/deployments/echo/upper", json={"texts": [f"b{i}"] * 3})
                    assert r.status_code == 200
                for i in range(3):  # asynchronous jobs: three that run, one past its deadline
                    r = c.post("/v1/jobs/echo/echo", json={"text": f"job{i}"})
                    assert r.status_code == 202, r.text
                r = c.post("/v1/jobs/echo/echo", json={"text": "late"},
                           headers={"x-job-timeout-s": "0.001"})
                assert r.status_code == 202, r.text
            page.wait_for_function(
                "(window.__steadyserve.series.echo || {rps: []}).rps.some(v => v > 0)",
                timeout=15_000)
            with httpx.Client(base_url=gw.url, timeout=10) as c:  # a few points of a line
                for i in range(200):
                    assert c.post("/v1/deployments/echo/echo", json={"text": f"u{i}"}
                                  ).status_code == 200
                    time.sleep(0.02)
            page.wait_for_function("window.__steadyserve.series.echo.t.length >= 3",
                                   timeout=15_000)
            page.wait_for_selector("#alerts tbody tr.firing", timeout=30_000)
            assert "DeploymentNotReady" in page.inner_text("#alerts")
            assert page.locator("#d-echo canvas").count() >= 2
            assert "2/2 ready" in page.inner_text("#d-echo .facts")
            assert "echo-0" in page.inner_text("#d-echo .replicas")
            assert "actual 2 / target 2: 2 ready, 0 starting" in page.inner_text(
                "#d-echo .counts")
            assert page.locator("#d-echo .replicas td.outstanding").count() == 2
            # the jobs section: counts by state read from the queue, and the expired one
            page.wait_for_function("(document.querySelector('#jobs tr[data-deployment=echo] "
                                   "td.succeeded') || {}).textContent === '3'", timeout=15_000)
            assert page.inner_text("#jobs tr[data-deployment=echo] td.expired") == "1"
            assert page.inner_text("#jobs tr[data-deployment=echo] td.oldest") == "-"
            assert "deadline_exceeded" in page.inner_text("#job-failures")
            assert page.inner_text("#job-retrying tbody") == "none"
            assert "L1 (" in page.inner_text("#cache-facts")  # the cache and its curve
            assert "lookups since start by level" in page.inner_text("#cache-facts")
            assert page.locator("#cache-curve canvas").count() == 1
            assert "Rollout: none yet" in page.inner_text("#d-echo .controls")

            # batch sizes: read from the replicas every 5 s; 10 batches of 3 items
            page.wait_for_function("(document.querySelector('#d-echo .batches td.mean') || "
                                   "{}).textContent === '3.00'", timeout=15_000)
            assert "upper" in page.inner_text("#d-echo .batches")
            # `down` never starts: its replica exited while starting, and says why (the last
            # error in its log file)
            page.wait_for_function("/exited|killed/.test((document.querySelector("
                                   "'#d-down .replicas td.exit') || {}).textContent || '')",
                                   timeout=15_000)
            exit_text = page.inner_text("#d-down .replicas td.exit")
            assert "while starting" in exit_text, exit_text
            assert "this service cannot start (on purpose)" in exit_text, exit_text

            # a restart needs confirming: dismissed, nothing rolls out
            page.once("dialog", lambda dialog: dialog.dismiss())
            page.click("#d-echo button.restart")
            with httpx.Client(base_url=gw.url, timeout=10, headers=gw.admin_headers()) as c:
                assert c.get("/v1/admin/deployments/echo/rollout").json()["revision"] == 0

            # silencing needs the admin key: the page asks for it, then silences
            alert_row = page.locator("#alerts tbody tr.firing",
                                     has_text="DeploymentNotReady").first
            alert_row.locator("button[data-action=silence]").click()
            page.wait_for_selector("#keyform:not([hidden])", timeout=5_000)
            assert page.inner_text("#keymsg") == "an admin key is needed for this action"
            admin_key = gw.admin_headers()["authorization"].removeprefix("Bearer ")
            page.fill("#key", admin_key)
            page.click("#keyform button")
            alert_row.locator("button[data-action=silence]").click()
            page.wait_for_function("/^silenced /.test(document.getElementById('action-status')"
                                   ".textContent)", timeout=10_000)
            with httpx.Client(base_url=gw.url, timeout=10, headers=gw.admin_headers()) as c:
                book = c.get("/v1/alerts").json()
            [alert] = [a for a in book["alerts"] if a["rule"] == "DeploymentNotReady"
                       and a["labels"].get("deployment") == "down"]
            assert any(s["matchers"] == alert["labels"] and s["created_by"] == "dashboard"
                       and 3500 <= s["ends_at"] - s["starts_at"] <= 3700
                       for s in book["silences"]), book["silences"]
            page.wait_for_function("[...document.querySelectorAll('#alerts tbody tr')].some("
                                   "r => r.textContent.includes('DeploymentNotReady') && "
                                   "r.textContent.includes('silenced'))", timeout=10_000)

            # restart `down` (confirmed): a rollout that cannot finish, cancelled from the page
            page.once("dialog", lambda dialog: dialog.accept())
            page.click("#d-down button.restart")
            page.wait_for_selector("#d-down button.cancel:not([hidden])", timeout=10_000)
            assert "Rollout: revision 1 rolling" in page.inner_text("#d-down .controls")
            page.click("#d-down button.cancel")
            page.wait_for_function("(document.querySelector('#d-down .rollout') || {})"
                                   ".textContent.includes('revision 1 cancelled')",
                                   timeout=10_000)
            assert "cancelled by request" in page.inner_text("#d-down .controls")
            with httpx.Client(base_url=gw.url, timeout=10, headers=gw.admin_headers()) as c:
                rollout = c.get("/v1/admin/deployments/down/rollout").json()
            assert (rollout["revision"], rollout["state"]) == (1, "cancelled")
            # another history window: the gateway's history of it, and the live points kept
            page.click("#range button[data-range='1440']")
            page.wait_for_function("window.__steadyserve.range === 1440 && document."
                                   "querySelector('#range button[data-range=\"1440\"]')"
                                   ".getAttribute('aria-pressed') === 'true'", timeout=5_000)
            page.click("#range button[data-range='180']")
            page.wait_for_function("window.__steadyserve.ranges === 2 && "
                                   "window.__steadyserve.series.echo.rps.some(v => v > 0)",
                                   timeout=5_000)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000

            # once a user key exists, the data needs one: the page asks for it
            made = httpx.post(f"{gw.url}/v1/admin/keys", headers=gw.admin_headers(), timeout=10,
                              json={"name": "ops", "scopes": ["infer"]})
            assert made.status_code == 201, made.text
            ops = {"authorization": f"Bearer {made.json()['key']}"}
            deadline = time.monotonic() + 10
            while True:  # a request with it, once the data plane knows it (key_refresh_s)
                sent = httpx.post(f"{gw.url}/v1/deployments/echo/echo", headers=ops,
                                  json={"text": "with a key"}, timeout=10)
                if sent.status_code == 200:
                    break
                assert sent.status_code == 401 and time.monotonic() < deadline, sent.text
                time.sleep(0.1)
            fresh = browser.new_page(bypass_csp=True)
            deadline = time.monotonic() + 10
            while True:
                fresh.goto(f"{gw.url}/")
                try:
                    fresh.wait_for_selector("#keyform:not([hidden])", timeout=2_000)
                    break
                except Exception:  # the key reaches the data plane within key_refresh_s
                    assert time.monotonic() < deadline
            fresh.fill("#key", made.json()["key"])
            fresh.click("#keyform button")
            fresh.wait_for_function("window.__steadyserve.polls >= 1", timeout=15_000)
            # per-key usage today, once keys exist. The gateway reads it at most every
            # USAGE_REFRESH_S (10 s): the first page, polling with the admin key, may have had
            # it read after the key was made and before the request with it was sent.
            fresh.wait_for_selector("#keys-section:not([hidden])", timeout=10_000)
            fresh.wait_for_function(f"document.querySelector('#keys tbody').textContent"
                                    f".includes('ss_{made.json()['id']}_')", timeout=25_000)
            row = fresh.inner_text("#keys tbody")
            assert f"ss_{made.json()['id']}_" in row and "ops" in row and "echo" in row, row
            browser.close()
        # the key form's 401 is the browser's own console line for a failed fetch
        assert [p for p in problems if "401" not in p] == [], problems
    finally:
        assert gw.stop() == []
