"""policies/actions.py: cool-downs, hourly caps and the minimum of serving replicas."""

from __future__ import annotations

import pytest

from steadyserve.policies.actions import ActionGuard, PastAction, deployment_wide

T0 = 10_000.0
GUARD = ActionGuard(cooldown_s=300, max_per_hour=3, min_serving=1)


@pytest.mark.parametrize(
    ("action", "target", "history", "serving", "allowed", "reason"),
    [
        ("restart_replica", "a-0", [], 2, True, "allowed"),
        ("restart_replica", "a-0", [PastAction("restart_replica", "a-0", T0 - 100)], 2, False,
         "cool-down"),
        ("restart_replica", "a-0", [PastAction("restart_replica", "a-0", T0 - 301)], 2, True,
         "allowed"),
        ("restart_replica", "a-1", [PastAction("restart_replica", "a-0", T0 - 100)], 2, True,
         "allowed"),
        ("restart_replica", "a-9", [PastAction("restart_replica", f"a-{i}", T0 - 400 - i)
                                    for i in range(3)], 5, False, "3 times in the last hour"),
        ("restart_replica", "a-9", [PastAction("restart_replica", f"a-{i}", T0 - 3700 - i)
                                    for i in range(3)], 5, True, "allowed"),
        ("restart_replica", "a-0", [], 1, False, "below the minimum"),
        ("eject_replica", "a-0", [], 1, False, "below the minimum"),
        ("shed_batch", "a", [], 1, True, "allowed"),
        ("rollback", "a", [PastAction("rollback", "a", T0 - 10)], 3, False, "cool-down"),
        ("launch_rockets", "a", [], 3, False, "unknown action"),
    ],
    ids=["first", "cool-down", "after-cool-down", "other-target", "hourly-cap",
         "cap-window-passed", "last-replica", "eject-last", "shed-needs-no-replica",
         "rollback-cool-down", "unknown"],
)
def test_guard_table(action, target, history, serving, allowed, reason):
    ok, why = GUARD.check(action, target, history, T0, serving=serving)
    assert ok is allowed
    assert reason in why


def test_dry_runs_and_real_runs_do_not_share_limits():
    dry = [PastAction("restart_replica", "a-0", T0 - 10, dry_run=True)]
    assert GUARD.check("restart_replica", "a-0", dry, T0, serving=3)[0]
    assert not GUARD.check("restart_replica", "a-0", dry, T0, serving=3, dry_run=True)[0]


@pytest.mark.parametrize(
    ("active", "replicas", "expected"),
    [
        ([("R", "d", "a"), ("R", "d", "b")], ["a", "b"], True),
        ([("R", "d", "a")], ["a", "b"], False),
        ([("R", "d", "a"), ("R", "other", "b")], ["a", "b"], False),  # another deployment's
        ([("R", "d", "a"), ("S", "d", "b")], ["a", "b"], False),  # another rule's
        ([("R", "d", "a")], ["a"], False),  # one replica: no peers to compare with
        ([("R", "d", "a"), ("R", "d", "b"), ("R", "d", "gone")], ["a", "b"], True),
    ],
)
def test_deployment_wide_means_every_replica_has_the_alert(active, replicas, expected):
    assert deployment_wide("R", "d", active, replicas) is expected
