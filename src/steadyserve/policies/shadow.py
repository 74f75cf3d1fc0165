"""Comparing a candidate's answer with the one the client got (shadow traffic), pure.

Two answers agree when they have the same shape — the same keys, the same list lengths, the
same strings, booleans and nulls — and every pair of numbers differs by at most `tolerance`
(absolute). `distance` is the largest numeric difference found (0.0 when there are no
numbers), or None when the shapes differ: then no distance means anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MAX_DEPTH = 64  # answers nested deeper are compared as unequal (no unbounded recursion)


@dataclass(frozen=True, slots=True)
class Comparison:
    same: bool
    distance: float | None  # the largest numeric difference; None when the shapes differ


def compare(a: Any, b: Any, tolerance: float) -> Comparison:
    distance = _distance(a, b, 0)
    if distance is None:
        return Comparison(False, None)
    return Comparison(distance <= tolerance, distance)


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _distance(a: Any, b: Any, depth: int) -> float | None:
    if depth > MAX_DEPTH:
        return None
    if _number(a) and _number(b):
        if math.isnan(a) or math.isnan(b):
            return 0.0 if math.isnan(a) and math.isnan(b) else math.inf
        return abs(float(a) - float(b))
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return None
        return _most(_distance(a[k], b[k], depth + 1) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return None
        return _most((_distance(x, y, depth + 1) for x, y in zip(a, b, strict=True)))
    if type(a) is type(b) and a == b:
        return 0.0
    return None


def _most(distances: Any) -> float | None:
    worst = 0.0
    for d in distances:
        if d is None:
            return None
        worst = max(worst, d)
    return worst
