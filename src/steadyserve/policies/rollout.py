"""Rollouts, pure: what a rollout may change, and what to do next to converge on a target.

A rollout's inputs come from the network, so `apply_changes` accepts only what the
deployment's configuration allows (a service target it lists, environment keys it lists,
bounded numbers, a known balancer) and checks every field before anything changes.

The supervisor keeps one target per deployment (a revision, its replica count, and whether a
rollout toward it is still running) and, each tick, shows `RolloutPolicy.decide` the
deployment's slots. "New" slots are those of the target revision, "old" ones any other
revision; N is the target's replica count. The first matching row wins; the retire and start
rows combine into one plan:

    condition                                                     decision
    rolling, a new slot restarted >= max_restarts times           fail (back to the last good)
    rolling, a new slot never ready ready_timeout_s after created  fail
    more than N new slots (a scale-down)                          retire the extra: not ready
                                                                    first, then the fewest
                                                                    requests outstanding
    an old slot that is down (backoff, unhealthy, stopping)       retire it (it serves nothing)
    more old ready or starting slots than N - (new ready)         retire the extra: starting
                                                                    ones first, then the oldest
    not rolling, no old slot, fewer than N new slots              start the missing ones at
      (a scale-up, or a deployment starting)                        once
    fewer than N new slots, none of them pending, fewer than      start one (surge 1: one new
      N + 1 slots alive                                             replica at a time)
    rolling, N new slots all ready, no old one, none draining     done

A failed or cancelled rollout points the target back at the last good revision; the same
rows then converge on it (old slots are the broken revision's, new ones the good revision's,
started again where the rollout had already retired them). Serving capacity never drops
below min(N, what was ready): an old ready replica is retired only against a new ready one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import DeploymentConfig
from ..errors import ClientError, ConfigError
from .balancing import BALANCERS

ROLLOUT_FIELDS = ("service", "replicas", "balancer", "torch_threads", "env",
                  "max_connections_per_replica")
MAX_ENV_VALUE_BYTES = 4096
MAX_TORCH_THREADS = 1024
MAX_CONNECTIONS_PER_REPLICA = 10_000
ROLLOUT_STATES = ("rolling", "done", "failed", "cancelled")


# --- inputs -----------------------------------------------------------------------------------
def _int(value: Any, field: str, low: int, high: int) -> int:
    # bool is an int subclass, and 1.5 or "2" must not slip through as a count
    if type(value) is not int or not low <= value <= high:
        raise ClientError(f"'{field}' must be an integer in [{low}, {high}]", param=field)
    return value


def _env(value: Any, base: DeploymentConfig, current: DeploymentConfig) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ClientError("'env' must be an object of strings", param="env")
    env = dict(current.env)
    file_env = dict(base.env)
    for key, val in value.items():
        if key not in base.rollout_env:  # rollout_env holds only valid names: key is safe to echo
            allowed = list(base.rollout_env) or "none (set rollout_env in the configuration)"
            shown = key if len(key) <= 64 else key[:64] + "…"
            raise ClientError(f"environment key {shown!r} may not be set by a rollout; "
                              f"allowed: {allowed}", param=f"env.{shown}")
        if val is None:  # back to what the configuration file says
            if key in file_env:
                env[key] = file_env[key]
            else:
                env.pop(key, None)
            continue
        if not isinstance(val, str) or "\0" in val or len(val.encode()) > MAX_ENV_VALUE_BYTES:
            raise ClientError(f"env.{key} must be a string of at most {MAX_ENV_VALUE_BYTES} "
                              "bytes with no NUL, or null", param=f"env.{key}")
        env[key] = val
    return tuple(sorted(env.items()))


def apply_changes(
    base: DeploymentConfig, current: DeploymentConfig, changes: Mapping[str, Any],
    max_replicas: int,
) -> DeploymentConfig:
    """The config a rollout asks for: `current` with `changes`, or ClientError naming the
    first field that is not allowed. `base` is the deployment as the configuration file
    declares it: its allow-lists, and the env values that `null` restores."""
    unknown = sorted(str(k) for k in changes if k not in ROLLOUT_FIELDS)
    if unknown:
        shown = unknown[0][:64]
        raise ClientError(f"cannot roll out {shown!r}; settable: {list(ROLLOUT_FIELDS)}",
                          param=shown)
    values: dict[str, Any] = {}
    if "service" in changes:
        allowed = (base.service, *base.services)
        if changes["service"] not in allowed:  # compared, never imported: no path from the network
            raise ClientError(f"'service' must be one of the configured targets: {list(allowed)} "
                              "(add others to the deployment's `services`)", param="service")
        values["service"] = changes["service"]
    if "replicas" in changes:
        if base.autoscale is not None:
            raise ClientError(f"{base.name!r} is autoscaled: its replica count is the "
                              "autoscaler's; change min_replicas / max_replicas in "
                              f"[deployments.{base.name}.autoscale]", param="replicas")
        values["replicas"] = _int(changes["replicas"], "replicas", 0, max_replicas)
    if "torch_threads" in changes:
        threads = changes["torch_threads"]
        values["torch_threads"] = None if threads is None else \
            _int(threads, "torch_threads", 1, MAX_TORCH_THREADS)
    if "max_connections_per_replica" in changes:
        values["max_connections_per_replica"] = _int(
            changes["max_connections_per_replica"], "max_connections_per_replica", 1,
            MAX_CONNECTIONS_PER_REPLICA)
    if "balancer" in changes:
        if changes["balancer"] not in BALANCERS:
            raise ClientError(f"'balancer' must be one of {sorted(BALANCERS)}", param="balancer")
        values["balancer"] = changes["balancer"]
    if "env" in changes:
        values["env"] = _env(changes["env"], base, current)
    try:
        return dataclasses.replace(current, **values)
    except ConfigError as exc:  # the checks above should have caught it; never a 500
        raise ClientError(f"invalid rollout: {exc.message}") from None


def changes_schema(base: DeploymentConfig, max_replicas: int) -> dict[str, Any]:
    """JSON Schema of what `apply_changes` accepts for this deployment (the OpenAPI document
    publishes it): declared here, beside the checks, so the two cannot drift apart."""
    env_value = {"anyOf": [{"type": "string", "maxLength": MAX_ENV_VALUE_BYTES,
                            "pattern": "^[^\\u0000]*$"}, {"type": "null"}]}
    schema: dict[str, Any] = {
        "type": "object", "additionalProperties": False,
        "properties": {
            "service": {"enum": [base.service, *base.services]},
            "replicas": {"type": "integer", "minimum": 0, "maximum": max_replicas},
            "torch_threads": {"anyOf": [{"type": "integer", "minimum": 1,
                                         "maximum": MAX_TORCH_THREADS}, {"type": "null"}]},
            "max_connections_per_replica": {"type": "integer", "minimum": 1,
                                            "maximum": MAX_CONNECTIONS_PER_REPLICA},
            "balancer": {"enum": sorted(BALANCERS)},
            "env": {"type": "object", "additionalProperties": False,
                    "properties": {key: env_value for key in base.rollout_env}},
        },
    }
    if base.autoscale is not None:  # the autoscaler's to set
        del schema["properties"]["replicas"]
    return schema


def rollout_fields(config: DeploymentConfig) -> dict[str, Any]:
    """The settings a rollout controls, as JSON (what is stored and shown)."""
    return {"service": config.service, "replicas": config.replicas, "balancer": config.balancer,
            "torch_threads": config.torch_threads, "env": dict(config.env),
            "max_connections_per_replica": config.max_connections_per_replica}


# --- decisions --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Target:
    revision: int
    replicas: int
    rolling: bool  # a rollout toward it is running: failures of its replicas fail it


@dataclass(frozen=True, slots=True)
class SlotView:
    """What the policy sees of one replica slot."""

    replica_id: str
    revision: int
    state: str  # backoff | starting | ready | unhealthy | stopping
    restarts: int = 0
    created_at: float = 0.0
    was_ready: bool = False  # ever in rotation since the slot was created
    draining: bool = False  # retired already: leaving, counted for nothing but "done"
    outstanding: int = 0  # requests the gateway has at it now


@dataclass(frozen=True, slots=True)
class Plan:
    start: int = 0  # new-revision slots to create
    retire: tuple[str, ...] = ()  # replica ids to drain and stop for good
    outcome: str | None = None  # "done" | "failed"
    reason: str = ""


@dataclass(frozen=True, slots=True)
class RolloutPolicy:
    max_restarts: int
    ready_timeout_s: float

    def decide(self, target: Target, slots: Sequence[SlotView], now: float) -> Plan:
        live = [s for s in slots if not s.draining]
        new = [s for s in live if s.revision == target.revision]
        old = [s for s in live if s.revision != target.revision]
        if target.rolling:
            for s in new:
                if s.restarts >= self.max_restarts:
                    return Plan(outcome="failed", reason=(
                        f"new replica {s.replica_id} restarted {s.restarts} times"))
                if not s.was_ready and now - s.created_at >= self.ready_timeout_s:
                    return Plan(outcome="failed", reason=(
                        f"new replica {s.replica_id} not ready after "
                        f"{self.ready_timeout_s:g}s"))
        n = target.replicas
        retire: list[str] = []
        if len(new) > n:
            # starting replicas first, never a running one before them (ray #43034), then the
            # idlest: a retired replica drains what it holds, the fewer the sooner
            extra = sorted(new, key=lambda s: (s.state == "ready", s.outstanding,
                                               s.created_at))[: len(new) - n]
            retire += [s.replica_id for s in extra]
            new = [s for s in new if s.replica_id not in retire]
        new_ready = sum(1 for s in new if s.state == "ready")
        # old slots that serve or may soon (a gateway that restarted mid-rollout has only
        # starting ones) are kept against the shortfall; a down one is retired at once
        hopeful = [s for s in old if s.state == "starting"] + [s for s in old if s.state == "ready"]
        retire += [s.replica_id for s in old if s.state not in ("starting", "ready")]
        keep = min(len(hopeful), max(0, n - new_ready))
        retire += [s.replica_id for s in hopeful[: len(hopeful) - keep]]  # starting ones first
        alive = len(new) + keep
        pending = any(s.state != "ready" for s in new)
        if not target.rolling and not old:  # scaling, not replacing: no surge limit
            start = max(0, n - len(new))
        else:
            start = 1 if len(new) < n and not pending and alive < n + 1 else 0
        if target.rolling and not retire and not start and not old and new_ready == n \
                and len(new) == n and not any(s.draining for s in slots):
            return Plan(outcome="done")
        return Plan(start=start, retire=tuple(retire))


def progress(target: Target, slots: Sequence[SlotView]) -> dict[str, Any]:
    """How far the deployment is from its target, for the status API and the CLI."""
    live = [s for s in slots if not s.draining]
    new = [s for s in live if s.revision == target.revision]
    ready = sum(1 for s in new if s.state == "ready")
    old = len(live) - len(new)
    draining = len(slots) - len(live)
    return {"desired": target.replicas, "updated": len(new), "ready": ready, "old": old,
            "draining": draining,
            "converged": ready == len(new) == target.replicas and old == 0 and draining == 0}


def config_from_fields(file_config: DeploymentConfig, fields: dict[str, Any]) -> DeploymentConfig:
    """A deployment's config as the gateway process runs it: the file's, with the rollout
    fields it sent (the same shape a stored rollout record keeps)."""
    values = {k: v for k, v in fields.items() if k in ROLLOUT_FIELDS}
    values["env"] = tuple((str(k), str(v)) for k, v in values.get("env", {}).items())
    return dataclasses.replace(file_config, **values)
