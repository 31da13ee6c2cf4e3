"""Every registered variant builds, trains and round-trips; a new entry is tested for free."""

from __future__ import annotations

import pytest
import torch

from hf_to import VARIANTS, TrainableOptimizer, load_optimizer
from hf_to.registry import PAPER_LITERAL


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_lowers_a_least_squares_loss(name):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=gen), torch.randn(64, 1, generator=gen)
    model = torch.nn.Linear(5, 1)
    lr = 0.05 if "paper" in name else 0.02
    opt = load_optimizer(name)(model.parameters(), lr=lr)
    assert isinstance(opt, TrainableOptimizer)
    for key, value in VARIANTS[name].items():
        assert opt.param_groups[0][key] == value
    loss = lambda: (model(x) - y).pow(2).mean()  # noqa: E731
    first = loss().item()
    for _ in range(100):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.9 * first


def test_paper_variants_are_the_paper_literal_form():
    for estimator in ("diagonal", "rank_one", "full", "none"):
        assert VARIANTS[f"to_paper_{estimator}"] == {"estimator": estimator, **PAPER_LITERAL}


def test_unknown_variant_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown optimizer 'to_dense'.*to_diagonal"):
        load_optimizer("to_dense")


def test_variant_overrides_are_allowed():
    opt = load_optimizer("to_rank_one")([torch.nn.Parameter(torch.randn(3))], lr=0.1, alpha=0.3)
    assert opt.param_groups[0]["estimator"] == "rank_one" and opt.param_groups[0]["alpha"] == 0.3
