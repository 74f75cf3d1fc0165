"""control.canary with a fake clock and a dict for a store: evidence per step and epoch,
labels dated by the step, an alert rolls back, the plan is stored and a restart resumes it
with fresh evidence, a follower applies the leader's split, bad stored records are ignored."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from steadyserve.config import CanaryConfig, Config, DeploymentConfig
from steadyserve.control.canary import CanaryController
from steadyserve.errors import Conflict, NotFound
from steadyserve.gateway.canary import Splits


class Store:
    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def get_state(self, key: str) -> Any:
        return self.state.get(key)

    def put_state(self, key: str, obj: Any, fence: Any = None) -> None:
        self.state[key] = obj


class Clock:
    t = 5000.0

    def __call__(self) -> float:
        return self.t


def config(**rules: Any) -> Config:
    canary = CanaryConfig(**{"deployment": "next", "steps": (10.0, 50.0), "min_samples": 20,
                             "min_step_s": 0.0, "error_margin": 0.05, "latency_margin": 1.0,
                             **rules})
    return Config(deployments=(DeploymentConfig(name="risk", service="x:Y", canary=canary),
                               DeploymentConfig(name="next", service="x:Z")))


def controller(store: Store | None = None, firing: Any = None, **rules: Any
               ) -> tuple[CanaryController, Splits, Clock]:
    splits, clock = Splits(), Clock()
    c = CanaryController(config(**rules), splits, store=store, wall=clock, clock=clock,
                         salt=lambda: "s", firing=firing or (lambda d: None))
    return c, splits, clock


def feed(splits: Splits, epoch: int, n: int, errors: int = 0, arm: str = "candidate",
         latency: float = 0.01) -> None:
    for i in range(n):
        splits.observations.observe("risk", epoch, arm, latency * (1 + i % 3 / 10), i < errors)


async def flush(c: CanaryController) -> None:
    await asyncio.get_running_loop().run_in_executor(c._writer, lambda: None)


def test_unknown_and_conflicting_requests_are_refused() -> None:
    c, _, _ = controller()
    with pytest.raises(NotFound):
        c.begin("next")
    c.begin("risk")
    with pytest.raises(Conflict):
        c.begin("risk")
    c.abort("risk")
    with pytest.raises(Conflict):
        c.abort("risk")


def test_evidence_of_an_earlier_step_is_not_counted() -> None:
    c, splits, _ = controller()
    c.begin("risk")
    epoch = splits.get("risk").epoch
    feed(splits, epoch - 1, 50, errors=50)  # a late report from before this step
    feed(splits, epoch, 5)
    c.tick()
    assert c.plans["risk"].cand.n == 5 and c.plans["risk"].cand.errors == 0
    assert "not enough data: candidate 5/20" in c.status("risk")["verdict"]["reason"]


def test_labels_count_for_their_arm_only_after_the_step_began() -> None:
    c, _, clock = controller()
    c.begin("risk")
    c.label({"deployment": "risk", "arm": "candidate", "created_at": clock.t - 1}, True)
    c.label({"deployment": "risk", "arm": "candidate", "created_at": clock.t}, False)
    c.label({"deployment": "risk", "arm": "baseline", "created_at": clock.t}, True)
    c.label({"deployment": "risk", "arm": "failover", "created_at": clock.t}, True)
    c.label({"deployment": "other", "arm": "baseline", "created_at": clock.t}, True)
    plan = c.plans["risk"]
    assert (plan.cand.labelled, plan.cand.correct) == (1, 0)
    assert (plan.base.labelled, plan.base.correct) == (1, 1)


def test_an_alert_on_the_candidate_rolls_back_at_the_next_tick() -> None:
    firing: dict[str, str] = {}
    c, splits, _ = controller(firing=firing.get)
    c.begin("risk")
    c.tick()
    assert c.status("risk")["state"] == "running"
    firing["next"] = "HighErrorRate: 12 % of requests fail"
    c.tick()
    status = c.status("risk")
    assert status["state"] == "rolled_back" and "HighErrorRate" in status["reason"]
    assert splits.get("risk") is None


def test_an_alert_is_ignored_when_rollback_on_alert_is_off() -> None:
    c, _, _ = controller(firing=lambda d: "HighErrorRate", rollback_on_alert=False)
    c.begin("risk")
    c.tick()
    assert c.status("risk")["state"] == "running"


async def test_the_plan_is_stored_and_a_restart_resumes_it_with_fresh_evidence() -> None:
    store = Store()
    c, splits, clock = controller(store)
    c.begin("risk")
    epoch = splits.get("risk").epoch
    feed(splits, epoch, 300)
    feed(splits, epoch, 300, arm="baseline")
    clock.t += 10
    c.tick()
    assert c.status("risk")["percent"] == 50.0  # advanced
    await flush(c)
    assert store.state["canary:risk"]["percent"] == 50.0
    # a new gateway process: same store
    c2, splits2, _ = controller(store)
    await c2._restore()
    status = c2.status("risk")
    assert status["state"] == "running" and status["step"] == 1 and status["percent"] == 50.0
    assert status["candidate_arm"]["requests"] == 0 and status["history"][-1]["action"] == "resume"
    split = splits2.get("risk")
    assert split is not None and split.percent == 50.0 and split.salt == "s"
    assert split.epoch > epoch  # what the old process observed is not mixed in


@pytest.mark.parametrize("raw", ["junk", {"state": "exploded"}, {"state": "running", "step": 9,
                                                                 "percent": 5, "salt": "s",
                                                                 "epoch": 1}])
async def test_a_bad_stored_record_is_ignored(raw: Any) -> None:
    store = Store()
    store.state["canary:risk"] = raw
    c, splits, _ = controller(store)
    await c._restore()
    assert c.status("risk")["state"] == "idle" and splits.get("risk") is None


async def test_a_follower_applies_the_leaders_split() -> None:
    store = Store()
    leader, _, _ = controller(store)
    leader.begin("risk")
    await flush(leader)

    class Follows:
        def leading(self) -> bool:
            return False

    follower, splits, _ = controller(store)
    follower.lead = Follows()
    await follower._follow()
    assert splits.get("risk") is not None and splits.get("risk").percent == 10.0
    leader.abort("risk")
    await flush(leader)
    await follower._follow()
    assert splits.get("risk") is None
