"""The CLI's surface, in process: every command and subcommand's --help carries examples
that name it; a failure is one line on stderr with a non-zero exit — a --url that is no URL
(2, before anything is sent), an unexpected exception (1, named), `bench` against a gateway
it cannot reach or a deployment or handler that is not there (1, before any load)."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from steadyserve.cli import admin, bench
from steadyserve.cli.main import build_parser, main, url_problem


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
             ) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.append(((*path, name), sub))
                out += commands(sub, (*path, name))
    return out


ALL = commands(build_parser())


def test_the_walk_finds_every_command():
    names = {" ".join(p) for p, _ in ALL}
    assert {"run", "status", "top", "logs", "bench", "jobs", "keys create", "keys usage",
            "backup", "restore"} <= names


@pytest.mark.parametrize("path", [p for p, _ in ALL], ids=[" ".join(p) for p, _ in ALL])
def test_every_command_shows_examples_of_itself(path, capsys):
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([*path, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    example = out.lower().split("examples:", 1)
    assert len(example) == 2, out
    assert f"steadyserve {' '.join(path)}" in example[1], out


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("url", ["notaurl", "ftp://gw:8000", "http://", "http://gw:port",
                                 "http://gw:8000/?a=1"])
def test_a_url_that_is_no_gateway_url_is_one_line_and_a_usage_error(url, capsys):
    assert url_problem(url) is not None
    for argv in (["status"], ["logs"], ["bench", "d", "h", "--body", "{}"], ["jobs", "list"]):
        assert main([*argv, "--url", url]) == 2
        assert "is not a gateway URL" in one_line(capsys.readouterr().err)


def test_good_urls_pass_and_lose_a_trailing_slash(monkeypatch):
    assert url_problem("http://127.0.0.1:8000") is None
    assert url_problem("https://gw.internal") is None
    seen = []
    monkeypatch.setattr(admin, "status", lambda args: seen.append(args.url) or 0)
    assert main(["status", "--url", "http://gw:8000/"]) == 0 and seen == ["http://gw:8000"]


def test_an_unexpected_error_is_one_line_naming_it(monkeypatch, capsys):
    def broken(args: Any) -> int:
        raise RuntimeError("the table broke\nsecond line")

    monkeypatch.setattr(admin, "status", broken)
    assert main(["status"]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("steadyserve status: failed: RuntimeError: the table broke")
    monkeypatch.setenv("STEADYSERVE_DEBUG", "1")
    assert main(["status"]) == 1
    assert "Traceback" in capsys.readouterr().err

    def interrupted(args: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(admin, "status", interrupted)
    assert main(["status"]) == 130


@pytest.mark.parametrize(("answer", "want"), [
    (OSError("[Errno 111] Connection refused"),
     "cannot reach http://gw:1: [Errno 111] Connection refused"),
    ((404, {"error": {"code": "not_found", "message": "no deployment 'd'"}}),
     "deployment 'd' refused (404): no deployment 'd'"),
    ((200, {"name": "d", "handlers": {"embed": {}, "tokens": {}}}),
     "deployment 'd' has no handler 'h' (it has: embed, tokens)"),
])
def test_bench_checks_its_target_before_any_load(monkeypatch, capsys, answer, want):
    def call_json(method: str, url: str, *rest: Any) -> Any:
        assert (method, url) == ("GET", "http://gw:1/v1/deployments/d")
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(bench, "call_json", call_json)
    monkeypatch.setattr("steadyserve.testing.load.run_load", None)  # never reached
    assert main(["bench", "d", "h", "--body", "{}", "--url", "http://gw:1"]) == 1
    assert one_line(capsys.readouterr().err) == f"steadyserve: {want}"
