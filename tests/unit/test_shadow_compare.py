"""Comparing a shadow's answer with the client's: same shape, numbers within a tolerance."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest

from steadyserve.policies.shadow import compare


@pytest.mark.parametrize(("a", "b", "same", "distance"), [
    ({"score": 0.5, "decision": "ok"}, {"score": 0.5, "decision": "ok"}, True, 0.0),
    ({"score": 0.5}, {"score": 0.5000001}, True, pytest.approx(1e-7)),
    ({"score": 0.5}, {"score": 0.6}, False, pytest.approx(0.1)),
    ([0.1, 0.2], [0.1, 0.25], False, pytest.approx(0.05)),
    ({"decision": "ok"}, {"decision": "fraud"}, False, None),
    ({"a": 1}, {"b": 1}, False, None),
    ([1, 2], [1, 2, 3], False, None),
    (1, True, False, None),  # a boolean is not the number 1
    (None, None, True, 0.0),
    ("x", "x", True, 0.0),
    (float("nan"), float("nan"), True, 0.0),
    (float("nan"), 1.0, False, math.inf),
    ({"v": [[1.0, 2.0]]}, {"v": [[1.0, 2.0]]}, True, 0.0),
])
def test_compare(a: Any, b: Any, same: bool, distance: Any) -> None:
    got = compare(a, b, tolerance=1e-6)
    assert got.same is same and got.distance == distance


def test_very_deep_answers_are_unequal_not_a_crash() -> None:
    deep: Any = 1
    for _ in range(200):
        deep = [deep]
    assert compare(deep, deep, 0.0).same is False


@pytest.mark.parametrize(("shadow", "changes", "message"), [
    ("nope", {}, "shadow 'nope' is not a configured deployment"),
    ("risk", {}, "shadow must name another deployment"),
    ("next", {"shadow_share": 1.5}, "shadow_share in [0, 1]"),
    ("next", {"shadow_max_inflight": 0}, "shadow_max_inflight >= 1"),
])
def test_a_shadow_must_be_another_configured_deployment(shadow: str, changes: dict[str, Any],
                                                       message: str) -> None:
    from steadyserve.config import Config, DeploymentConfig
    from steadyserve.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        Config(deployments=(DeploymentConfig(name="risk", service="a.py:A", shadow=shadow,
                                             **changes),
                            DeploymentConfig(name="next", service="b.py:B")))
