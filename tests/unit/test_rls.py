"""policies/rls.py: recursive least squares with forgetting, and its wind-up guard."""

from __future__ import annotations

import random

import pytest

from steadyserve.policies.rls import Rls


def test_recovers_a_linear_model_from_noisy_samples():
    rng = random.Random(7)
    fit = Rls(3)
    for _ in range(400):
        size, outstanding = rng.uniform(0, 10), rng.randint(0, 6)
        fit.update((1.0, size, outstanding), 0.02 + 0.003 * size + 0.015 * outstanding
                   + rng.gauss(0, 0.0005))
    assert fit.theta == pytest.approx([0.02, 0.003, 0.015], abs=0.001)
    assert fit.samples == 400


def test_forgets_a_replica_that_slowed_down_within_a_few_hundred_samples():
    rng = random.Random(8)
    fit = Rls(2, forgetting=0.99)
    for _ in range(500):
        o = rng.randint(0, 4)
        fit.update((1.0, o), 0.01 + 0.01 * o)
    for _ in range(500):  # now three times slower
        o = rng.randint(0, 4)
        fit.update((1.0, o), 0.03 + 0.03 * o)
    assert fit.theta == pytest.approx([0.03, 0.03], abs=0.002)


def test_a_direction_never_excited_does_not_wind_up():
    # every request the same size: P's size direction would grow by 1/0.99 per sample
    rng = random.Random(9)
    fit = Rls(3, forgetting=0.99, max_trace=1e4)
    for _ in range(20_000):
        o = rng.randint(0, 5)
        fit.update((1.0, 1.0, o), 0.02 + 0.01 * o)
        assert sum(fit.p[i][i] for i in range(3)) <= 1e4 * 1.5
    # one odd sample does not throw the prediction for normal requests off
    fit.update((1.0, 50.0, 0), 0.5)
    assert fit.predict((1.0, 1.0, 2)) == pytest.approx(0.04, abs=0.02)


@pytest.mark.parametrize("forgetting", [0.0, -0.5, 1.5])
def test_forgetting_out_of_range_is_refused(forgetting):
    with pytest.raises(ValueError, match="forgetting"):
        Rls(2, forgetting=forgetting)
