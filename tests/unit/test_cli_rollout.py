"""cli/admin.py `steadyserve rollout`: what it sends, how it follows the rollout, exit codes.

The gateway is a script of answers (`_call` replaced); sleeping is a no-op."""

from __future__ import annotations

from typing import Any

import pytest

from steadyserve.cli import admin, exit_codes
from steadyserve.cli.main import build_parser

URL = "http://127.0.0.1:8000"
PATH = f"{URL}/v1/admin/deployments/echo/rollout"


def status(state: str, ready: int, *, old: int = 0, draining: int = 0, revision: int = 1,
           target: int = 1, converged: bool = False, reason: str | None = None) -> dict[str, Any]:
    return {"deployment": "echo", "revision": revision, "state": state, "reason": reason,
            "target": {"revision": target}, "good_revision": 0,
            "progress": {"desired": 2, "updated": ready, "ready": ready, "old": old,
                         "draining": draining, "converged": converged}}


class Gateway:
    def __init__(self, answers: list[tuple[int, Any]]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, str, Any]] = []

    def __call__(self, method: str, url: str, body: Any, timeout_s: float) -> tuple[int, Any]:
        self.calls.append((method, url, body))
        return self.answers.pop(0)


def run(monkeypatch: pytest.MonkeyPatch, argv: list[str], answers: list[tuple[int, Any]]
        ) -> tuple[int, Gateway]:
    gateway = Gateway(answers)
    monkeypatch.setattr(admin, "call_json", gateway)
    monkeypatch.setattr(admin.time, "sleep", lambda s: None)
    args = build_parser().parse_args(["rollout", "echo", "--url", URL, *argv])
    return admin.rollout(args), gateway


def test_it_posts_the_changes_then_prints_one_line_per_change_until_done(monkeypatch, capsys):
    code, gw = run(monkeypatch, ["--env", "A=1", "--replicas", "2", "--balancer", "round_robin"], [
        (202, status("rolling", 0, old=2)),
        (200, status("rolling", 1, old=1)),
        (200, status("rolling", 1, old=1)),  # no change: no line
        (200, status("rolling", 2, draining=1)),
        (200, status("done", 2, converged=True)),
    ])
    assert code == exit_codes.OK
    assert gw.calls[0] == ("POST", PATH, {"env": {"A": "1"}, "replicas": 2,
                                          "balancer": "round_robin"})
    assert [c[0] for c in gw.calls[1:]] == ["GET"] * 4
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "revision 1 of echo is rolling out",
        "revision 1 rolling: target revision 1, 0/2 ready, 0 starting, 2 old, 0 draining",
        "revision 1 rolling: target revision 1, 1/2 ready, 0 starting, 1 old, 0 draining",
        "revision 1 rolling: target revision 1, 2/2 ready, 0 starting, 0 old, 1 draining",
        "revision 1 done: target revision 1, 2/2 ready, 0 starting, 0 old, 0 draining",
        "revision 1 of echo is serving (2 replicas)",
    ]


def test_a_failed_rollout_is_followed_back_to_the_good_revision_and_exits_1(monkeypatch, capsys):
    code, _ = run(monkeypatch, [], [
        (202, status("rolling", 0, old=2)),
        (200, status("failed", 1, target=0, old=1, reason="new replica echo-r1-1 not ready")),
        (200, status("failed", 2, target=0, converged=True, reason="new replica echo-r1-1 not ready")),
    ])
    assert code == exit_codes.FAILURE
    err = capsys.readouterr().err
    assert "rollout of revision 1 failed: new replica echo-r1-1 not ready; revision 0 serves again" \
        in err


def test_a_refusal_is_printed_and_exits_1(monkeypatch, capsys):
    code, gw = run(monkeypatch, ["--service", "/tmp/x.py:C"], [
        (400, {"error": {"message": "'service' must be one of the configured targets"}})])
    assert code == exit_codes.FAILURE
    assert len(gw.calls) == 1
    assert "rollout refused (400): 'service' must be one of" in capsys.readouterr().err


def test_no_wait_returns_after_the_post(monkeypatch):
    code, gw = run(monkeypatch, ["--no-wait"], [(202, status("rolling", 0, old=2))])
    assert code == exit_codes.OK
    assert [c[0] for c in gw.calls] == ["POST"]


def test_cancel_sends_delete(monkeypatch, capsys):
    code, gw = run(monkeypatch, ["--cancel", "--no-wait"], [
        (200, status("cancelled", 0, target=0, old=1))])
    assert code == exit_codes.OK
    assert gw.calls == [("DELETE", PATH, None)]
    assert "cancelled revision 1 of echo; going back to revision 0" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--cancel", "--replicas", "1"], ["--env", "NOEQUALS"]])
def test_usage_errors_send_nothing(monkeypatch, argv):
    code, gw = run(monkeypatch, argv, [])
    assert code == exit_codes.USAGE
    assert gw.calls == []


def test_another_rollout_taking_over_is_reported(monkeypatch, capsys):
    code, _ = run(monkeypatch, [], [
        (202, status("rolling", 0, old=2)),
        (200, status("rolling", 0, old=2, revision=2, target=2)),
    ])
    assert code == exit_codes.FAILURE
    assert "revision 2 replaced revision 1" in capsys.readouterr().err
