"""Access control with real processes: the local admin key file, `steadyserve keys` against
the database a running gateway reads, revocation across two gateways sharing PostgreSQL
within a second, the CLI's credential, and the refusal to serve an exposed address with no
keys."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from .conftest import ECHO, STEADYSERVE, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def cli(args: list[str], cwd: Path, env: dict[str, str] | None = None,
        timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STEADYSERVE, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout_s, env={**os.environ, **(env or {})})


def wait_for(predicate, timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_s, f"{what} not within {timeout_s}s"
        time.sleep(0.02)
    return time.monotonic() - started


def test_local_admin_key_file_keys_cli_and_revocation(serve, tmp_path: Path):
    gw = serve([ECHO])
    key_file = tmp_path / ".steadyserve" / "admin.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    url = f"{gw.url}/v1/deployments/echo/echo"
    with gw.client() as c:
        assert c.post(url, json={"text": "open"}).status_code == 200  # loopback, no keys yet
        assert c.post(f"{gw.url}/v1/cache/invalidate", json={"tags": ["a"]}).status_code == 401
        assert c.post(f"{gw.url}/v1/cache/invalidate", json={"tags": ["a"]},
                      headers=gw.admin_headers()).status_code == 200

        made = cli(["keys", "create", "web", "--scope", "infer", "--rate-limit", "50"], tmp_path)
        assert made.returncode == 0, made.stderr
        token = made.stdout.strip()
        assert token.startswith("ss_") and "shown only now" in made.stderr
        auth = {"authorization": f"Bearer {token}"}
        wait_for(lambda: c.post(url, json={"text": "x"}).status_code == 401, 1.5,
                 "inference closing once a key exists")
        assert c.post(url, json={"text": "x"}, headers=auth).status_code == 200
        assert c.post(f"{gw.url}/v1/cache/invalidate", json={"tags": ["a"]},
                      headers=auth).status_code == 403

        listing = cli(["keys", "list"], tmp_path)
        assert listing.returncode == 0 and "web" in listing.stdout and token not in listing.stdout

        revoked = cli(["keys", "revoke", "web"], tmp_path)
        assert revoked.returncode == 0, revoked.stderr
        took = wait_for(lambda: c.post(url, json={"text": "x"}, headers=auth).status_code == 401,
                        1.0, "revocation")
        print(f"revocation took effect after {took:.3f}s")
        again = cli(["keys", "revoke", "web"], tmp_path)
        assert again.returncode != 0 and "no API key" in again.stderr

    # the CLI's own calls carry the local admin key (silence is an admin route)
    silenced = cli(["silence", "--match", "alertname=LatencyAnomaly", "--for", "1h",
                    "--url", gw.url], tmp_path)
    assert silenced.returncode == 0, silenced.stderr + silenced.stdout
    # … but never send it to a non-loopback URL
    elsewhere = cli(["silence", "--match", "alertname=X", "--for", "1h",
                     "--url", "http://192.0.2.1:9"], tmp_path, timeout_s=30)
    assert elsewhere.returncode != 0


def test_revocation_reaches_another_gateway_sharing_postgresql_within_a_second(serve, tmp_path,
                                                                              pg_url):
    env = {"STEADYSERVE_DATABASE_URL": pg_url}
    a = serve([ECHO], env={**env, "STEADYSERVE_DATA_DIR": str(tmp_path / "a")})
    b = serve([ECHO], env={**env, "STEADYSERVE_DATA_DIR": str(tmp_path / "b")})
    # each data directory has its own admin key; both are recorded in the shared database
    assert (tmp_path / "a" / "admin.key").read_text() != (tmp_path / "b" / "admin.key").read_text()
    with httpx.Client(timeout=10) as c:
        made = c.post(f"{a.url}/v1/admin/keys", headers=a.admin_headers(),
                      json={"name": "shared", "scopes": ["infer"]})
        assert made.status_code == 201, made.text
        auth = {"authorization": f"Bearer {made.json()['key']}"}
        on_b = f"{b.url}/v1/deployments/echo/echo"
        wait_for(lambda: c.post(on_b, json={"text": "x"}, headers=auth).status_code == 200, 1.5,
                 "a key made on A working on B")
        assert c.delete(f"{a.url}/v1/admin/keys/shared", headers=a.admin_headers()).status_code == 200
        took = wait_for(lambda: c.post(on_b, json={"text": "x"}, headers=auth).status_code == 401,
                        1.0, "revocation on B")
        print(f"revocation on the other gateway after {took:.3f}s")
        # B's own admin key still works (it is recorded, not replaced by A's)
        assert c.get(f"{b.url}/v1/admin/keys", headers=b.admin_headers()).status_code == 200


def test_an_exposed_address_with_no_keys_refuses_to_start(tmp_path: Path):
    port = free_port()
    started = time.monotonic()
    proc = subprocess.run(
        [*STEADYSERVE, "run", ECHO, "--host", "0.0.0.0", "--port", str(port)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 3, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "refusing" in ln]
    assert len(lines) == 1 and "--allow-unauthenticated" in lines[0]
    assert time.monotonic() - started < 30
    assert not (tmp_path / ".steadyserve" / "flight").exists()  # no replica was launched
