"""``tune_beta``: the intercept rate trained on the loss (hf_to.tuning) against its prototype."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes" / "experiments"))

import tangent_beta  # the prototype: the reference the keyword is tested against

from hf_to import TrainableOptimizer, tuning

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _params(dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(13, 9).to(dtype)), torch.nn.Parameter(torch.randn(9).to(dtype))]


def _grads(params, t: int, gen: torch.Generator) -> None:
    """Gradients whose noise changes regime every 20 steps, so that β moves both ways."""
    for p in params:
        noise = 0.3 if t % 40 < 20 else 0.01
        p.grad = (p.detach().float() * 0.5 + noise * torch.randn(p.shape, generator=gen)).to(p.dtype)


def _train(params, opt, steps: range, gen: torch.Generator) -> list[float]:
    betas = []
    for t in steps:
        _grads(params, t, gen)
        opt.step()
        betas.append(opt.param_groups[0]["beta"])
    return betas


FORMS = {
    "folded": {},
    "folded_raw_alpha": {"alpha_scaling": "none", "alpha": 0.05},
    "diagonal": {"estimator": "diagonal"},
    "none": {"estimator": "none", "nesterov": True},
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("fused", [False, None], ids=["readable", "fast"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_keyword_equals_the_prototype_over_50_steps(dtype, fused, form, monkeypatch):
    """The keyword on each path equals the prototype's hooks on the readable path, with fewer
    samples than elements (a stride of 2 on the weight, 1 on the bias)."""
    monkeypatch.setattr(tuning, "group_stride", lambda group: 2)
    runs = []
    for keyword in (True, False):
        params = _params(dtype)
        opt = TrainableOptimizer(
            params,
            lr=1e-2,
            weight_decay=0.01,
            fused=fused if keyword else False,
            tune_beta=1.0 if keyword else 0.0,
            **FORMS[form],
        )
        if not keyword:
            tangent_beta.TangentBeta(1.0, mus=(tuning.DISCOUNT,), stride=2).attach(opt)
        betas = _train(params, opt, range(50), torch.Generator().manual_seed(1))
        runs.append(([p.detach().float() for p in params], betas))
    (mine, my_betas), (ref, ref_betas) = runs
    assert max(abs(a - b) for a, b in zip(my_betas, ref_betas)) <= 1e-6
    assert len(set(my_betas)) > 10, "β moved"
    # the keyword sums over the group in another order than the prototype (a batched reduction)
    tol = {"rtol": 2e-6, "atol": 1e-7} if fused is False and dtype == torch.float32 else {"rtol": 1e-5, "atol": 1e-6}
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("fused", [False, None], ids=["readable", "fast"])
def test_resumes_exactly_from_a_state_dict(fused):
    params = _params()
    opt = TrainableOptimizer(params, lr=1e-2, tune_beta=1.0, fused=fused)
    gen = torch.Generator().manual_seed(1)
    _train(params, opt, range(20), gen)
    saved_params = [p.detach().clone() for p in params]
    saved = copy.deepcopy(opt.state_dict())
    saved_gen = gen.get_state()
    assert set(tuning.STATE_KEYS) <= set(saved["state"][0])
    whole = _train(params, opt, range(20, 50), gen)
    straight = [p.detach().clone() for p in params]

    resumed_params = [torch.nn.Parameter(p.clone()) for p in saved_params]
    fresh = TrainableOptimizer(resumed_params, lr=1e-2, tune_beta=1.0, fused=fused)
    fresh.load_state_dict(saved)
    gen.set_state(saved_gen)
    again = _train(resumed_params, fresh, range(20, 50), gen)
    assert again == whole
    for a, b in zip(resumed_params, straight):
        assert torch.equal(a.detach(), b)


def test_a_checkpoint_before_the_keyword_resumes_with_beta_fixed():
    params = _params()
    opt = TrainableOptimizer(params, lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    _train(params, opt, range(5), gen)
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        del group["tune_beta"]
    fresh = TrainableOptimizer([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2)
    fresh.load_state_dict(old)
    assert fresh.param_groups[0]["tune_beta"] == 0.0
    assert _train(list(fresh.param_groups[0]["params"]), fresh, range(5, 15), gen) == [0.1] * 10


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf"), True, "1"])
def test_invalid_values_are_refused_by_name(value):
    with pytest.raises(ValueError, match="tune_beta"):
        TrainableOptimizer(_params(), tune_beta=value)


def test_refused_with_capturable():
    with pytest.raises(ValueError, match=r"tune_beta.*capturable"):
        TrainableOptimizer(_params(), tune_beta=1.0, capturable=True)


def test_off_by_default_and_then_no_tangent_state():
    params = _params()
    opt = TrainableOptimizer(params, lr=1e-2)
    _train(params, opt, range(3), torch.Generator().manual_seed(1))
    assert opt.param_groups[0]["beta"] == 0.1
    assert not set(tuning.STATE_KEYS) & set(opt.state[params[0]])


def test_state_is_one_value_in_64_per_tensor_in_a_large_group_and_more_in_a_small_one():
    """Two float32 values per 64 parameters (0.125 bytes per parameter) where the group holds
    64 × SAMPLES values or more; a smaller group keeps about SAMPLES samples."""
    for rows, stride in ((4096, 64), (300, 4)):
        params = [torch.nn.Parameter(torch.zeros(rows, 64)), torch.nn.Parameter(torch.zeros(65))]
        assert tuning.group_stride({"params": params}) == stride
        opt = TrainableOptimizer(params, lr=1e-2, tune_beta=1.0)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        for p in params:
            assert all(opt.state[p][k].numel() == -(-p.numel() // stride) for k in tuning.STATE_KEYS)


def test_tangents_of_another_layout_restart_from_zero():
    """A checkpoint whose tangents have other lengths (the per-tensor cap of the keyword's first
    version) resumes with β kept and the tangents restarted, not a shape error."""
    params = _params()
    opt = TrainableOptimizer(params, lr=1e-2, tune_beta=1.0)
    _train(params, opt, range(5), torch.Generator().manual_seed(1))
    saved = copy.deepcopy(opt.state_dict())
    for state in saved["state"].values():
        for k in tuning.STATE_KEYS:
            state[k] = torch.ones(3)
    fresh = TrainableOptimizer(params, lr=1e-2, tune_beta=1.0)
    fresh.load_state_dict(saved)
    _train(params, fresh, range(5, 7), torch.Generator().manual_seed(2))
    for p in params:
        assert all(fresh.state[p][k].numel() == -(-p.numel() // 1) for k in tuning.STATE_KEYS)
        assert torch.isfinite(fresh.state[p][tuning.STATE_KEYS[1]]).all()


@pytest.mark.parametrize("fused", [False, None], ids=["readable", "fast"])
def test_beta_stays_in_range_under_adversarial_gradients(fused):
    """Huge, tiny, sign-flipping and non-finite gradients with κ = 50: β stays finite and in range."""
    p = torch.nn.Parameter(torch.zeros(64))
    opt = TrainableOptimizer([p], lr=0.1, tune_beta=50.0, fused=fused)
    gen = torch.Generator().manual_seed(0)
    seen = []
    for t in range(80):
        g = (1e6 if t % 7 else 1e-6) * torch.randn(64, generator=gen) * (-1) ** (t // 5)
        if t % 11 == 3:
            g[::5] = float("nan")
            g[1] = float("inf")
        p.grad = g
        opt.step()
        beta = opt.param_groups[0]["beta"]
        assert math.isfinite(beta) and tuning.BETA_RANGE[0] <= beta <= tuning.BETA_RANGE[1]
        seen.append(beta)
        assert all(torch.isfinite(opt.state[p][k]).all() for k in tuning.STATE_KEYS)
    assert min(seen) < 0.03 or max(seen) > 0.5, "κ = 50 drives β to an edge"


def _quadratic(kind: str, tune: float, beta: float = 0.1, steps: int = 400) -> tuple[float, float]:
    """Mean loss over the second half and the final β on ½‖w − w*‖²_H: ``drift`` (w* a random
    walk under little noise: light memory trains faster) or ``noisy`` (fixed w*, curvatures
    0.01…10, noise σ = 1: heavy memory does)."""
    n = 200
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(n))
    opt = TrainableOptimizer([p], lr=0.05 if kind == "noisy" else 0.02, beta=beta, tune_beta=tune)
    h = torch.logspace(-2, 1, n) if kind == "noisy" else torch.ones(n)
    star, losses = torch.randn(n, generator=gen), []
    for _ in range(steps):
        if kind == "drift":
            star += 0.05 * torch.randn(n, generator=gen)
        d = p.detach() - star
        losses.append(0.5 * float(h * d @ d) / n)
        p.grad = h * d + (1.0 if kind == "noisy" else 0.1) * torch.randn(n, generator=gen)
        opt.step()
    return sum(losses[steps // 2 :]) / (steps - steps // 2), opt.param_groups[0]["beta"]


@pytest.mark.parametrize("kind,best", [("drift", "high"), ("noisy", "low")])
def test_beta_moves_toward_each_problems_best_rate(kind, best):
    """The mechanism: each problem's fixed-β sweep says which side trains faster, and the tuned β
    goes there from 0.1 (light memory where the optimum drifts, heavy where noise dominates)."""
    low, high = _quadratic(kind, 0.0, beta=0.02)[0], _quadratic(kind, 0.0, beta=0.6)[0]
    assert (high < low) == (best == "high"), (low, high)
    beta = _quadratic(kind, 1.0)[1]
    assert beta > 0.3 if best == "high" else beta < 0.05, beta


def test_each_param_group_tunes_its_own_beta():
    """A group on the drifting problem and one on the noisy problem, in one optimizer."""
    n = 100
    gen = torch.Generator().manual_seed(0)
    drift, noisy = torch.nn.Parameter(torch.zeros(n)), torch.nn.Parameter(torch.zeros(n))
    opt = TrainableOptimizer([{"params": [drift], "lr": 0.02}, {"params": [noisy], "lr": 0.05}], tune_beta=1.0)
    star_d, star_n = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    h = torch.logspace(-2, 1, n)
    for _ in range(400):
        star_d += 0.05 * torch.randn(n, generator=gen)
        drift.grad = drift.detach() - star_d + 0.1 * torch.randn(n, generator=gen)
        noisy.grad = h * (noisy.detach() - star_n) + torch.randn(n, generator=gen)
        opt.step()
    assert opt.param_groups[0]["beta"] > 0.3 > 0.05 > opt.param_groups[1]["beta"]


def test_the_functional_step_and_the_reference_refuse_it():
    """They take β as given: a tuned rate needs the optimizer's param group to keep it."""
    from hf_to import ReferenceTrainableOptimizer, trainable_to

    params = _params()
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="tune_beta"):
        trainable_to(params, [p.grad for p in params], [{} for _ in params], tune_beta=1.0)
    with pytest.raises(ValueError, match="tune_beta"):
        ReferenceTrainableOptimizer(params, tune_beta=1.0).step()


@pytest.mark.parametrize("estimator", ["folded", "none", "diagonal", "rank_one"])
@pytest.mark.parametrize("normalize", [True, False])
def test_the_tangents_rate_is_the_rate_of_the_forms_own_step(estimator, normalize):
    """``unit_residual_rate`` k: each form's step with its slope state at 0 moves the intercept
    by b' = b − k ⊙ (b − g) for any b, g (so the tangent of b uses the step's own rate)."""
    from hf_to.forms import get_form, unit_residual_rate

    gen = torch.Generator().manual_seed(0)
    w, b, g = (torch.randn(64, generator=gen) for _ in range(3))
    w_ms, zero = float(w.square().mean()), torch.zeros(64)
    rates = {"alpha": 0.7, "floor": 1e-3, "beta_t": 0.13, "normalize": normalize}
    form = get_form(estimator)
    k = unit_residual_rate(form, w, w_ms, **rates)
    b_new = form.step(w, g, b, zero, zero, w_ms, 0.0, 0.0, 0.0, 0.0, 1.0, *rates.values())[3]
    torch.testing.assert_close(b_new, b - k * (b - g))
    if estimator == "folded":
        assert float((k - rates["beta_t"]).abs().max()) > 0.1, "the slope raises the folded rate"
    else:
        torch.testing.assert_close(k, torch.full_like(w, rates["beta_t"]))


def test_an_empty_tensor_in_the_group_changes_nothing():
    """A zero-element parameter (0 samples, 0 mean square) tunes as if it were not there."""
    runs = []
    for with_empty in (False, True):
        params = _params()
        extra = [torch.nn.Parameter(torch.zeros(0, 4))] if with_empty else []
        opt = TrainableOptimizer([params[0], *extra, params[1]], lr=1e-2, tune_beta=1.0)
        gen = torch.Generator().manual_seed(1)
        betas = []
        for t in range(20):
            _grads(params, t, gen)
            for p in extra:
                p.grad = torch.zeros_like(p)
            opt.step()
            betas.append(opt.param_groups[0]["beta"])
        runs.append((betas, [p.detach().clone() for p in params]))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-12, abs=0)
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
