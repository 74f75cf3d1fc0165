"""Canaries, the control plane's half: a progressive rollout to a candidate deployment that
promotes or rolls itself back on the evidence (policies.canary), step by step.

`begin` (the admin API, `steadyserve canary start`) sets the first step's split; every
`interval_s` the loop gathers what each arm served since the step began (this process's
`Splits.observations`, the data-plane workers' reports, feedback labels) and asks
`policies.canary.judge`: wait (and say why), advance to the next step, promote (the candidate
takes 100 %) or roll back (0 %: the baseline serves everything, at once; requests already at
the candidate finish there). `abort` rolls back by hand. A firing alert on the candidate rolls
it back at the next tick.

Every verdict that changes something, and the last one of each step, is kept with its evidence
in the plan's `history` (bounded: `MAX_HISTORY`), shown by `GET /v1/admin/deployments/<name>/
canary`, `steadyserve canary status` and the dashboard, and stored under `canary:<name>` in the
state database. A restarted gateway resumes a running plan at its stored step with fresh
evidence (a step's evidence is in memory; it is not worth a write per request). With
[cluster], the leader judges and stores; followers apply the stored split each tick (their
requests follow it; their observations are not pooled — the leader's traffic decides).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..config import CanaryConfig, Config
from ..errors import Conflict, NotFound
from ..gateway.canary import ArmTally, Split, Splits, parse_rows
from ..policies.canary import ArmStats, CanaryRules, Verdict, judge
from ..policies.lease import Alone
from ..tasks import cancel_and_wait

log = logging.getLogger("steadyserve.canary")

STATE_KEY = "canary:{}"
STATES = ("idle", "running", "promoted", "rolled_back")
MAX_HISTORY = 64


def rules_of(cfg: CanaryConfig) -> CanaryRules:
    return CanaryRules(steps=cfg.steps, min_samples=cfg.min_samples, min_step_s=cfg.min_step_s,
                       alpha=cfg.alpha, latency_margin=cfg.latency_margin,
                       error_margin=cfg.error_margin, quality_margin=cfg.quality_margin,
                       quality_min_labels=cfg.quality_min_labels,
                       require_quality=cfg.require_quality)


class Arm:
    """One arm's evidence at the current step."""

    __slots__ = ("correct", "errors", "failovers", "labelled", "latencies", "n", "unavailable")

    def __init__(self) -> None:
        self.n = self.errors = self.labelled = self.correct = 0
        self.unavailable = self.failovers = 0
        self.latencies: list[float] = []

    def add(self, t: ArmTally, max_latencies: int) -> None:
        self.n += t.n
        self.errors += t.errors
        self.unavailable += t.unavailable
        self.failovers += t.failovers
        room = max_latencies - len(self.latencies)
        if room > 0:
            self.latencies.extend(t.latencies[:room])

    def stats(self) -> ArmStats:
        return ArmStats(n=self.n, errors=self.errors, latencies=tuple(self.latencies),
                        labelled=self.labelled, correct=self.correct)

    def summary(self) -> dict[str, Any]:
        return {"requests": self.n, "errors": self.errors, "labelled": self.labelled,
                "correct": self.correct, "unavailable": self.unavailable,
                "failovers": self.failovers}


class Plan:
    """A deployment's canary: where it is, and what it has seen at this step."""

    def __init__(self, cfg: CanaryConfig) -> None:
        self.cfg = cfg
        self.state = "idle"
        self.step = 0
        self.percent = 0.0
        self.salt = ""
        self.epoch = 0
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self.step_started_at = 0.0  # wall clock: feedback labels are dated by it
        self.step_started_mono = 0.0
        self.looks = 0
        self.last_look_n = 0
        self.base = Arm()
        self.cand = Arm()
        self.last: Verdict | None = None
        self.reason = ""
        self.history: list[dict[str, Any]] = []
        self.requests_total = 0  # both arms, every step: "rolled back after N requests"

    def split(self) -> Split | None:
        if self.state not in ("running", "promoted") or self.percent <= 0:
            return None
        return Split(candidate=self.cfg.deployment, percent=self.percent, salt=self.salt,
                     epoch=self.epoch, sticky_headers=self.cfg.sticky_headers)

    def new_step(self, step: int, percent: float, wall: float, mono: float) -> None:
        self.step, self.percent = step, percent
        self.epoch += 1
        self.step_started_at, self.step_started_mono = wall, mono
        self.looks = self.last_look_n = 0
        self.base, self.cand = Arm(), Arm()
        self.last = None

    def note(self, wall: float, action: str, reason: str,
             verdict: Verdict | None = None) -> None:
        self.history.append({
            "at": round(wall, 3), "step": self.step, "percent": self.percent, "action": action,
            "reason": reason, "baseline": self.base.summary(), "candidate": self.cand.summary(),
            "checks": verdict.to_json()["checks"] if verdict is not None else []})
        del self.history[:-MAX_HISTORY]

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "step": self.step, "percent": self.percent,
                "salt": self.salt, "epoch": self.epoch, "started_at": self.started_at,
                "ended_at": self.ended_at, "reason": self.reason, "history": self.history,
                "requests_total": self.requests_total}

    def load(self, raw: Any) -> None:
        """Take a stored record (checked whole before anything changes)."""
        if not isinstance(raw, dict) or raw.get("state") not in STATES:
            raise ValueError("not a canary record")
        state, step, percent = str(raw["state"]), int(raw["step"]), float(raw["percent"])
        if state == "running" and not 0 <= step < len(self.cfg.steps):
            raise ValueError(f"step {step} is not in the plan {list(self.cfg.steps)}")
        if not 0 <= percent <= 100:
            raise ValueError(f"share {percent} is not a percentage")
        history = raw.get("history", [])
        if not isinstance(history, list):
            raise ValueError("history is not a list")
        started, ended = raw.get("started_at"), raw.get("ended_at")
        self.started_at = None if started is None else float(started)
        self.ended_at = None if ended is None else float(ended)
        self.state, self.step, self.percent = state, step, percent
        self.salt, self.epoch = str(raw["salt"]), int(raw["epoch"])
        self.reason = str(raw.get("reason", ""))
        self.history = [h for h in history if isinstance(h, dict)][-MAX_HISTORY:]
        self.requests_total = int(raw.get("requests_total", 0))


class CanaryController:
    def __init__(self, config: Config, splits: Splits, *, store: Any = None,
                 firing: Callable[[str], str | None] = lambda deployment: None,
                 lead: Any = None, wall: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic,
                 salt: Callable[[], str] = lambda: secrets.token_hex(8)) -> None:
        self.splits = splits
        self.store = store
        self.firing = firing
        self.lead = lead if lead is not None else Alone()
        self.wall, self.clock, self.make_salt = wall, clock, salt
        self.plans = {d.name: Plan(d.canary) for d in config.deployments
                      if d.canary is not None}
        self.positives = {d.name: d.feedback_positive for d in config.deployments}
        self.interval_s = min((p.cfg.interval_s for p in self.plans.values()), default=1.0)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="steadyserve-canary-db")
        self._task: asyncio.Task[None] | None = None

    # lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        if not self.plans:
            return
        await self._restore()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="canaries")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._writer.shutdown(wait=True)  # the last state written reaches the store

    async def _restore(self) -> None:
        if self.store is None:
            return
        for name, plan in self.plans.items():
            try:
                raw = await asyncio.get_running_loop().run_in_executor(
                    self._writer, self.store.get_state, STATE_KEY.format(name))
            except Exception as exc:  # the database is down: start idle, say so
                log.error("could not read the stored canary of %s: %s", name, exc)
                continue
            if raw is None:
                continue
            try:
                plan.load(raw)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("ignoring the stored canary of %s: %s", name, exc)
                continue
            if plan.state == "running":  # evidence was in memory: the step starts afresh
                plan.new_step(plan.step, plan.percent, self.wall(), self.clock())
                plan.note(self.wall(), "resume", "the gateway restarted: the step's evidence "
                                                 "starts again")
                log.info("resuming the canary of %s at step %d (%g %%)", name, plan.step,
                         plan.percent, extra={"deployment": name})
            self._apply(name, plan)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                if self.lead.leading():
                    self.tick()
                else:
                    await self._follow()
            except Exception:
                log.exception("canary step failed; continuing")

    async def _follow(self) -> None:
        """A follower in a cluster: apply the leader's stored splits."""
        self.splits.observations.take()  # not pooled: the leader's traffic decides
        if self.store is None:
            return
        for name, plan in self.plans.items():
            raw = await asyncio.get_running_loop().run_in_executor(
                self._writer, self.store.get_state, STATE_KEY.format(name))
            if raw is not None:
                try:
                    plan.load(raw)
                except (KeyError, TypeError, ValueError):
                    continue
                self._apply(name, plan)

    def running(self) -> bool:
        return any(p.state == "running" for p in self.plans.values())

    # evidence -------------------------------------------------------------------------------
    def merge(self, rows: Any) -> None:
        """Observations from this process or a worker's report (the wire rows)."""
        for deployment, epoch, arm, tally in parse_rows(rows):
            plan = self.plans.get(deployment)
            if plan is None or plan.state != "running" or epoch != plan.epoch:
                continue  # an earlier step's, or a finished canary's
            (plan.cand if arm == "candidate" else plan.base).add(tally, plan.cfg.max_latencies)
            plan.requests_total += tally.n

    def label(self, record: dict[str, Any], correct: bool) -> None:
        """A feedback label for an answer this deployment's canary served at this step."""
        plan = self.plans.get(str(record.get("deployment")))
        arm = record.get("arm")
        if plan is None or plan.state != "running" or arm not in ("baseline", "candidate") \
                or float(record.get("created_at") or 0) < plan.step_started_at:
            return
        side = plan.cand if arm == "candidate" else plan.base
        side.labelled += 1
        side.correct += int(correct)

    def tick(self) -> None:
        self.merge(self.splits.observations.take())
        now_wall, now = self.wall(), self.clock()
        for name, plan in self.plans.items():
            if plan.state != "running":
                continue
            cfg = plan.cfg
            alert = self.firing(cfg.deployment) if cfg.rollback_on_alert else None
            verdict = judge(rules_of(cfg), plan.base.stats(), plan.cand.stats(),
                            looks=plan.looks, last_look_n=plan.last_look_n,
                            step_age_s=now - plan.step_started_mono,
                            last_step=plan.step == len(cfg.steps) - 1, alert=alert)
            if verdict.look is not None and verdict.look == plan.looks:
                plan.looks += 1
                plan.last_look_n = plan.cand.n
            changed = plan.last is None or plan.last.reason != verdict.reason
            plan.last = verdict
            if verdict.action == "wait":
                if changed:
                    self._persist(name, plan)
                continue
            self._act(name, plan, verdict, now_wall, now)

    def _act(self, name: str, plan: Plan, verdict: Verdict, wall: float, mono: float) -> None:
        plan.note(wall, verdict.action, verdict.reason, verdict)
        if verdict.action == "advance":
            step = plan.step + 1
            plan.new_step(step, plan.cfg.steps[step], wall, mono)
            log.info("canary of %s advances to %g %%: %s", name, plan.percent, verdict.reason,
                     extra={"deployment": name})
        elif verdict.action == "promote":
            plan.state, plan.ended_at, plan.reason = "promoted", wall, verdict.reason
            plan.percent = 100.0
            plan.epoch += 1
            log.info("canary of %s promoted: %s takes all traffic (%s)", name,
                     plan.cfg.deployment, verdict.reason, extra={"deployment": name})
        else:  # rollback
            self._roll_back(name, plan, verdict.reason, wall)
            return
        self._apply(name, plan)
        self._persist(name, plan)

    def _roll_back(self, name: str, plan: Plan, reason: str, wall: float) -> None:
        plan.state, plan.ended_at, plan.reason = "rolled_back", wall, reason
        plan.percent = 0.0
        self._apply(name, plan)
        self._persist(name, plan)
        log.warning("canary of %s rolled back: %s", name, reason, extra={"deployment": name})

    def _apply(self, name: str, plan: Plan) -> None:
        self.splits.set(name, plan.split(), plan.cfg.max_latencies)

    def _persist(self, name: str, plan: Plan) -> None:
        if self.store is None:
            return
        record = plan.to_json()
        fence = self.lead.fence()

        def write() -> None:
            try:
                self.store.put_state(STATE_KEY.format(name), record, fence)
            except Exception as exc:  # in memory it holds; the next change writes it again
                log.error("could not store the canary of %s: %s", name, exc)

        self._writer.submit(write)

    # the API --------------------------------------------------------------------------------
    def _plan(self, deployment: str) -> Plan:
        plan = self.plans.get(deployment)
        if plan is None:
            raise NotFound(f"deployment {deployment!r} declares no canary: add "
                           f"[deployments.{deployment}.canary] with the candidate deployment")
        return plan

    def begin(self, deployment: str) -> dict[str, Any]:
        plan = self._plan(deployment)
        self.lead.require("starting a canary")
        if plan.state == "running":
            raise Conflict(f"the canary of {deployment!r} is running (step {plan.step}, "
                           f"{plan.percent:g} %); abort it first")
        wall = self.wall()
        plan.state, plan.started_at, plan.ended_at, plan.reason = "running", wall, None, ""
        plan.salt = self.make_salt()
        plan.history, plan.requests_total = [], 0
        plan.new_step(0, plan.cfg.steps[0], wall, self.clock())
        plan.note(wall, "start", f"{plan.cfg.deployment} at {plan.percent:g} %")
        log.info("canary of %s started: %s at %g %%", deployment, plan.cfg.deployment,
                 plan.percent, extra={"deployment": deployment})
        self._apply(deployment, plan)
        self._persist(deployment, plan)
        return self.status(deployment)

    def abort(self, deployment: str, by: str = "api") -> dict[str, Any]:
        plan = self._plan(deployment)
        self.lead.require("aborting a canary")
        if plan.state not in ("running", "promoted"):
            raise Conflict(f"the canary of {deployment!r} is {plan.state}: nothing to abort")
        plan.note(self.wall(), "rollback", f"aborted by {by}")
        self._roll_back(deployment, plan, f"aborted by {by}", self.wall())
        return self.status(deployment)

    def status(self, deployment: str) -> dict[str, Any]:
        plan = self._plan(deployment)
        cfg = plan.cfg
        return {
            "deployment": deployment, "candidate": cfg.deployment, "state": plan.state,
            "step": plan.step, "steps": list(cfg.steps), "percent": plan.percent,
            "started_at": plan.started_at, "ended_at": plan.ended_at, "reason": plan.reason,
            "step_age_s": round(self.clock() - plan.step_started_mono, 3)
            if plan.state == "running" else None,
            "requests_total": plan.requests_total,
            "baseline": plan.base.summary(), "candidate_arm": plan.cand.summary(),
            "verdict": plan.last.to_json() if plan.last is not None else None,
            "looks": plan.looks,
            "rules": {"min_samples": cfg.min_samples, "min_step_s": cfg.min_step_s,
                      "alpha": cfg.alpha, "latency_margin": cfg.latency_margin,
                      "error_margin": cfg.error_margin, "quality_margin": cfg.quality_margin,
                      "quality_min_labels": cfg.quality_min_labels,
                      "require_quality": cfg.require_quality,
                      "rollback_on_alert": cfg.rollback_on_alert},
            "history": plan.history,
        }

    def overview(self) -> dict[str, Any]:
        return {name: {"candidate": p.cfg.deployment, "state": p.state, "step": p.step,
                       "percent": p.percent, "reason": p.reason or (
                           p.last.reason if p.last is not None else "")}
                for name, p in self.plans.items()}
