"""policies/outlier.py `blame_reply`: whose fault an error reply is, as a table.

The error codes are the ones the replica really sends (`errors.to_wire` of each class), so a
renamed code shows up here, not as a silent change of who gets ejected.
"""

from __future__ import annotations

import pytest

from steadyserve.errors import (
    ClientError,
    DependencyUnavailable,
    HandlerFailed,
    NotFound,
    Overloaded,
    Quarantined,
    ReplicaError,
    ReplicaTimeout,
    ReplicaUnavailable,
    RetryableError,
    SteadyError,
    to_wire,
)
from steadyserve.policies.outlier import (
    BUSY,
    CLIENT_ERROR,
    DEPENDENCY,
    GATEWAY_FAILURE,
    HANDLER_ERROR,
    MALFORMED,
    Blame,
    blame_reply,
)
from steadyserve.store import DatabaseUnavailable


class PaymentsDown(Overloaded):
    """A service's own 503 with Retry-After (a code the gateway does not know)."""

    code = "payments_unavailable"


class Custom(SteadyError):
    """A service's own 5xx without Retry-After."""

    status = 507
    code = "model_storage_full"


def chaos_503() -> ReplicaUnavailable:
    exc = ReplicaUnavailable("chaos")
    exc.status = 503  # tests/chaos: a replica that answers 503 replica_unavailable
    return exc


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (HandlerFailed("handler raised ValueError: boom"), HANDLER_ERROR),
        (Custom("disk full"), HANDLER_ERROR),
        (SteadyError("a bare SteadyError from service code"), HANDLER_ERROR),
        (DependencyUnavailable("feature store down", retry_after_s=5), DEPENDENCY),
        (DatabaseUnavailable("database down", retry_after_s=2), DEPENDENCY),
        (PaymentsDown("payments down", retry_after_s=30), DEPENDENCY),
        (Overloaded("replica batch queue is full", retry_after_s=1), BUSY),
        (RetryableError("CUDA out of memory here"), GATEWAY_FAILURE),
        (ReplicaUnavailable("replica is not ready"), GATEWAY_FAILURE),
        (chaos_503(), GATEWAY_FAILURE),
        (ReplicaError("replica failed"), GATEWAY_FAILURE),
        (ReplicaTimeout("handler took longer than 1.000s"), GATEWAY_FAILURE),
        (ClientError("x must be >= 0"), CLIENT_ERROR),
        (NotFound("no handler 'x'"), CLIENT_ERROR),
        (Quarantined("crashed replicas"), CLIENT_ERROR),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else v.outcome,
)
def test_blame_of_each_error_a_replica_sends(error: SteadyError, expected: Blame) -> None:
    wire = to_wire(error)
    assert blame_reply(wire["status"], wire["code"], "retry_after_s" in wire) == expected


@pytest.mark.parametrize(
    ("status", "code", "retry_after", "expected"),
    [
        (500, None, False, MALFORMED),  # no code: not our replica's answer
        (502, None, False, MALFORMED),
        (404, None, False, MALFORMED),
        (200, "handler_failed", False, MALFORMED),  # an error sent as a success
        (503, "overloaded", False, BUSY),  # the code decides, with or without Retry-After
        (503, "retryable", True, GATEWAY_FAILURE),  # a replica failure even with Retry-After
        (429, "rate_limited", True, CLIENT_ERROR),  # a child call's 429 stays a 4xx
    ],
)
def test_blame_edge_cases(status: int, code: str | None, retry_after: bool, expected: Blame) -> None:
    assert blame_reply(status, code, retry_after) == expected


def test_only_gateway_failures_count_and_carry_the_5xx_outcome() -> None:
    """The ReplicaErrors alert (which restarts a replica) reads outcome="5xx": it must mean
    the replica failed, and whatever is counted must be retryable elsewhere."""
    every = [HANDLER_ERROR, DEPENDENCY, BUSY, GATEWAY_FAILURE, CLIENT_ERROR, MALFORMED]
    assert [b.outcome for b in every if b.replica_failed] == ["5xx", "malformed"]
    assert all(b.retry for b in every if b.replica_failed)
    assert [b.outcome for b in every if b.retry and not b.replica_failed] == ["overloaded"]
