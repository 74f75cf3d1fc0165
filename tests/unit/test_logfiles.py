"""Log files: which lines a query matches, reading them back bounded, pruning the directory,
a removed file reopened, and the CLI's follow showing each line once."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from steadyserve.cli.logs import Follow, render
from steadyserve.observe import logfiles
from steadyserve.observe.logfiles import LogFile, LogQuery, deployment_of
from steadyserve.observe.logs import REQUEST_ID, FileSink, JsonFormatter, configure_logging

GATEWAY_ACCESS = {"ts": 10.0, "level": "info", "process": "gateway", "msg": "request",
                  "deployment": "echo", "replica": "echo-1", "request_id": "r1"}
REPLICA_ERROR = {"ts": 11.0, "level": "error", "replica": "echo-r2-1", "deployment": "echo",
                 "msg": "handler work failed", "request_id": "r1"}
SUPERVISOR = {"ts": 12.0, "level": "error", "process": "gateway", "msg": "killing replica",
              "replica": "risk-0"}
PLAIN = {"ts": 13.0, "level": "warning", "process": "gateway", "msg": "no deployment named"}


@pytest.mark.parametrize(("query", "matching"), [
    (LogQuery(), [GATEWAY_ACCESS, REPLICA_ERROR, SUPERVISOR, PLAIN]),
    (LogQuery(deployment="echo"), [GATEWAY_ACCESS, REPLICA_ERROR]),
    (LogQuery(deployment="risk"), [SUPERVISOR]),  # named only through its replica id
    (LogQuery(replica="echo-r2-1"), [REPLICA_ERROR]),
    (LogQuery(level="warning"), [REPLICA_ERROR, SUPERVISOR, PLAIN]),
    (LogQuery(level="error"), [REPLICA_ERROR, SUPERVISOR]),
    (LogQuery(request_id="r1"), [GATEWAY_ACCESS, REPLICA_ERROR]),
    (LogQuery(request_id="r1", level="error"), [REPLICA_ERROR]),
    (LogQuery(since=11.0), [REPLICA_ERROR, SUPERVISOR, PLAIN]),
    (LogQuery(since=13.5), []),
])
def test_which_lines_a_query_matches(query: LogQuery, matching: list[dict[str, Any]]) -> None:
    lines = [GATEWAY_ACCESS, REPLICA_ERROR, SUPERVISOR, PLAIN]
    assert [r for r in lines if query.matches(r)] == matching


def test_a_line_with_no_usable_time_stamp_is_never_new() -> None:
    assert not LogQuery(since=0).matches({"ts": "soon", "msg": "x"})
    assert LogQuery().matches({"msg": "x"})


@pytest.mark.parametrize(("replica", "deployment"), [
    ("echo-1", "echo"), ("echo-r3-12", "echo"), ("my-model-0", "my-model"),
    ("my-model-r1-0", "my-model"), ("echo", None), ("echo-", None)])
def test_the_deployment_a_replica_id_names(replica: str, deployment: str | None) -> None:
    assert deployment_of(replica) == deployment


def write(path: Path, records: list[dict[str, Any]], extra: bytes = b"") -> None:
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in records) + extra)


def test_read_merges_the_files_by_time_and_keeps_the_newest(tmp_path: Path) -> None:
    write(tmp_path / "gateway.jsonl", [{"ts": t, "msg": f"g{t}"} for t in (1, 3, 5)])
    write(tmp_path / "echo-1.jsonl", [{"ts": t, "msg": f"r{t}"} for t in (2, 4)],
          extra=b'{"ts": 6, "msg": "cut by a cra')  # a line cut by a crash mid-write
    (tmp_path / "notes.txt").write_text("not a log file\n")
    got = logfiles.read(tmp_path, LogQuery(limit=3), scan_bytes=1 << 20)
    assert [r["msg"] for r in got] == ["g3", "r4", "g5"]


def test_with_since_a_read_pages_forward_from_the_oldest(tmp_path: Path) -> None:
    write(tmp_path / "gateway.jsonl", [{"ts": t, "msg": str(t)} for t in range(10)])
    got = logfiles.read(tmp_path, LogQuery(since=4, limit=3), scan_bytes=1 << 20)
    assert [r["msg"] for r in got] == ["4", "5", "6"]


def test_a_read_scans_at_most_its_budget_from_the_newest_end(tmp_path: Path) -> None:
    records = [{"ts": t, "msg": f"line {t:04d}"} for t in range(1000)]
    write(tmp_path / "gateway.jsonl", records)
    size = len(json.dumps(records[-1])) + 1  # every line from 100 on is this long
    got = logfiles.read(tmp_path, LogQuery(limit=5000), scan_bytes=50 * size + size // 2)
    # the budget holds 50 whole lines and half of one, which is dropped, not parsed
    assert [r["ts"] for r in got] == list(range(950, 1000))


def test_files_older_than_since_are_not_read(tmp_path: Path) -> None:
    old = tmp_path / "echo-0.jsonl"
    write(old, [{"ts": time.time() + 100, "msg": "stamped late, written long ago"}])
    os.utime(old, (1000, 1000))
    assert logfiles.read(tmp_path, LogQuery(since=2000), scan_bytes=1 << 20) == []


def test_prune_removes_the_oldest_files_but_never_a_running_process(tmp_path: Path) -> None:
    for age, name in enumerate(["gateway.jsonl", "echo-0.jsonl", "echo-0.jsonl.1",
                                "echo-1.jsonl", "echo-2.jsonl"]):
        path = tmp_path / name
        path.write_bytes(b"x" * 1000)
        os.utime(path, (1000 + age, 1000 + age))  # gateway.jsonl is the oldest
    removed = logfiles.prune(tmp_path, 2500, running=["gateway", "echo-2"])
    assert sorted(p.name for p in removed) == ["echo-0.jsonl", "echo-0.jsonl.1", "echo-1.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["echo-2.jsonl", "gateway.jsonl"]
    assert logfiles.prune(tmp_path, 2500, running=[]) == []  # under the cap: nothing to do


def test_a_removed_log_file_is_opened_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "echo-1.jsonl"
    handler = LogFile(str(path), max_bytes=1 << 20, backups=1)
    handler.setFormatter(JsonFormatter({}))
    logger = logging.getLogger("test.logfiles.reopen")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("before")
        path.unlink()  # pruned while the replica runs
        monkeypatch.setattr(logfiles, "REOPEN_CHECK_S", 0.0)
        logger.warning("after")
        handler.flush()
        assert [json.loads(line)["msg"] for line in path.read_text().splitlines()] == ["after"]
    finally:
        logger.removeHandler(handler)
        handler.close()


def test_a_file_rotates_at_its_size_keeping_its_backups(tmp_path: Path) -> None:
    path = tmp_path / "gateway.jsonl"
    handler = LogFile(str(path), max_bytes=4096, backups=2)
    handler.setFormatter(JsonFormatter({}))
    logger = logging.getLogger("test.logfiles.rotate")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for i in range(400):
            logger.warning("line %d of some length to fill the file", i)
    finally:
        logger.removeHandler(handler)
        handler.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["gateway.jsonl", "gateway.jsonl.1", "gateway.jsonl.2"]
    assert all(p.stat().st_size <= 4096 for p in tmp_path.iterdir())
    got = logfiles.read(tmp_path, LogQuery(limit=3), scan_bytes=1 << 20)
    assert [r["msg"] for r in got][-1] == "line 399 of some length to fill the file"


def test_configure_logging_writes_the_same_json_line_to_the_file(tmp_path: Path) -> None:
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    try:
        configure_logging("info", "json", file=FileSink(str(tmp_path / "logs" / "echo-1.jsonl"),
                                                        1 << 20, 1), replica="echo-1")
        token = REQUEST_ID.set("req-7")
        try:
            logging.getLogger("test.service").info("scored", extra={"rows": 3})
        finally:
            REQUEST_ID.reset(token)
        for h in root.handlers:
            h.flush()
        rec = json.loads((tmp_path / "logs" / "echo-1.jsonl").read_text())
        assert {k: rec[k] for k in ("level", "msg", "replica", "rows", "request_id")} == {
            "level": "info", "msg": "scored", "replica": "echo-1", "rows": 3,
            "request_id": "req-7"}
        assert oct((tmp_path / "logs").stat().st_mode & 0o777) == "0o700"
    finally:
        for h in root.handlers:
            h.close()
        root.handlers[:] = saved
        root.setLevel(level)


def test_follow_shows_each_line_once_and_lines_that_reach_their_file_late() -> None:
    f = Follow(lookback_s=1.0)
    a, b, c = {"ts": 10.0, "msg": "a"}, {"ts": 10.0, "msg": "b"}, {"ts": 12.0, "msg": "c"}
    old = {"ts": 9.5, "msg": "before the follow started"}
    assert f.new([a]) == [a]  # the first page: --lines 1
    assert f.since == 9.0 and f.floor == 10.0
    assert f.new([old, a, b]) == [b]  # b in the same millisecond; nothing from before
    assert f.new([a, b, c]) == [c]
    assert f.since == 11.0  # a and b are forgotten: older than the look-back
    late = {"ts": 11.8, "msg": "another process's line, flushed after c was shown"}
    assert f.new([late, c]) == [late]
    assert f.new([c, late]) == []
    assert f.new([{"msg": "no time stamp"}]) == []


def test_a_full_page_with_nothing_new_moves_the_follow_on() -> None:
    f = Follow(lookback_s=1.0)
    page = [{"ts": 100.0 + i / 1000, "msg": str(i)} for i in range(5)]
    assert f.new(page) == page
    assert f.new(page, full_page=True) == []  # a busy second: the page is all shown lines
    assert f.since == 100.004


def test_render_puts_time_level_process_and_message_first() -> None:
    text, level = render({"ts": 0.25, "level": "error", "replica": "echo-1", "msg": "boom",
                          "request_id": "r1", "exc": "Traceback ..."})
    assert level == "error"
    assert text.split(" ", 1)[1] == "ERROR   echo-1 boom request_id=r1\nTraceback ..."
    assert text.split(" ")[0].endswith(".250")


def test_last_error_is_the_newest_error_of_this_run_only(tmp_path: Path) -> None:
    path = tmp_path / "down-0.jsonl"
    write(path, [{"ts": 5, "level": "error", "msg": "an earlier run's error"},
                 {"ts": 10, "level": "info", "msg": "loading"},
                 {"ts": 11, "level": "error", "msg": "setup failed",
                  "exc": "Traceback (most recent call last):\n  ...\nOSError: no weights\n"},
                 {"ts": 12, "level": "info", "msg": "shutting down"}], extra=b'{"ts": 13, "le')
    assert logfiles.last_error(path, since=10) == "setup failed (OSError: no weights)"
    assert logfiles.last_error(path, since=11.5) is None  # this run logged no error
    assert logfiles.last_error(tmp_path / "missing.jsonl", since=0) is None
