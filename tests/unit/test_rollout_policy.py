"""policies/rollout.py: what a rollout may change, and the next step toward a target.

Slots are written as short strings: "<revision>:<state>[:<restarts>][:<created_at>]", e.g.
"0:ready" (an old ready replica), "1:starting:0:90" (a new one created at t=90), plus a
trailing "~" for a slot already retired and draining. Replica ids are "s<index>".
"""

from __future__ import annotations

import pytest

from steadyserve.config import AutoscaleConfig, DeploymentConfig
from steadyserve.errors import ClientError
from steadyserve.policies.rollout import (
    Plan,
    RolloutPolicy,
    SlotView,
    Target,
    apply_changes,
    changes_schema,
    progress,
)

NOW = 100.0
POLICY = RolloutPolicy(max_restarts=2, ready_timeout_s=30.0)


def slots(*specs: str) -> list[SlotView]:
    out = []
    for i, spec in enumerate(specs):
        draining = spec.endswith("~")
        parts = spec.rstrip("~").split(":")
        revision, state = int(parts[0]), parts[1]
        restarts = int(parts[2]) if len(parts) > 2 else 0
        created = float(parts[3]) if len(parts) > 3 else NOW - 1
        out.append(SlotView(f"s{i}", revision, state, restarts, created,
                            was_ready=state == "ready", draining=draining))
    return out


def plan(start: int = 0, retire: tuple[str, ...] = ()) -> Plan:
    return Plan(start=start, retire=retire)


@pytest.mark.parametrize(
    ("target", "current", "expected"),
    [
        # normal progress, 2 → 2 replicas, revision 0 → 1
        pytest.param(Target(1, 2, True), ("0:ready", "0:ready"), plan(start=1), id="first-new"),
        pytest.param(Target(1, 2, True), ("0:ready", "0:ready", "1:starting"), plan(),
                     id="wait-for-the-new-one"),
        pytest.param(Target(1, 2, True), ("0:ready", "0:ready", "1:ready"),
                     plan(retire=("s0",), start=1), id="retire-an-old-one-per-new-ready"),
        pytest.param(Target(1, 2, True), ("0:ready", "1:ready", "0:stopping~"), plan(start=1),
                     id="next-new-while-the-old-drains"),
        pytest.param(Target(1, 2, True), ("0:ready", "1:ready", "1:ready"), plan(retire=("s0",)),
                     id="last-old-retired"),
        pytest.param(Target(1, 2, True), ("1:ready", "1:ready", "0:stopping~"), plan(),
                     id="not-done-while-draining"),
        pytest.param(Target(1, 2, True), ("1:ready", "1:ready"), Plan(outcome="done"), id="done"),
        pytest.param(Target(1, 2, False), ("1:ready", "1:ready"), plan(), id="done-stays-quiet"),
        # an old replica that is down serves nothing: replaced at once
        pytest.param(Target(1, 2, True), ("0:ready", "0:backoff"), plan(retire=("s1",), start=1),
                     id="old-down-retired-first"),
        pytest.param(Target(1, 2, True), ("0:ready", "0:unhealthy", "1:ready"),
                     plan(retire=("s1",), start=1), id="old-unhealthy-retired-first"),
        # a gateway restarted mid-rollout: the good replicas are still starting; keep them
        pytest.param(Target(1, 2, True), ("0:starting", "0:starting"), plan(start=1),
                     id="old-starting-kept"),
        pytest.param(Target(1, 2, True), ("0:starting", "0:ready", "1:ready"),
                     plan(retire=("s0",), start=1), id="old-starting-retired-before-ready"),
        # scale up 2 → 4: one new at a time, no old retired until the count allows it
        pytest.param(Target(1, 4, True), ("0:ready", "0:ready", "1:ready"), plan(start=1),
                     id="scale-up-keeps-old-while-short"),
        pytest.param(Target(1, 4, True), ("0:ready", "0:ready", "1:ready", "1:ready"),
                     plan(start=1), id="scale-up-surge-one"),
        pytest.param(Target(1, 4, True), ("0:ready", "0:ready", "1:ready", "1:ready", "1:ready"),
                     plan(retire=("s0",), start=1), id="scale-up-retire-when-over"),
        # scale down 3 → 1: what is over the target goes at once, the last old once replaced
        pytest.param(Target(1, 1, True), ("0:ready", "0:ready", "0:ready"),
                     plan(retire=("s0", "s1"), start=1), id="scale-down"),
        pytest.param(Target(1, 1, True), ("0:ready", "1:ready"), plan(retire=("s0",)),
                     id="scale-down-last-old"),
        # replicas 0: everything goes, done once drained
        pytest.param(Target(1, 0, True), ("0:ready", "0:ready"), plan(retire=("s0", "s1")),
                     id="zero-retires-all"),
        pytest.param(Target(1, 0, True), ("0:stopping~",), plan(), id="zero-waits-for-drain"),
        pytest.param(Target(1, 0, True), (), Plan(outcome="done"), id="zero-done"),
        pytest.param(Target(1, 1, True), (), plan(start=1), id="from-zero"),
        # failures while rolling
        pytest.param(Target(1, 2, True), ("0:ready", "0:ready", "1:backoff:2"),
                     Plan(outcome="failed", reason="new replica s2 restarted 2 times"),
                     id="crash-loop-at-step-0"),
        pytest.param(Target(1, 2, True), ("0:ready", "1:ready", "1:starting:0:70"),
                     Plan(outcome="failed", reason="new replica s2 not ready after 30s"),
                     id="never-ready-at-step-1"),
        pytest.param(Target(1, 2, True), ("0:ready", "1:ready", "1:starting:0:71"), plan(),
                     id="not-yet-timed-out"),
        pytest.param(Target(1, 2, True), ("1:ready", "1:unhealthy:2"),
                     Plan(outcome="failed", reason="new replica s1 restarted 2 times"),
                     id="crash-loop-after-ready"),
        # after a failure or cancel the target is the good revision again: no failing twice,
        # and the same rows converge on it
        pytest.param(Target(0, 2, False), ("0:ready", "0:ready", "1:backoff:2"),
                     plan(retire=("s2",)), id="cancel-at-step-0"),
        pytest.param(Target(0, 2, False), ("0:ready", "1:ready", "1:starting:0:70"),
                     plan(retire=("s2",), start=1), id="failed-at-step-1-restarts-good"),
        pytest.param(Target(0, 2, False), ("0:ready", "1:ready", "0:starting"), plan(),
                     id="failed-at-step-1-keeps-bad-ready-until-replaced"),
        pytest.param(Target(0, 2, False), ("0:ready", "1:ready", "0:ready"), plan(retire=("s1",)),
                     id="failed-at-step-1-converged"),
        pytest.param(Target(0, 2, False), ("0:ready", "0:ready"), plan(), id="back-to-good"),
        pytest.param(Target(0, 2, False), ("0:ready", "0:backoff:5"), plan(),
                     id="good-crash-loop-is-the-supervisors-business"),
        # never more target slots than asked for
        pytest.param(Target(1, 1, True), ("1:ready", "1:starting"), plan(retire=("s1",)),
                     id="extra-new-not-ready-first"),
    ],
)
def test_decide(target: Target, current: tuple[str, ...], expected: Plan) -> None:
    assert POLICY.decide(target, slots(*current), NOW) == expected


@pytest.mark.parametrize(("max_restarts", "restarts", "failed"),
                         [(1, 0, False), (1, 1, True), (3, 2, False), (3, 3, True)])
def test_restart_threshold_is_the_config(max_restarts: int, restarts: int, failed: bool) -> None:
    got = RolloutPolicy(max_restarts, 30.0).decide(
        Target(1, 1, True), slots("0:ready", f"1:backoff:{restarts}"), NOW)
    assert (got.outcome == "failed") is failed


def test_a_rollout_converges_step_by_step() -> None:
    """Simulate the supervisor: start → ready next tick, retire → gone next tick."""
    state = slots("0:ready", "0:ready", "0:ready")
    target = Target(1, 3, True)
    for tick in range(20):
        got = POLICY.decide(target, state, NOW + tick)
        if got.outcome == "done":
            break
        ready_new = [SlotView(s.replica_id, s.revision, "ready", 0, s.created_at, True)
                     if s.revision == 1 else s for s in state if s.replica_id not in got.retire]
        # surge 1: never more than target + 1 live slots, never fewer than target ready
        assert len(ready_new) + got.start <= 4
        assert sum(s.state == "ready" for s in state if s.replica_id not in got.retire) >= 3
        state = ready_new + [SlotView(f"n{tick}-{i}", 1, "starting", 0, NOW + tick)
                             for i in range(got.start)]
    else:
        raise AssertionError(f"no convergence: {state}")
    assert [s.revision for s in state] == [1, 1, 1]


@pytest.mark.parametrize(
    ("current", "expected"),
    [
        (("0:ready", "1:ready", "1:starting", "0:stopping~"),
         {"desired": 2, "updated": 2, "ready": 1, "old": 1, "draining": 1, "converged": False}),
        (("1:ready", "1:ready"),
         {"desired": 2, "updated": 2, "ready": 2, "old": 0, "draining": 0, "converged": True}),
    ],
)
def test_progress(current: tuple[str, ...], expected: dict[str, object]) -> None:
    assert progress(Target(1, 2, True), slots(*current)) == expected


# inputs ------------------------------------------------------------------------------------
BASE = DeploymentConfig(name="risk", service="risk.model:Scorer", replicas=2,
                        services=("risk.model:ScorerV2",), rollout_env=("MODEL_TAG", "DEBUG"),
                        env=(("DEBUG", "0"), ("DB", "x")))


@pytest.mark.parametrize(
    ("changes", "param"),
    [
        pytest.param({"replicas": True}, "replicas", id="bool"),
        pytest.param({"replicas": 1.5}, "replicas", id="float"),
        pytest.param({"replicas": 2.0}, "replicas", id="integral-float"),
        pytest.param({"replicas": "2"}, "replicas", id="string"),
        pytest.param({"replicas": -1}, "replicas", id="negative"),
        pytest.param({"replicas": 9}, "replicas", id="over-max"),
        pytest.param({"service": "/tmp/evil.py:Cls"}, "service", id="file-path"),
        pytest.param({"service": "os:system"}, "service", id="module"),
        pytest.param({"service": ["risk.model:Scorer"]}, "service", id="not-a-string"),
        pytest.param({"env": {"BROWSER": "sh -c id %s"}}, "env.BROWSER", id="env-key"),
        pytest.param({"env": {"PYTHONWARNINGS": "ignore::x.y"}}, "env.PYTHONWARNINGS",
                     id="env-key-python"),
        pytest.param({"env": {"MODEL_TAG": "a\0b"}}, "env.MODEL_TAG", id="env-nul"),
        pytest.param({"env": {"MODEL_TAG": "x" * 4097}}, "env.MODEL_TAG", id="env-long"),
        pytest.param({"env": {"MODEL_TAG": 3}}, "env.MODEL_TAG", id="env-number"),
        pytest.param({"env": ["MODEL_TAG=1"]}, "env", id="env-not-object"),
        pytest.param({"torch_threads": 0}, "torch_threads", id="threads-zero"),
        pytest.param({"torch_threads": False}, "torch_threads", id="threads-bool"),
        pytest.param({"max_connections_per_replica": 0}, "max_connections_per_replica",
                     id="connections-zero"),
        pytest.param({"balancer": "random"}, "balancer", id="balancer"),
        pytest.param({"name": "other"}, "name", id="unknown-field"),
        pytest.param({"services": ["x:y"]}, "services", id="allow-list-not-settable"),
        pytest.param({"rollout_env": ["BROWSER"]}, "rollout_env", id="env-list-not-settable"),
    ],
)
def test_refused_changes_name_the_field(changes: dict[str, object], param: str) -> None:
    with pytest.raises(ClientError) as err:
        apply_changes(BASE, BASE, changes, max_replicas=8)
    assert err.value.status == 400
    assert err.value.param == param


def test_the_refusal_lists_the_allowed_services_not_the_input() -> None:
    with pytest.raises(ClientError) as err:
        apply_changes(BASE, BASE, {"service": "/tmp/evil.py:Cls"}, max_replicas=8)
    assert "risk.model:ScorerV2" in err.value.message
    assert "evil" not in err.value.message


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, {}),
        ({"service": "risk.model:ScorerV2"}, {"service": "risk.model:ScorerV2"}),
        ({"service": "risk.model:Scorer"}, {"service": "risk.model:Scorer"}),
        ({"replicas": 0}, {"replicas": 0}),
        ({"replicas": 8}, {"replicas": 8}),
        ({"torch_threads": 2}, {"torch_threads": 2}),
        ({"torch_threads": None}, {"torch_threads": None}),
        ({"balancer": "peak_ewma"}, {"balancer": "peak_ewma"}),
        ({"max_connections_per_replica": 8}, {"max_connections_per_replica": 8}),
        # env merges over the current env; null restores the file's value (or removes it)
        ({"env": {"MODEL_TAG": "v2"}}, {"env": (("DB", "x"), ("DEBUG", "0"), ("MODEL_TAG", "v2"))}),
        ({"env": {"DEBUG": None}}, {"env": (("DB", "x"), ("DEBUG", "0"))}),
    ],
)
def test_accepted_changes(changes: dict[str, object], expected: dict[str, object]) -> None:
    got = apply_changes(BASE, BASE, changes, max_replicas=8)
    for field, value in expected.items():
        if field == "env":
            assert sorted(got.env) == sorted(value)  # type: ignore[arg-type]
        else:
            assert getattr(got, field) == value
    assert got.services == BASE.services and got.rollout_env == BASE.rollout_env


def test_env_null_after_a_rollout_goes_back_to_the_file() -> None:
    current = apply_changes(BASE, BASE, {"env": {"DEBUG": "1", "MODEL_TAG": "v2"}}, 8)
    back = apply_changes(BASE, current, {"env": {"DEBUG": None, "MODEL_TAG": None}}, 8)
    assert dict(back.env) == {"DEBUG": "0", "DB": "x"}


def test_an_autoscaled_deployment_refuses_replicas_and_its_schema_leaves_them_out() -> None:
    fixed = DeploymentConfig(name="d", service="m:C")
    scaled = DeploymentConfig(name="d", service="m:C", autoscale=AutoscaleConfig())
    assert apply_changes(fixed, fixed, {"replicas": 3}, 8).replicas == 3
    assert "replicas" in changes_schema(fixed, 8)["properties"]
    with pytest.raises(ClientError) as exc:
        apply_changes(scaled, scaled, {"replicas": 3}, 8)
    assert exc.value.param == "replicas" and "autoscale" in exc.value.message
    assert "replicas" not in changes_schema(scaled, 8)["properties"]
    assert changes_schema(scaled, 8)["additionalProperties"] is False  # so it is refused there
