"""recipes/experiments: prototypes that were measured and not kept stay runnable and correct."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes" / "experiments"))

import online_alpha  # a broken prototype fails here: never skipped

from hf_to import TrainableOptimizer
from hf_to.forms import FORMS


def _run(estimator: str, steps: int = 12) -> list[torch.Tensor]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(7, 5) * 0.1), torch.nn.Parameter(torch.randn(5))]
    opt = TrainableOptimizer(params, lr=1e-2, estimator=estimator, fused=False)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = p.detach() * 0.5 + torch.randn(p.shape, generator=gen) * 0.1
        opt.step()
    return [p.detach().clone() for p in params]


def test_online_alpha_without_adaptation_is_the_diagonal_form():
    try:
        online_alpha.register(kappa=0.0)
        for a, b in zip(_run(online_alpha.NAME), _run("diagonal")):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    finally:
        FORMS.pop(online_alpha.NAME, None)


def test_online_alpha_moves_the_rate_and_the_weights():
    try:
        est = online_alpha.register(kappa=0.5)
        moved = _run(online_alpha.NAME)
        assert any(abs(r - 0.1) > 1e-3 for r in est.rates.values()), "α adapts"
        assert any(not torch.allclose(a, b) for a, b in zip(moved, _run("diagonal")))
    finally:
        FORMS.pop(online_alpha.NAME, None)
