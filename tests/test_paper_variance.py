"""Reading TO's estimate Ĝ_t back from the state, as recipes/paper/convex.py does."""

from __future__ import annotations

import sys
from pathlib import Path

# recipes/paper's scripts import each other as top-level modules.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes" / "paper"))

import pytest
import torch
from common import estimate_from_state

from hf_to import TrainableOptimizer
from hf_to.registry import PAPER_LITERAL

ESTIMATORS = ("full", "diagonal", "rank_one", "none")


def _quadratic_steps(opt: torch.optim.Optimizer, w: torch.Tensor, steps: int, check) -> None:
    gen = torch.Generator().manual_seed(0)
    H = torch.diag(torch.linspace(0.5, 2.0, w.numel(), dtype=w.dtype))
    for _ in range(steps):
        noise = 0.1 * torch.randn(w.numel(), generator=gen, dtype=w.dtype)
        w.grad = H @ w.detach() + noise
        before = w.detach().clone()
        opt.step()
        check(before)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_paper_literal_step_moves_the_weights_along_the_estimate_read_from_the_state(estimator):
    lr = 0.05
    w = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 12, dtype=torch.float64))
    opt = TrainableOptimizer([w], lr=lr, estimator=estimator, alpha=0.01, beta=0.2, **PAPER_LITERAL)

    def check(before: torch.Tensor) -> None:
        g_hat = estimate_from_state(opt, w, before)
        torch.testing.assert_close(w.detach(), before - lr * g_hat, rtol=1e-12, atol=1e-12)

    _quadratic_steps(opt, w, 25, check)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_estimate_read_from_the_state_equals_the_optimizers_own_gradient_estimate(estimator):
    if not hasattr(TrainableOptimizer, "gradient_estimate"):
        pytest.skip("this hf_to has no TrainableOptimizer.gradient_estimate to compare with")
    w = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 12, dtype=torch.float64))
    opt = TrainableOptimizer([w], lr=0.01, estimator=estimator)

    def check(before: torch.Tensor) -> None:
        ours = estimate_from_state(opt, w, before)
        theirs = opt.gradient_estimate(w, before).reshape(-1)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)

    _quadratic_steps(opt, w, 10, check)
