"""The step's options beyond the paper's: Adam's intercept schedule and the estimator's look-ahead.

* ``beta_warmup="adam"``: :math:`\\beta_t = \\beta/(1-(1-\\beta)^t)`, Adam's bias correction as
  an intercept rate (with ``estimator="none"`` the optimizer is AdamW);
* ``nesterov=True``: the step along :math:`\\hat G + \\beta_t (g - \\hat G)`, the estimator's look-ahead;
  ``nesterov=λ``: along :math:`\\hat G + \\lambda (g - \\hat G)`, a fixed look-ahead weight.
"""

from __future__ import annotations

import pytest
import torch

from hf_to import ReferenceTrainableOptimizer, TrainableOptimizer
from hf_to.forms import intercept_rate

FORMS = {
    "adam_warmup_diagonal": {"beta_warmup": "adam"},
    "adam_warmup_rank_one": {"estimator": "rank_one", "beta_warmup": "adam"},
    "adam_warmup_none": {"estimator": "none", "beta_warmup": "adam"},
    "nesterov_diagonal": {"nesterov": True},
    "nesterov_rank_one": {"estimator": "rank_one", "nesterov": True, "weight_decay": 0.1},
    "nesterov_none": {"estimator": "none", "nesterov": True},
    "nesterov_paper": {"nesterov": True, "preconditioner": "none", "alpha_scaling": "none", "beta_warmup": False},
    "lookahead_diagonal": {"nesterov": 0.55, "weight_decay": 0.1},
    "lookahead_rank_one": {"estimator": "rank_one", "nesterov": 0.3},
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


@pytest.mark.parametrize("lookahead", [True, 0.55])
def test_estimator_none_with_nesterov_is_adamw_stepping_one_ema_step_ahead(lookahead):
    """The default's look-ahead with A ≡ 0: Adam's bias-corrected m̂_t, moved once more towards
    g_t at the same rate, β_t = (1−β₁)/(1−β₁^t), divided by √v̂_t + ε (float64, by hand); with
    ``nesterov=λ`` moved by λ instead, (1−λ) m̂_t + λ g_t."""
    beta1, beta2, eps, lr, wd = 0.9, 0.999, 1e-8, 0.01, 0.1
    w0 = torch.randn(5, 3, dtype=torch.float64)
    p_to = torch.nn.Parameter(w0.clone())
    to = TrainableOptimizer(
        [p_to], lr=lr, estimator="none", beta=1 - beta1, weight_decay=wd, nesterov=lookahead
    )  # defaults otherwise
    w, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    gen = torch.Generator().manual_seed(0)
    for t in range(1, 101):
        g = torch.randn(5, 3, generator=gen, dtype=torch.float64)
        p_to.grad = g.clone()
        to.step()
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat, rate = m / (1 - beta1**t), (1 - beta1) / (1 - beta1**t)
        d = m_hat + (rate if lookahead is True else lookahead) * (g - m_hat)
        w = w * (1 - lr * wd) - lr * d / ((v / (1 - beta2**t)).sqrt() + eps)
    torch.testing.assert_close(p_to.detach(), w, rtol=0, atol=1e-12)


def test_intercept_rates_of_the_three_schedules():
    assert [intercept_rate(0.1, t, False) for t in (1, 2)] == [0.1, 0.1]
    assert [intercept_rate(0.1, t, True) for t in (1, 2, 20)] == [1.0, 0.5, 0.1]
    adam = [intercept_rate(0.1, t, "adam") for t in (1, 2, 10, 200)]
    assert adam[0] == pytest.approx(1.0) and adam[1] == pytest.approx(0.1 / 0.19)
    assert adam[2] == pytest.approx(0.1 / (1 - 0.9**10)) and adam[3] == pytest.approx(0.1, rel=1e-6)


def _resume_problem() -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Two tensors' starting weights and ten steps of their gradients."""
    torch.manual_seed(0)
    w0 = [torch.randn(64, 48), torch.randn(48)]
    gen = torch.Generator().manual_seed(2)
    return w0, [[torch.randn(64, 48, generator=gen), torch.randn(48, generator=gen)] for _ in range(10)]


def steps(opt, ps, gs):
    """One optimizer step per list of gradients in ``gs``."""
    for g in gs:
        for p, gi in zip(ps, g):
            p.grad = gi.clone()
        opt.step()


@pytest.mark.parametrize(
    ("written_with", "resumed_with"),
    [
        ({"beta_warmup": True, "nesterov": False}, {"beta_warmup": "adam", "nesterov": True}),
        ({"beta_warmup": "adam", "nesterov": True}, {"beta_warmup": True, "nesterov": False}),
        # the default of 2026-11-30 to 2026-12-06 (λ = β_t), resumed by today's defaults (λ = 0.55),
        # as a Trainer resuming with --optim trainable_to builds the optimizer
        ({"nesterov": True}, {}),
    ],
)
def test_checkpoint_resumes_exactly_under_another_default_form(written_with, resumed_with):
    """A checkpoint carries its groups' hyperparameters: an optimizer constructed with other
    beta_warmup / nesterov values (e.g. a later default) continues the saved form exactly."""
    w0, grads = _resume_problem()
    ps = [torch.nn.Parameter(w.clone()) for w in w0]
    straight = TrainableOptimizer(ps, lr=0.01, **written_with)
    steps(straight, ps, grads)

    qs = [torch.nn.Parameter(w.clone()) for w in w0]
    first = TrainableOptimizer(qs, lr=0.01, **written_with)
    steps(first, qs, grads[:4])
    saved, at_checkpoint = first.state_dict(), [q.detach().clone() for q in qs]
    resumed = TrainableOptimizer(qs, lr=0.01, **resumed_with)
    constructed = {k: resumed.param_groups[0][k] for k in ("beta_warmup", "nesterov")}
    resumed.load_state_dict(saved)
    steps(resumed, qs, grads[4:])
    for a, b in zip(ps, qs):
        assert torch.equal(a, b)
    # The constructor's form is another step: had its values won, the weights would differ.
    rs = [torch.nn.Parameter(w.clone()) for w in at_checkpoint]
    other = TrainableOptimizer(rs, lr=0.01)
    other.load_state_dict(saved)
    other.param_groups[0].update(constructed)
    steps(other, rs, grads[4:])
    assert not torch.equal(rs[0], qs[0])


#: The default of 2026-12-06 (diagonal estimator, look-ahead 0.55), written out.
DIAGONAL_DEFAULT = {"estimator": "diagonal", "beta_warmup": "adam", "nesterov": 0.55}


def test_checkpoint_of_the_diagonal_default_resumes_exactly_under_todays_defaults():
    """A Trainer resuming with ``--optim trainable_to`` builds the optimizer with the defaults of
    its day: a checkpoint of the diagonal default continues with its estimator and state, bit for
    bit; an estimator the user chose must still match the checkpoint's."""
    w0, grads = _resume_problem()
    ps = [torch.nn.Parameter(w.clone()) for w in w0]
    steps(TrainableOptimizer(ps, lr=0.01, **DIAGONAL_DEFAULT), ps, grads)
    qs = [torch.nn.Parameter(w.clone()) for w in w0]
    first = TrainableOptimizer(qs, lr=0.01, **DIAGONAL_DEFAULT)
    steps(first, qs, grads[:4])
    saved = first.state_dict()
    resumed = TrainableOptimizer(qs, lr=0.01)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["estimator"] == "diagonal" and "a" in resumed.state[qs[0]]
    steps(resumed, qs, grads[4:])
    for a, b in zip(ps, qs):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"estimator='diagonal'.*estimator='rank_one'"):
        TrainableOptimizer(qs, lr=0.01, estimator="rank_one").load_state_dict(saved)
    # only the estimator follows the checkpoint: another preconditioner still raises
    plain = TrainableOptimizer(qs, lr=0.01, preconditioner="none")
    steps(plain, qs, grads[:1])
    with pytest.raises(ValueError, match=r"preconditioner='none'.*preconditioner='adam'"):
        TrainableOptimizer(qs, lr=0.01).load_state_dict(plain.state_dict())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta_warmup": "bias"}, "Invalid beta_warmup"),
        ({"alpha": 2.0}, "Invalid alpha"),
        ({"alpha": 5.0, "estimator": "rank_one"}, "Invalid alpha"),
        ({"diagnostics": "no"}, "Invalid diagnostics"),
        ({"fused": "yes"}, "Invalid fused"),
        ({"capturable": "false"}, "Invalid capturable"),
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
    """``hf_to.trainable_to`` is the class's math with the class's defaults: both read them from
    :class:`hf_to.StepConfig` (a default changed in one place only would make the functional API
    step another form), and a functional step with no keywords equals the default optimizer's."""
    import dataclasses
    import inspect

    from hf_to import StepConfig, trainable_to

    cls = inspect.signature(TrainableOptimizer).parameters
    assert {f.name: f.default for f in dataclasses.fields(StepConfig)} == {
        k: cls[k].default for k in cls if k not in ("params", "diagnostics")
    }
    torch.manual_seed(0)
    w0, grads = torch.randn(6, 4), [torch.randn(6, 4) for _ in range(5)]
    p, q = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt, state = TrainableOptimizer([p], fused=False), None
    for g in grads:
        p.grad = g.clone()
        opt.step()
        if state is None:
            state = {"step": torch.tensor(0.0), "b": torch.zeros(6, 4), "a": torch.zeros(6, 4)}
            state["exp_avg_sq"] = torch.zeros(6, 4)
        with torch.no_grad():
            trainable_to([q], [g.clone()], [state], fused=False)
    assert torch.equal(p, q)


def test_a_checkpoint_of_the_retired_displacement_form_is_refused_by_name():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = TrainableOptimizer([p])
    saved = opt.state_dict()
    saved["param_groups"][0].update(slope_input="displacement", anchor_rate=0.1)
    with pytest.raises(ValueError, match="slope_input='displacement'"):
        TrainableOptimizer([p]).load_state_dict(saved)
    saved["param_groups"][0]["slope_input"] = "weights"  # the other forms' checkpoints load
    opt = TrainableOptimizer([p])
    opt.load_state_dict(saved)
    assert "slope_input" not in opt.param_groups[0] and "anchor_rate" not in opt.param_groups[0]


@pytest.mark.parametrize("estimator", ["diagonal", "rank_one", "full"])
def test_the_largest_accepted_slope_rate_keeps_least_squares_finite(estimator):
    """α just below the refused bound of the normalised step (2) stays finite on least squares,
    where α = 5 (refused now) went to inf/nan within ~30 steps."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=gen), torch.randn(64, generator=gen)
    w = torch.nn.Parameter(torch.zeros(8))
    opt = TrainableOptimizer([w], lr=0.01, estimator=estimator, alpha=1.99)
    for _ in range(300):
        idx = torch.randint(0, 64, (8,), generator=gen)
        w.grad = None
        ((x[idx] @ w - y[idx]) ** 2).mean().backward()
        opt.step()
    assert torch.isfinite(w).all() and all(torch.isfinite(v).all() for v in opt.state[w].values())
