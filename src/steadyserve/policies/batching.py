"""When to run a batch: run at once when idle, gather while busy, cap by size and by wait.

The batcher shell asks `decide` after every enqueue and every completed batch, and obeys.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RunNow:
    size: int


@dataclass(frozen=True, slots=True)
class WaitUntil:
    deadline: float


@dataclass(frozen=True, slots=True)
class Idle:
    """Nothing to do: the queue is empty, or a batch is computing and the next one gathers."""


Decision = RunNow | WaitUntil | Idle


def decide(
    *,
    queued: int,
    oldest_enqueued_at: float | None,
    busy: bool,
    now: float,
    max_batch_size: int,
    max_wait_s: float,
) -> Decision:
    """Pure batching decision.

    - busy: never start a second batch; requests gather for the next one.
    - a full batch runs at once.
    - otherwise the oldest request waits at most `max_wait_s` for others to join
      (`max_wait_s=0`, the default, means: run whatever is queued the moment we are idle).
    """
    if queued <= 0 or busy:
        return Idle()
    if queued >= max_batch_size:
        return RunNow(max_batch_size)
    assert oldest_enqueued_at is not None
    deadline = oldest_enqueued_at + max_wait_s
    if now >= deadline:
        return RunNow(queued)
    return WaitUntil(deadline)
