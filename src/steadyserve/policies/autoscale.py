"""Autoscaling, pure: how many replicas a deployment should run, from the demand it sees.

Demand is a deployment's ongoing requests at the gateway: in flight at a replica, waiting for
an admission slot, and held while it scales from zero. The queue counts: one backed-up
replica shows as demand even when the others idle (averaging per-replica load hid it in Ray
Serve, ray #18925), and a request that has finished — streamed or not — counts for nothing
(ray #61551: replicas pinned after streaming traffic drained).

The autoscaler samples demand every `interval_s` (`observe`) and asks `decide` with the
deployment's current desired count and its ready replicas. With
    stable = mean demand over stable_window_s   (smoothing)
    panic  = mean demand over panic_window_s    (bursts)
    want(x) = ceil(x / target_ongoing_requests), clamped to [floor, max]
the first matching row decides:

    condition                                                    desired     delay
    nothing observed yet                                         unchanged   -
    current outside [floor, max]                                 clamped     none
    current = 0 and any demand now (held requests)               want(panic), none
                                                                   at least 1  (activation)
    panic ≥ panic_threshold × max(1, ready) × target             max(current, none; panic
      (Knative's panic mode; replicas still starting are not       want(panic)) mode for a
      capacity yet)                                                             stable window
    panicking (within a stable window of the last panic row)     unchanged   never down
    want(stable) within ±tolerance of the current capacity       unchanged   -
    want(stable) > current                                       want(stable) upscale_delay_s
    want(stable) = 0 (no demand over the whole stable window)    0           scale_to_zero_delay_s
      and none wanted over the last scale_to_zero_delay_s                    (its own delay)
    want(stable) < current                                       the most    downscale_delay_s
                                                                   wanted over
                                                                   the delay, ≥ 1

The upscale delay is how long more replicas must be wanted, uninterrupted, before they start;
fewer wanted resets it. A scale-down takes the most replicas wanted at any time over the last
downscale_delay_s (Kubernetes' stabilization window), so a drop must last the whole delay, and
then the count follows the demand down as the window slides. A demand that wobbles around a
boundary changes nothing, and under constant load the count settles once. A move up clears
the downscale window. `floor` is `min_replicas`,
raised for a while by the `scale_up` automatic response (`boost`). Scale to zero happens only
when `min_replicas` is 0 (honoured, unlike Ray Serve 2.51+: ray #59076).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..config import AutoscaleConfig


@dataclass(frozen=True, slots=True)
class Decision:
    desired: int
    previous: int
    reason: str
    inputs: dict[str, Any]

    @property
    def direction(self) -> str:
        return "up" if self.desired > self.previous else "down"


@dataclass(slots=True)
class Autoscale:
    """One deployment's autoscaling state; every method takes the time it runs at."""

    cfg: AutoscaleConfig
    max_replicas: int  # the effective ceiling (the config's, within what the machine holds)
    samples: deque[tuple[float, float]] = field(default_factory=deque)
    panic_until: float = 0.0
    up_since: float | None = None
    wants: deque[tuple[float, int]] = field(default_factory=deque)  # (time, count wanted)
    boost_floor: int = 0
    boost_until: float = 0.0

    # inputs -------------------------------------------------------------------------------
    def observe(self, now: float, demand: float) -> None:
        self.samples.append((now, max(0.0, demand)))
        horizon = now - self.cfg.stable_window_s
        while self.samples and self.samples[0][0] < horizon:
            self.samples.popleft()

    def boost(self, now: float, current: int) -> int:
        """The scale_up automatic response: a floor of one more replica (or a quarter more)
        than now, for scale_up_hold_s. Returns the new floor (the max when already there)."""
        floor = min(self.max_replicas, max(current + 1, math.ceil(current * 1.25)))
        self.boost_floor = max(self.boost_floor if now < self.boost_until else 0, floor)
        self.boost_until = now + self.cfg.scale_up_hold_s
        return self.boost_floor

    def floor(self, now: float) -> int:
        boosted = self.boost_floor if now < self.boost_until else 0
        return min(self.max_replicas, max(self.cfg.min_replicas, boosted))

    def _mean(self, now: float, window_s: float) -> float:
        values = [v for t, v in self.samples if t >= now - window_s]
        return sum(values) / len(values) if values else 0.0

    def _want(self, demand: float, floor: int) -> int:
        need = math.ceil(demand / self.cfg.target_ongoing_requests - 1e-9) if demand > 0 else 0
        return max(floor, min(self.max_replicas, need))

    # the decision -------------------------------------------------------------------------
    def decide(self, now: float, current: int, ready: int, *,
               demand_now: float | None = None) -> Decision | None:
        """The new desired count with its reason and inputs, or None to keep `current`.
        `demand_now`: the demand at this moment, between samples (an activation); by default
        the latest sample."""
        if not self.samples and demand_now is None:
            return None
        cfg = self.cfg
        floor = self.floor(now)
        stable = self._mean(now, cfg.stable_window_s)
        panic = self._mean(now, cfg.panic_window_s)
        latest = demand_now if demand_now is not None else self.samples[-1][1]
        capacity = max(1, ready) * cfg.target_ongoing_requests
        inputs = {"stable_demand": round(stable, 3), "panic_demand": round(panic, 3),
                  "demand_now": round(latest, 3), "ready": ready, "current": current,
                  "floor": floor, "max": self.max_replicas,
                  "target_ongoing_requests": cfg.target_ongoing_requests}

        def change(desired: int, reason: str, *, keep_history: bool = False) -> Decision | None:
            self.up_since = None
            if not keep_history:  # a move up starts the downscale window over
                self.wants.clear()
            if desired == current:
                return None
            return Decision(desired, current, reason,
                            {**inputs, "panicking": now < self.panic_until})

        if current < floor or current > self.max_replicas:
            return change(min(self.max_replicas, max(floor, current)),
                          f"outside [{floor}, {self.max_replicas}]")
        if current == 0 and latest > 0:
            return change(max(1, self._want(max(panic, latest), floor)),
                          f"scale from zero: {latest:g} request(s) waiting")
        if panic >= cfg.panic_threshold * capacity:
            self.panic_until = now + cfg.stable_window_s
            return change(max(current, self._want(panic, floor)),
                          f"panic: {panic:.1f} ongoing over {cfg.panic_window_s:g}s is "
                          f">= {cfg.panic_threshold:g} x the capacity of {ready} ready "
                          f"replica(s) ({capacity:g})")
        if now < self.panic_until:  # never down while panicking; up only by the row above
            self.up_since = None
            self.wants.clear()
            return None
        want = self._want(stable, floor)
        if current > 0 and want != 0 and \
                abs(stable / (current * cfg.target_ongoing_requests) - 1) <= cfg.tolerance:
            want = current
        self._remember(now, want)
        if want > current:
            if self.up_since is None:
                self.up_since = now
            if now - self.up_since >= cfg.upscale_delay_s:
                return change(want, f"{stable:.1f} ongoing over {cfg.stable_window_s:g}s: "
                                    f"{stable / current if current else stable:.2f} per "
                                    f"replica > target {cfg.target_ongoing_requests:g} for "
                                    f"{cfg.upscale_delay_s:g}s")
            return None
        self.up_since = None
        if want == current:
            return None
        if want == 0 and self._covered(now, cfg.scale_to_zero_delay_s) and \
                self._highest(now, cfg.scale_to_zero_delay_s) == 0:
            # nothing at all for a stable window and then scale_to_zero_delay_s: its own delay
            return change(0, f"no requests for {cfg.stable_window_s + cfg.scale_to_zero_delay_s:g}s",
                          keep_history=True)
        if not self._covered(now, cfg.downscale_delay_s):
            return None
        # the most replicas wanted at any time over the last downscale_delay_s (Kubernetes'
        # stabilization window): a drop must last, and the count then follows it down as the
        # window slides, without waiting a whole delay again per step
        down = max(1, self._highest(now, cfg.downscale_delay_s))  # zero: the rule above
        if down >= current:
            return None
        return change(down, f"{stable:.1f} ongoing over {cfg.stable_window_s:g}s: "
                            f"{stable / current:.2f} per replica < target "
                            f"{cfg.target_ongoing_requests:g}; at most {down} wanted for "
                            f"{cfg.downscale_delay_s:g}s", keep_history=True)

    # the downscale window ----------------------------------------------------------------
    def _remember(self, now: float, want: int) -> None:
        self.wants.append((now, want))
        horizon = now - max(self.cfg.downscale_delay_s, self.cfg.scale_to_zero_delay_s)
        # keep one entry at or before the horizon: it shows the window is covered
        while len(self.wants) > 1 and self.wants[1][0] <= horizon:
            self.wants.popleft()

    def _covered(self, now: float, delay: float) -> bool:
        return bool(self.wants) and self.wants[0][0] <= now - delay

    def _highest(self, now: float, delay: float) -> int:
        return max(w for t, w in self.wants if t >= now - delay)
