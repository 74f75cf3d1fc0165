"""The nginx front documented in deploy/nginx/steadyserve.conf, run for real in front of two
gateways sharing PostgreSQL ([cluster]): one gateway is SIGKILLed under load through nginx,
and the clients see no error (nginx sends what the dead one held to the other)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from .conftest import HERE, Running, free_port, start, unavailable

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLE = HERE.parents[1] / "deploy" / "nginx" / "steadyserve.conf"


def gateway(tmp_path: Path, name: str, pg_url: str) -> Running:
    home = tmp_path / name
    home.mkdir()
    (home / "steadyserve.toml").write_text(f"""
data_dir = "{home / 'state'}"
database_url = "{pg_url}"
[cluster]
enabled = true
lease_ttl_s = 3
renew_interval_s = 0.5
[deployments.echo]
service = "{HERE / 'services' / 'echo.py'}:Echo"
replicas = 1
""")
    return start([], home)


def nginx_config(tmp_path: Path, port: int, upstreams: list[str]) -> Path:
    """The documented file with this test's addresses, inside a minimal main config."""
    site = EXAMPLE.read_text()
    assert "server 127.0.0.1:8001 " in site and "server 127.0.0.1:8002 " in site
    site = site.replace("127.0.0.1:8001", upstreams[0]).replace("127.0.0.1:8002", upstreams[1])
    site = site.replace("listen 127.0.0.1:8000;", f"listen 127.0.0.1:{port};")
    (tmp_path / "site.conf").write_text(site)
    temp = "\n".join(f"  {kind}_temp_path {tmp_path / kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    main = tmp_path / "nginx.conf"
    main.write_text(f"""
{"user root;" if os.geteuid() == 0 else ""}
worker_processes 1;
daemon off;
pid {tmp_path / 'nginx.pid'};
error_log {tmp_path / 'nginx-error.log'} warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
{temp}
  include {tmp_path / 'site.conf'};
}}
""")
    return main


def test_a_gateway_killed_behind_nginx_costs_no_client_request(tmp_path: Path,
                                                                pg_url: str) -> None:
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                       else None)
    if binary is None:
        unavailable("nginx (apt-get install nginx-light; .ci/run installs it)",
                    FileNotFoundError("nginx"))
    a = gateway(tmp_path, "a", pg_url)
    b = gateway(tmp_path, "b", pg_url)
    port = free_port()
    conf = nginx_config(tmp_path, port, [a.url.removeprefix("http://"),
                                         b.url.removeprefix("http://")])
    proxy: subprocess.Popen[bytes] | None = None
    try:
        a.wait_ready(60)
        b.wait_ready(60)
        check = subprocess.run([binary, "-t", "-c", str(conf), "-p", str(tmp_path)],
                               capture_output=True, timeout=30)
        assert check.returncode == 0, check.stderr.decode()
        proxy = subprocess.Popen([binary, "-c", str(conf), "-p", str(tmp_path)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        front = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        while True:
            try:
                if httpx.get(f"{front}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proxy.poll() is None, \
                (tmp_path / "nginx-error.log").read_text()
            time.sleep(0.1)

        statuses: list[int] = []
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(base_url=front, timeout=10) as c:
                while not stop.is_set():
                    try:
                        r = c.post("/v1/deployments/echo/echo", json={"text": "hi"})
                        statuses.append(r.status_code)
                    except httpx.HTTPError as exc:
                        statuses.append(-1)
                        print("client error:", exc)

        loaders = [threading.Thread(target=load, daemon=True) for _ in range(4)]
        for t in loaders:
            t.start()
        try:
            time.sleep(1.5)
            before = len(statuses)
            a.proc.send_signal(signal.SIGKILL)
            a.proc.wait(10)
            time.sleep(3.0)
            after = len(statuses) - before
        finally:
            stop.set()
            for t in loaders:
                t.join(15)
        counts = {s: statuses.count(s) for s in set(statuses)}
        print(f"through nginx: {counts}; {after} after the kill")
        assert set(statuses) == {200}, counts
        assert before > 20 and after > 20  # both gateways served, then the survivor alone
    finally:
        if proxy is not None and proxy.poll() is None:
            proxy.send_signal(signal.SIGQUIT)  # nginx's graceful stop
            try:
                proxy.wait(10)
            except subprocess.TimeoutExpired:
                proxy.kill()
                proxy.wait(5)
        if a.proc.poll() is None:
            a.stop()
        assert b.stop() == []
