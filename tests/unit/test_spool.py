"""store/spool.py: the durable local spool for records accepted while the database is down."""

from __future__ import annotations

import logging
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from steadyserve.store.spool import Spool, SpoolFull

LOGGER = "steadyserve.spool"


def ids(spool: Spool, limit: int = 1_000_000) -> list[Any]:
    return [record["id"] for _, record in spool.pending(limit)]


def positions(spool: Spool, limit: int = 1_000_000) -> list[int]:
    return [position for position, _ in spool.pending(limit)]


def fill(spool: Spool, start: int, stop: int) -> None:
    for i in range(start, stop):
        spool.append({"id": i, "pad": "x" * 20})


def spool_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.ERROR]


def test_append_pending_ack_order_count_size(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", max_bytes=10_000)
    assert (spool.count, spool.size_bytes, spool.pending(10)) == (0, 0, [])
    fill(spool, 0, 5)  # ids 0-4 and positions 1-5: five frames of the same length
    assert spool.count == 5
    frame = spool.size_bytes // 5
    assert spool.size_bytes == 5 * frame > 0
    got = spool.pending(10)
    assert [r for _, r in got] == [{"id": i, "pad": "x" * 20} for i in range(5)]
    pos = [p for p, _ in got]
    assert pos == sorted(set(pos))
    assert ids(spool, 2) == [0, 1]
    assert spool.pending(0) == []
    assert ids(spool) == [0, 1, 2, 3, 4]  # pending is a peek

    spool.ack(pos[1])
    assert (ids(spool), spool.count, spool.size_bytes) == ([2, 3, 4], 3, 3 * frame)
    spool.ack(pos[0])  # already acknowledged: no-op
    assert ids(spool) == [2, 3, 4]
    with pytest.raises(ValueError, match="never appended"):
        spool.ack(pos[-1] + 1)
    spool.ack(pos[4])
    assert (ids(spool), spool.count, spool.size_bytes) == ([], 0, 0)
    spool.close()
    spool.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        spool.append({"id": 9})


def test_directory_is_private(tmp_path: Path) -> None:
    Spool(tmp_path / "a" / "b", max_bytes=100).close()
    assert (tmp_path / "a" / "b").stat().st_mode & 0o777 == 0o700


def test_reopen_returns_only_unacknowledged(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000)
    fill(spool, 0, 5)
    before = spool.pending(10)
    spool.ack(before[1][0])
    spool.close()

    spool = Spool(tmp_path, max_bytes=10_000)
    assert spool.pending(10) == before[2:]  # same records, same positions
    assert spool.count == 3
    fill(spool, 5, 6)
    assert ids(spool) == [2, 3, 4, 5]
    assert positions(spool)[-1] > before[-1][0]
    spool.ack(positions(spool)[-1])
    assert (tmp_path / "data").stat().st_size == 0  # all acknowledged: compacted to nothing
    last = before[-1][0] + 1
    spool.close()

    spool = Spool(tmp_path, max_bytes=10_000)
    assert (ids(spool), spool.count, spool.size_bytes) == ([], 0, 0)
    fill(spool, 6, 7)
    assert spool.pending(10)[0][0] > last  # positions are never reused
    spool.close()


def test_spool_full_at_the_bound_and_room_after_ack(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=500)
    n = 0
    with pytest.raises(SpoolFull):
        while True:
            fill(spool, n, n + 1)
            n += 1
    assert 0 < spool.size_bytes <= 500 < spool.size_bytes + spool.size_bytes // n
    assert ids(spool) == list(range(n))  # the refused record left nothing behind
    with pytest.raises(SpoolFull):
        spool.append({"id": "big", "pad": "x" * 1000})

    spool.ack(positions(spool)[-1])
    assert (spool.size_bytes, (tmp_path / "data").stat().st_size) == (0, 0)
    fill(spool, n, n + 3)
    assert ids(spool) == [n, n + 1, n + 2]
    spool.close()
    spool = Spool(tmp_path, max_bytes=500)
    assert ids(spool) == [n, n + 1, n + 2]
    spool.close()


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(b'0badf00d 4 {"id":', id="half-frame"),
        pytest.param(b'0badf00d 4 {"id":3,"pad":"x"}\n', id="whole-line-bad-crc"),
        pytest.param(b"\0" * 4096, id="zero-filled-block"),
    ],
)
def test_torn_last_line_is_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture, tail: bytes) -> None:
    spool = Spool(tmp_path, max_bytes=10_000)
    fill(spool, 0, 3)
    spool.close()
    data = tmp_path / "data"
    good_size = data.stat().st_size
    with data.open("ab") as f:
        f.write(tail)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        spool = Spool(tmp_path, max_bytes=10_000)
    assert any("torn" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert spool_errors(caplog) == []
    assert data.stat().st_size == good_size  # cut back to the last good frame
    assert ids(spool) == [0, 1, 2]
    fill(spool, 3, 4)
    spool.close()

    caplog.clear()
    spool = Spool(tmp_path, max_bytes=10_000)
    assert ids(spool) == [0, 1, 2, 3]
    assert [r for r in caplog.records if r.name == LOGGER] == []
    spool.close()


def test_corrupt_line_in_the_middle_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(tmp_path, max_bytes=10_000)
    fill(spool, 0, 5)
    spool.close()
    data = tmp_path / "data"
    raw = data.read_bytes()
    assert raw.count(b'"id":2,') == 1
    data.write_bytes(raw.replace(b'"id":2,', b'"id":7,'))  # same length, CRC no longer matches

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        spool = Spool(tmp_path, max_bytes=10_000)
    assert len(spool_errors(caplog)) == 1
    assert ids(spool) == [0, 1, 3, 4]
    assert spool.count == 4
    fill(spool, 5, 6)
    assert ids(spool) == [0, 1, 3, 4, 5]
    spool.ack(positions(spool)[1])
    assert ids(spool) == [3, 4, 5]
    spool.close()
    spool = Spool(tmp_path, max_bytes=10_000)
    assert ids(spool) == [3, 4, 5]
    spool.close()


def test_compaction_midway_keeps_the_rest_in_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=3_000)
    data = tmp_path / "data"
    ends = []  # byte offset of the end of each record's frame
    for i in range(40):
        fill(spool, i, i + 1)
        ends.append(data.stat().st_size)
    assert spool.size_bytes == ends[-1] < 3_000
    before = spool.pending(100)
    cut = next(k for k in range(1, 40) if ends[k - 1] > 1_500)  # the first prefix over half the bound

    spool.ack(before[cut - 2][0])  # a prefix under half the bound: left in place
    assert data.stat().st_size == ends[-1]
    spool.ack(before[cut - 1][0])  # over half: the prefix is gone
    assert data.stat().st_size == spool.size_bytes == ends[-1] - ends[cut - 1]
    assert spool.pending(100) == before[cut:]  # same records, same positions after the move
    fill(spool, 40, 50)
    spool.ack(before[cut][0])  # a position handed out before compaction still works
    assert ids(spool) == list(range(cut + 1, 50))
    spool.close()

    spool = Spool(tmp_path, max_bytes=3_000)
    assert ids(spool) == list(range(cut + 1, 50))
    assert spool.pending(100)[: 40 - cut - 1] == before[cut + 1 :]
    spool.close()


def test_crash_orders_around_compaction(tmp_path: Path) -> None:
    """Simulate a crash at each step of both compactions by putting an older file back."""
    data = tmp_path / "data"
    spool = Spool(tmp_path, max_bytes=2_500)
    fill(spool, 0, 40)
    old = data.read_bytes()
    pos = positions(spool)
    spool.ack(pos[29])  # cursor persisted, then the prefix (over half the bound) compacted away
    assert data.stat().st_size == spool.size_bytes < len(old)
    spool.close()

    # crash after the cursor was written but before os.replace landed: the old file is back,
    # and half-written temp files lie next to it
    data.write_bytes(old)
    (tmp_path / "data.tmp").write_bytes(old[:77])
    (tmp_path / "cursor.tmp").write_bytes(b"12")
    spool = Spool(tmp_path, max_bytes=2_500)
    assert ids(spool) == list(range(30, 40))
    assert not (tmp_path / "data.tmp").exists()
    assert not (tmp_path / "cursor.tmp").exists()
    spool.ack(pos[-1])
    assert data.stat().st_size == 0
    spool.close()

    # crash after the last ack's cursor was written but before the truncation
    data.write_bytes(old)
    spool = Spool(tmp_path, max_bytes=2_500)
    assert (ids(spool), spool.count, spool.size_bytes) == ([], 0, 0)
    fill(spool, 40, 41)
    assert positions(spool) == [pos[-1] + 1]
    spool.close()
    spool = Spool(tmp_path, max_bytes=2_500)
    assert ids(spool) == [40]
    spool.close()


def test_concurrent_appends(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1_000_000)
    per_thread = 100
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(per_thread):
                spool.append({"id": f"{t}-{i}", "t": t, "i": i})
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []

    def check(spool: Spool) -> None:
        got = spool.pending(10_000)
        assert spool.count == len(got) == 4 * per_thread
        assert sorted(r["id"] for _, r in got) == sorted(
            f"{t}-{i}" for t in range(4) for i in range(per_thread)
        )
        pos = [p for p, _ in got]
        assert pos == sorted(set(pos))
        for t in range(4):  # each thread's records in the order it appended them
            assert [r["i"] for _, r in got if r["t"] == t] == list(range(per_thread))

    check(spool)
    spool.close()
    spool = Spool(tmp_path, max_bytes=1_000_000)
    check(spool)
    spool.close()


CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from steadyserve.store.spool import Spool

    spool = Spool(Path(sys.argv[1]), max_bytes=4000)
    i = int(sys.argv[2])
    while True:
        spool.append({"id": i, "pad": "x" * 16})
        print(f"a {i}", flush=True)
        if i % 20 == 19:  # ack a prefix (compaction) and, every 100, everything (truncation)
            target = i if i % 100 == 99 else i - 10
            upto = [p for p, r in spool.pending(10_000) if r["id"] <= target]
            if upto:
                spool.ack(upto[-1])
            print(f"k {i} {target}", flush=True)
        i += 1
    """
)


def target_of(trigger: int) -> int:
    return trigger if trigger % 100 == 99 else trigger - 10


def test_sigkill_at_random_moments_loses_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Each round: a child appends and acks until SIGKILLed at a random moment; reopening must
    yield exactly a gapless run of ids holding every append the child reported.

    The rounds share the directory, so each recovery starts from what the previous kill left.
    """
    rng = random.Random()
    lo = hi = 0  # the spool holds ids [lo, hi)
    deadline = time.monotonic() + 7.0
    for round_ in range(6):
        if time.monotonic() > deadline:
            break
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path), str(hi)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert child.stdout is not None and child.stderr is not None
        first = child.stdout.readline()
        assert first.startswith(b"a "), child.stderr.read().decode()
        delay = rng.uniform(0.0, 0.15)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate(timeout=10)
        assert child.returncode == -signal.SIGKILL
        lines = (first + out).split(b"\n")[:-1]  # a last line without its newline was never printed
        appended = [int(line.split()[1]) for line in lines if line.startswith(b"a ")]
        acks = [tuple(map(int, line.split()[1:])) for line in lines if line.startswith(b"k ")]

        start = hi
        last_a = appended[-1]
        # what the spool must start at: after the last reported ack, or, if the next ack was
        # under way (it starts once "a <trigger>" is printed), possibly after that one's target
        base = max(lo, acks[-1][1] + 1) if acks else lo
        next_trigger = acks[-1][0] + 20 if acks else start + (19 - start % 20) % 20
        allowed_lo = {base}
        if last_a >= next_trigger:
            allowed_lo.add(max(base, target_of(next_trigger) + 1))

        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            spool = Spool(tmp_path, max_bytes=4000)
        got = ids(spool)
        context = f"round {round_}: delay {delay:.3f}s, start {start}, last a {last_a}, acks {acks[-1:]}"
        assert spool_errors(caplog) == [], context
        assert spool.count == len(got), context
        spool.close()
        # an append can only be acked after it was reported, so an empty spool means all reported
        # ones were acked and the one under way (if any) did not land
        lo, hi = (got[0], got[-1] + 1) if got else (last_a + 1, last_a + 1)
        assert got == list(range(lo, hi)), context  # in order, no gaps, no duplicates
        assert lo in allowed_lo, f"{context}: starts at {lo}, expected one of {allowed_lo}"
        assert hi in (last_a + 1, last_a + 2), f"{context}: ends at {hi}"  # every reported append
