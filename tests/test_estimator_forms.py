"""The estimator forms beyond the paper's: the displacement-regressed slope and Adam's intercept schedule.

* ``slope_input="displacement"``: :math:`\\hat G(w) = a\\odot(w-\\bar w) + b`, the anchor
  :math:`\\bar w` an EMA of the weights (same model class as the paper's, reparametrised);
* ``beta_warmup="adam"``: :math:`\\beta_t = \\beta/(1-(1-\\beta)^t)`, Adam's bias correction as
  an intercept rate (with ``estimator="none"`` the optimizer is AdamW);
* ``nesterov=True``: the step along :math:`\\hat G + \\beta_t (g - \\hat G)`, the estimator's look-ahead.
"""

from __future__ import annotations

import io

import pytest
import torch

from hf_to import ReferenceTrainableOptimizer, TrainableOptimizer
from hf_to.estimators import intercept_rate

FORMS = {
    "displacement": {"slope_input": "displacement"},
    "displacement_adam": {"slope_input": "displacement", "beta_warmup": "adam", "weight_decay": 0.1},
    "displacement_paper_rates": {
        "slope_input": "displacement",
        "alpha_scaling": "none",
        "preconditioner": "none",
        "alpha": 0.01,
        "anchor_rate": 0.3,
    },
    "adam_warmup_diagonal": {"beta_warmup": "adam"},
    "adam_warmup_rank_one": {"estimator": "rank_one", "beta_warmup": "adam"},
    "adam_warmup_none": {"estimator": "none", "beta_warmup": "adam"},
    "nesterov_diagonal": {"nesterov": True},
    "nesterov_rank_one": {"estimator": "rank_one", "nesterov": True, "weight_decay": 0.1},
    "nesterov_none": {"estimator": "none", "nesterov": True},
    "nesterov_paper": {"nesterov": True, "preconditioner": "none", "alpha_scaling": "none", "beta_warmup": False},
}


def _quadratic_grads(params, hessians, step):
    gen = torch.Generator().manual_seed(step)
    for p, h in zip(params, hessians):
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        p.grad = ((h @ p.detach().double().reshape(-1)).reshape(p.shape) / 10 + noise).to(p.dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_form_equals_the_paper_literal_reference_over_60_steps(form, dtype):
    """The readable path against :mod:`hf_to.reference` (dense A), several groups, weight decay."""
    torch.manual_seed(0)
    shapes = [(5, 3), (7,), (1,)]
    w0 = [torch.randn(s, dtype=torch.float64).to(dtype) for s in shapes]
    hess = [torch.randn(x.numel(), x.numel(), dtype=torch.float64) for x in w0]
    hess = [h @ h.T for h in hess]

    def build(cls):
        ps = [torch.nn.Parameter(x.clone()) for x in w0]
        kw = {"estimator": "diagonal", **FORMS[form]}
        return ps, cls([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.02}], lr=0.01, **kw)

    ps_fast, fast = build(TrainableOptimizer)
    ps_ref, ref = build(ReferenceTrainableOptimizer)
    for t in range(60):
        _quadratic_grads(ps_fast, hess, t)
        _quadratic_grads(ps_ref, hess, t)
        fast.step()
        ref.step()
    # Low precision: the same fp32 state math, from parameters rounded alike; the NLMS slope of a
    # one-element tensor amplifies rounding differences, hence relative tolerances.
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    for a, b in zip(ps_fast, ps_ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        assert fast.state[a].keys() == ref.state[b].keys()
        for key in fast.state[a]:
            torch.testing.assert_close(fast.state[a][key], ref.state[b][key], rtol=tol, atol=tol)


def test_estimator_none_with_adam_warmup_is_adamw():
    """β_t = β/(1−(1−β)^t) is Adam's bias correction: TO with A ≡ 0 is then AdamW, to rounding."""
    w0 = torch.randn(5, 3, dtype=torch.float64)
    p_to, p_adamw = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    to = TrainableOptimizer(
        [p_to], lr=0.01, estimator="none", beta=0.1, beta_warmup="adam", weight_decay=0.1, nesterov=False
    )
    adamw = torch.optim.AdamW([p_adamw], lr=0.01, betas=(0.9, 0.999), weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        g = torch.randn(5, 3, generator=gen, dtype=torch.float64)
        p_to.grad, p_adamw.grad = g.clone(), g.clone()
        to.step()
        adamw.step()
    torch.testing.assert_close(p_to, p_adamw, rtol=0, atol=1e-12)


def test_estimator_none_with_nesterov_is_adamw_stepping_one_ema_step_ahead():
    """The default's look-ahead with A ≡ 0: Adam's bias-corrected m̂_t, moved once more towards
    g_t at the same rate, β_t = (1−β₁)/(1−β₁^t), divided by √v̂_t + ε (float64, by hand)."""
    beta1, beta2, eps, lr, wd = 0.9, 0.999, 1e-8, 0.01, 0.1
    w0 = torch.randn(5, 3, dtype=torch.float64)
    p_to = torch.nn.Parameter(w0.clone())
    to = TrainableOptimizer([p_to], lr=lr, estimator="none", beta=1 - beta1, weight_decay=wd)  # defaults otherwise
    w, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    gen = torch.Generator().manual_seed(0)
    for t in range(1, 101):
        g = torch.randn(5, 3, generator=gen, dtype=torch.float64)
        p_to.grad = g.clone()
        to.step()
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat, rate = m / (1 - beta1**t), (1 - beta1) / (1 - beta1**t)
        d = m_hat + rate * (g - m_hat)
        w = w * (1 - lr * wd) - lr * d / ((v / (1 - beta2**t)).sqrt() + eps)
    torch.testing.assert_close(p_to.detach(), w, rtol=0, atol=1e-12)


def test_intercept_rates_of_the_three_schedules():
    assert [intercept_rate(0.1, t, False) for t in (1, 2)] == [0.1, 0.1]
    assert [intercept_rate(0.1, t, True) for t in (1, 2, 20)] == [1.0, 0.5, 0.1]
    adam = [intercept_rate(0.1, t, "adam") for t in (1, 2, 10, 200)]
    assert adam[0] == pytest.approx(1.0) and adam[1] == pytest.approx(0.1 / 0.19)
    assert adam[2] == pytest.approx(0.1 / (1 - 0.9**10)) and adam[3] == pytest.approx(0.1, rel=1e-6)


def _track(slope_input: str, alpha: float, *, sigma: float, steps: int = 200, seed: int = 0):
    """Weights travel at a constant velocity through a diagonal quadratic; return the estimate's
    error relative to the noise, E‖Ĝ(w_t) − ∇F(w_t)‖² / E‖g_t − ∇F(w_t)‖², over the last half, and
    the final slope ``a``.  The optimizer's own step is switched off (lr=0): the test moves w."""
    gen = torch.Generator().manual_seed(seed)
    n = 2000
    h = 20 + 180 * torch.rand(n, generator=gen, dtype=torch.float64)  # curvatures 20-200
    w0 = 0.02 * torch.randn(n, generator=gen, dtype=torch.float64)
    velocity = 1e-4 * torch.randn(n, generator=gen, dtype=torch.float64).sign()
    p = torch.nn.Parameter(w0.clone())
    kw = {"estimator": "none"} if alpha == 0 else {"estimator": "diagonal", "slope_input": slope_input}
    opt = TrainableOptimizer([p], lr=0.0, alpha=alpha, beta=0.1, preconditioner="none", **kw)
    err = noise = 0.0
    for t in range(steps):
        w = w0 + t * velocity
        with torch.no_grad():
            p.copy_(w)
        true = h * w
        p.grad = true + sigma * torch.randn(n, generator=gen, dtype=torch.float64)
        opt.step()
        if t >= steps // 2:
            err += float((opt.gradient_estimate(p, w) - true).square().sum())
            noise += float((p.grad - true).square().sum())
    return err / noise, opt.state[p]["a"] if alpha else None, h


@pytest.mark.parametrize("sigma", [0.02, 0.2])
def test_displacement_slope_cuts_the_lag_error_of_momentum_and_of_the_weights_slope(sigma):
    """While weights move, EMA momentum lags (its error grows with the travel); the slope on the
    raw weights barely helps (w and 1 are nearly collinear); the slope on the displacement
    learns the gradient's change along the path and removes most of the lag."""
    ema, _, _ = _track("weights", 0.0, sigma=sigma)
    raw, _, _ = _track("weights", 0.1, sigma=sigma)
    disp, _, _ = _track("displacement", 0.1, sigma=sigma)
    assert disp < 0.5 * ema, (disp, raw, ema)
    assert disp < 0.5 * raw, (disp, raw, ema)


def test_displacement_slope_tracks_the_hessian_diagonal():
    """With little noise the learned a approaches the curvature h (g = h⊙w + noise)."""
    _, a, h = _track("displacement", 0.1, sigma=0.002, steps=400)
    corr = torch.corrcoef(torch.stack([a, h]))[0, 1]
    assert corr > 0.9, float(corr)


def test_displacement_state_roundtrip_resumes_bit_identically():
    def run(resume_at=None, steps=12):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        kw = {"lr": 0.01, "slope_input": "displacement", "beta_warmup": "adam"}
        opt = TrainableOptimizer(model.parameters(), **kw)
        gen = torch.Generator().manual_seed(1)
        for t in range(steps):
            if t == resume_at:
                buf = io.BytesIO()
                torch.save({"m": model.state_dict(), "o": opt.state_dict()}, buf)
                buf.seek(0)
                saved = torch.load(buf, weights_only=True)
                model = torch.nn.Linear(4, 3)
                model.load_state_dict(saved["m"])
                opt = TrainableOptimizer(model.parameters(), **kw)
                opt.load_state_dict(saved["o"])
            opt.zero_grad()
            model(torch.randn(8, 4, generator=gen)).square().mean().backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(), run(resume_at=5)):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "written_with",
    [
        {"estimator": "diagonal", "beta_warmup": True, "slope_input": "weights"},
        {"estimator": "diagonal", "slope_input": "displacement", "beta_warmup": "adam"},
    ],
)
def test_checkpoint_resumes_exactly_under_another_default_form(written_with):
    """A checkpoint carries its groups' hyperparameters: an optimizer constructed with other
    slope_input / beta_warmup values (e.g. a later default) continues the saved form exactly."""
    torch.manual_seed(0)
    w0 = [torch.randn(4, 3), torch.randn(3)]
    gen = torch.Generator().manual_seed(2)
    grads = [[torch.randn(4, 3, generator=gen), torch.randn(3, generator=gen)] for _ in range(10)]

    def steps(opt, ps, gs):
        for g in gs:
            for p, gi in zip(ps, g):
                p.grad = gi.clone()
            opt.step()

    ps = [torch.nn.Parameter(w.clone()) for w in w0]
    straight = TrainableOptimizer(ps, lr=0.01, **written_with)
    steps(straight, ps, grads)

    qs = [torch.nn.Parameter(w.clone()) for w in w0]
    first = TrainableOptimizer(qs, lr=0.01, **written_with)
    steps(first, qs, grads[:4])
    other = {
        "slope_input": "weights" if written_with["slope_input"] == "displacement" else "displacement",
        "beta_warmup": True if written_with["beta_warmup"] == "adam" else "adam",
    }
    resumed = TrainableOptimizer(qs, lr=0.01, estimator="diagonal", **other)
    resumed.load_state_dict(first.state_dict())
    steps(resumed, qs, grads[4:])
    for a, b in zip(ps, qs):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"slope_input": "anchor"}, "Invalid slope_input"),
        ({"slope_input": "displacement", "estimator": "rank_one"}, "Invalid slope_input"),
        ({"anchor_rate": 0.0}, "Invalid anchor_rate"),
        ({"anchor_rate": 1.5}, "Invalid anchor_rate"),
        ({"beta_warmup": "bias"}, "Invalid beta_warmup"),
        ({"beta_warmup": 1}, "Invalid beta_warmup"),
        ({"nesterov": 1}, "Invalid nesterov"),
    ],
)
def test_invalid_form_arguments_raise_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainableOptimizer([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_nesterov_steps_along_the_estimate_after_one_more_intercept_step():
    """One step, by hand: with A ≡ 0, no preconditioner and a constant β the direction is
    b₂ + β (g₂ − b₂), b₂ = b₁ + β (g₂ − b₁) and b₁ = g₁; without ``nesterov`` it is b₂."""
    g1, g2 = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5])
    beta, lr = 0.25, 0.1
    moved = {}
    for nesterov in (False, True):
        p = torch.nn.Parameter(torch.zeros(2))
        opt = TrainableOptimizer(
            [p], lr=lr, estimator="none", beta=beta, preconditioner="none", beta_warmup=False, nesterov=nesterov
        )
        for g in (g1, g2):
            p.grad = g.clone()
            opt.step()
        moved[nesterov] = p.detach().clone()
    b2 = g1 + beta * (g2 - g1)
    torch.testing.assert_close(moved[False], -lr * g1 - lr * b2)
    torch.testing.assert_close(moved[True], -lr * (g1 + beta * (g1 - g1)) - lr * (b2 + beta * (g2 - b2)))


def test_a_checkpoint_without_nesterov_resumes_without_it():
    """Checkpoints written before the keyword existed carry no ``nesterov``: they resume as
    they were written (the plain step), whatever the new optimizer was constructed with."""
    torch.manual_seed(0)
    w0 = torch.randn(4, 3)
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(4, 3, generator=gen) for _ in range(8)]
    p = torch.nn.Parameter(w0.clone())
    straight = TrainableOptimizer([p], lr=0.01, nesterov=False)  # what the old code did
    q = torch.nn.Parameter(w0.clone())
    first = TrainableOptimizer([q], lr=0.01, nesterov=False)
    for i, g in enumerate(grads):
        for x, o in ((p, straight), (q, first)):
            if i < 4 or o is straight:
                x.grad = g.clone()
                o.step()
    saved = first.state_dict()
    for group in saved["param_groups"]:
        del group["nesterov"]
    resumed = TrainableOptimizer([q], lr=0.01, nesterov=True)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["nesterov"] is False
    for g in grads[4:]:
        q.grad = g.clone()
        resumed.step()
    assert torch.equal(p, q)


def test_the_functional_step_has_the_optimizers_defaults():
    """``hf_to.trainable_to`` is the class's math: a keyword both take defaults alike (a default
    changed in one place only would make the functional API step another form)."""
    import inspect

    from hf_to import trainable_to

    cls = inspect.signature(TrainableOptimizer.__init__).parameters
    fun = inspect.signature(trainable_to).parameters
    shared = [k for k in fun if k in cls and fun[k].default is not inspect.Parameter.empty]
    assert {"beta_warmup", "nesterov", "slope_input", "norm_floor"} <= set(shared)
    assert {k: fun[k].default for k in shared} == {k: cls[k].default for k in shared}
