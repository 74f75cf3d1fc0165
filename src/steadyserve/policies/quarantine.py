"""Poison-request quarantine: an input that keeps crashing replicas is refused for a while.

When a replica dies while its model is executing a call or batch (the replica's flight
recorder says which requests were in it; queued ones are innocent), each of those N
requests takes 1/N of the blame. An input whose blame reaches `crashes` (2: it crashed
a replica, then the one it was retried on) is refused with a 4xx for `quarantine_s`. Distinct
innocent inputs that happen to be in flight during unrelated crashes never accumulate.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True, slots=True)
class Quarantine:
    crashes: float = 2.0
    quarantine_s: float = 600.0
    forget_after_s: float = 600.0
    max_entries: int = 10_000
    _blame: dict[str, tuple[float, float]] = field(default_factory=dict)  # key → (blame, at)
    _until: dict[str, float] = field(default_factory=dict)

    def blocked(self, key: str, now: float) -> bool:
        until = self._until.get(key)
        if until is None:
            return False
        if now >= until:
            del self._until[key]
            return False
        return True

    def on_crash(self, keys: list[str], now: float) -> list[str]:
        """Blame the inputs in flight on a crashed replica; returns those newly quarantined."""
        if not keys:
            return []
        share = 1.0 / len(keys)
        newly = []
        for key in keys:
            blame, at = self._blame.get(key, (0.0, now))
            if now - at > self.forget_after_s:
                blame = 0.0
            blame += share
            self._blame[key] = (blame, now)
            if blame >= self.crashes - 1e-9 and key not in self._until:
                self._until[key] = now + self.quarantine_s
                newly.append(key)
        self._trim(now)
        return newly

    def _trim(self, now: float) -> None:
        """Bounded memory: expired quarantines go, then the oldest blame down to half the cap."""
        for k in [k for k, until in self._until.items() if now >= until]:
            del self._until[k]
        if len(self._blame) > self.max_entries:
            keep = max(0, self.max_entries // 2)
            oldest_first = sorted(self._blame, key=lambda k: self._blame[k][1])
            for k in oldest_first[: len(oldest_first) - keep]:
                del self._blame[k]
        if len(self._until) > self.max_entries:
            for k in sorted(self._until, key=self._until.__getitem__)[: len(self._until) - self.max_entries]:
                del self._until[k]
