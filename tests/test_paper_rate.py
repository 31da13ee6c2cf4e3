"""The O(1/t) fit of recipes/paper/convex.py: it finds the rate where theory guarantees it."""

from __future__ import annotations

import sys
from pathlib import Path

# recipes/paper's scripts import each other as top-level modules.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes" / "paper"))

import math

import convex
import numpy as np
import pytest


@pytest.fixture(scope="module")
def lsq() -> convex.Problem:
    return convex.load_problem("lsq")


def _mean_curve(
    prob: convex.Problem, method: str, lr: float, schedule: str, steps: int
) -> tuple[list[int], list[float]]:
    runs = [convex.run(prob, method, {"lr": lr}, schedule=schedule, steps=steps, seed=s) for s in range(1, 6)]
    assert not any(r["diverged"] for r in runs)
    return runs[0]["steps"], np.mean([r["subopt"] for r in runs], axis=0).tolist()


def test_fit_rate_recovers_the_exponent_of_an_exact_power_law():
    t0 = 50
    steps = list(range(0, 2001, 10))
    for p in (0.5, 1.0, 2.0):
        assert convex.fit_rate(steps, [3.0 * (s + t0) ** -p for s in steps], t0) == pytest.approx(p, rel=1e-6)


def test_optimum_is_stationary_to_high_precision(lsq):
    assert float(lsq.grad(lsq.w_star).norm()) < 1e-10
    logreg = convex.load_problem("logreg")
    assert float(logreg.grad(logreg.w_star).norm()) < 1e-10


def test_sgd_with_a_one_over_t_step_converges_at_rate_one_over_t_on_least_squares(lsq):
    # λ-strongly convex (μ ≥ 0.1) and η_t = η₀ t₀/(t₀+t) with η₀ t₀ μ = 0.1·100·0.1 > 1: E[F−F*] = O(1/t).
    steps = 2000
    s, mean = _mean_curve(lsq, "sgd", 0.1, "diminishing", steps)
    p = convex.fit_rate(s, mean, steps // 20)
    assert 0.8 <= p <= 1.3, p


def test_constant_step_sgd_plateaus_instead_of_decaying_like_one_over_t(lsq):
    steps = 2000
    s, mean = _mean_curve(lsq, "sgd", 0.1, "constant", steps)
    p = convex.fit_rate(s, mean, steps // 20)
    assert math.isfinite(p) and p < 0.5, p
