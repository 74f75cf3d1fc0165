"""Child-call credentials: a token names its deployment, a grant binds a request's key, depth
and deadline to the deployment it was sent to; forged, moved, altered and expired ones are
refused; a grant serves a bounded number of calls."""

from __future__ import annotations

import pytest

from steadyserve.auth.childcalls import (
    BadCredential,
    Grant,
    GrantUses,
    caller_of,
    check,
    issue,
    secret_from,
    token_for,
)

SECRET = secret_from("ss_000000000000_" + "a" * 64)
OTHER = secret_from("ss_111111111111_" + "b" * 64)


def test_a_token_names_its_deployment() -> None:
    for name in ("risk", "a.b-c_d", "x"):
        assert caller_of(SECRET, token_for(SECRET, name)) == name
    assert token_for(SECRET, "risk") != token_for(SECRET, "minilm")
    assert token_for(SECRET, "risk") != token_for(OTHER, "risk")


@pytest.mark.parametrize("token", [
    token_for(OTHER, "risk"),  # another gateway's
    token_for(SECRET, "risk").replace("_risk", "_minilm"),  # renamed
    token_for(SECRET, "risk")[:-1],  # cut
    "ssc_forged",
    "ssc_",
    "ssc_" + "0" * 32 + "_",
    "ssc_" + "0" * 32 + "_risk",
])
def test_a_forged_or_moved_token_is_refused(token: str) -> None:
    with pytest.raises(BadCredential, match="unknown child-call credential"):
        caller_of(SECRET, token)


def test_a_grant_carries_the_key_depth_and_deadline() -> None:
    g = issue(SECRET, "risk", "0123456789ab", 2, 1_000.5)
    assert check(SECRET, "risk", g, 999.0) == Grant("0123456789ab", 2, 1_000.5)
    assert check(SECRET, "risk", issue(SECRET, "risk", None, 0, 50.0), 10.0) == \
        Grant(None, 0, 50.0)
    assert len(g) < 80


@pytest.mark.parametrize(("grant", "deployment", "now", "message"), [
    (issue(SECRET, "risk", "k1", 1, 100.0), "minilm", 0.0, "not issued to deployment"),
    (issue(OTHER, "risk", "k1", 1, 100.0), "risk", 0.0, "not issued"),
    (issue(SECRET, "risk", "k1", 1, 100.0).replace("k1.", "k2.", 1), "risk", 0.0, "not issued"),
    (issue(SECRET, "risk", "k1", 1, 100.0).replace(".1.", ".0.", 1), "risk", 0.0, "not issued"),
    (issue(SECRET, "risk", "k1", 1, 100.0).replace(".100000.", ".999999.", 1), "risk", 0.0,
     "not issued"),
    (issue(SECRET, "risk", "k1", 1, 100.0), "risk", 100.0, "expired"),
    ("k1.1.100000", "risk", 0.0, "malformed"),
    ("k1.1.100000.abc.def", "risk", 0.0, "malformed"),
    ("x" * 500, "risk", 0.0, "malformed"),
    ("", "risk", 0.0, "malformed"),
])
def test_a_moved_altered_or_expired_grant_is_refused(grant: str, deployment: str, now: float,
                                                     message: str) -> None:
    with pytest.raises(BadCredential, match=message):
        check(SECRET, deployment, grant, now)


def test_a_grant_serves_at_most_the_limit_of_calls() -> None:
    uses = GrantUses(limit=3)
    assert [uses.take("g1", 100.0, 0.0) for _ in range(4)] == [True, True, True, False]
    assert uses.take("g2", 100.0, 0.0)  # another request's grant has its own count
    assert not uses.take("g1", 100.0, 1.0)  # refused calls are not counted, still refused


def test_the_tracked_grants_are_bounded_expired_ones_first() -> None:
    uses = GrantUses(limit=1, max_entries=3)
    for g, expires in (("old", 10.0), ("a", 100.0), ("b", 100.0)):
        assert uses.take(g, expires, 0.0)
    assert uses.take("c", 100.0, 50.0) and len(uses) == 3  # "old" expired: dropped
    assert not uses.take("a", 100.0, 50.0)  # still tracked, at its limit
    assert uses.take("d", 100.0, 50.0) and len(uses) == 3  # none expired: the oldest goes
    assert uses.take("a", 100.0, 50.0)  # forgotten, so counted again: the bound wins
