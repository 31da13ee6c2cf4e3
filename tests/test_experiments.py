"""recipes/experiments: prototypes that were measured and not kept stay runnable and correct."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes" / "experiments"))

import hyper_rates  # a broken prototype fails here: never skipped
import long_runs
import online_alpha
import peer_step_cost
import residual_gate
import slope_share
import tangent_beta

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


def test_hyper_rates_without_adaptation_is_the_diagonal_form():
    try:
        hyper_rates.register(kappa_alpha=0.0, kappa_beta=0.0)
        for a, b in zip(_run(hyper_rates.NAME, steps=20), _run("diagonal", steps=20)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    finally:
        FORMS.pop(hyper_rates.NAME, None)


def test_hyper_beta_look_ahead_at_the_group_rate_is_the_diagonal_form():
    # κ_β ≠ 0 takes the path that re-targets the optimizer's look-ahead; with β pinned at the
    # group's β (range [β, β]) it must still be the default form.
    old = hyper_rates.BETA_RANGE
    try:
        hyper_rates.BETA_RANGE = (0.1, 0.1)
        hyper_rates.register(kappa_alpha=0.0, kappa_beta=0.5)
        for a, b in zip(_run(hyper_rates.NAME, steps=20), _run("diagonal", steps=20)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    finally:
        hyper_rates.BETA_RANGE = old
        FORMS.pop(hyper_rates.NAME, None)


def test_hyper_alpha_moves_each_tensor_toward_its_own_rate():
    """Two independent quadratics: one whose optimum swings (w* cos(t/30)), where the slope must
    track the w-dependence of the gradient and a large α is best, one stationary and noisy, where
    the slope only fits noise and a small α is best (fixed α 0.01 / 0.1 / 1 give final losses
    7.19 / 7.16 / 7.13 and 0.068 / 0.080 / 0.089 on these problems).  The hypergradient of the
    next loss moves each tensor's α toward its own side."""
    try:
        est = hyper_rates.register(kappa_alpha=0.3)
        torch.manual_seed(0)
        n = 256
        swing, still = torch.nn.Parameter(torch.randn(n)), torch.nn.Parameter(torch.randn(n))
        h, target = torch.rand(n) * 4 + 1, torch.randn(n) * 3
        opt = TrainableOptimizer([swing, still], lr=0.05, estimator=hyper_rates.NAME, fused=False)
        gen = torch.Generator().manual_seed(1)
        for t in range(300):
            swing.grad = h * (swing.detach() - target * math.cos(t / 30)) + 0.5 * torch.randn(n, generator=gen)
            still.grad = h * (still.detach() - target) + 2.0 * torch.randn(n, generator=gen)
            opt.step()
        alpha_swing, alpha_still = (info["alpha"] for info in est.tensors)
        assert alpha_swing > 0.5, alpha_swing
        assert alpha_still < 0.03, alpha_still
    finally:
        FORMS.pop(hyper_rates.NAME, None)


def test_whiteness_beta_follows_the_drift_to_noise_ratio():
    """On a drifting mean under noise the controller's β orders as the Kalman gain does: above
    the start (0.1) where the drift dominates, below it where the noise does."""
    out = hyper_rates.check_white(0.3, steps=400, tensors=20, size=200)
    assert out[0.1]["beta_mean_2nd_half"] > 0.15 > 0.05 > out[0.001]["beta_mean_2nd_half"], out
    for q, row in out.items():
        assert 0.02 <= row["beta_final"] <= 0.6, (q, row)  # the clip range


def test_slope_signal_moves_alpha_without_a_buffer():
    try:
        est = hyper_rates.register(kappa_alpha=0.5, signal="slope")
        moved = _run(hyper_rates.NAME, steps=20)
        assert any(abs(info["alpha"] - 0.1) > 1e-3 for info in est.tensors), "α adapts"
        assert all(not info["cos_beta"] for info in est.tensors)
        assert any(not torch.allclose(a, b) for a, b in zip(moved, _run("diagonal", steps=20)))
    finally:
        FORMS.pop(hyper_rates.NAME, None)


def test_slope_share_sees_travel_only_where_the_weights_move():
    """slope_share.py's decomposition: the rate term α w²/(w²+c) ⊙ r is there whenever the
    estimator is off, the travel term a ⊙ Δw only where the weights moved (lr > 0)."""
    for lr in (0.0, 0.05):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(40))
        opt = TrainableOptimizer([p], lr=lr, estimator="diagonal", fused=False)
        prev: dict = {}
        for _ in range(4):
            p.grad = torch.randn(40)
            before = slope_share.snapshot(opt, [p], prev)
            prev = {p: p.detach().double().reshape(-1).clone()}
            opt.step()
        rate2, travel2, extra, count = slope_share.shares(opt, before, {p: p.grad})
        w = before[p][0]
        assert count == 40 and rate2 > 0
        assert math.isclose(extra, float((0.1 * w * w / (w * w + float(w @ w) / 40 + 1e-3)).sum()), rel_tol=1e-12)
        assert (travel2 > 0) == (lr > 0), (lr, travel2)


def test_residual_gate_is_the_folded_form_open_and_the_none_form_closed():
    """The gate only chooses between the two package steps: never closed (threshold ∞) it is
    ``folded``, always closed (threshold 0: every average is above it) ``none``."""
    try:
        for threshold, form in ((math.inf, "folded"), (0.0, "none")):
            gate = residual_gate.register(threshold)
            for a, b in zip(_run(residual_gate.NAME, steps=20), _run(form, steps=20)):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
            assert gate.closed_share() == (1.0 if threshold == 0 else 0.0)
    finally:
        FORMS.pop(residual_gate.NAME, None)


def test_residual_gate_closes_on_noise_and_opens_on_a_signal():
    """A tensor whose gradient is pure noise has a relative residual above 1 (the estimate is a
    worse predictor than zero): its gate closes; one whose gradient is a steady signal with
    little noise keeps it open."""
    try:
        gate = residual_gate.register(1.0)
        torch.manual_seed(0)
        noisy, steady = torch.nn.Parameter(torch.zeros(200)), torch.nn.Parameter(torch.zeros(200))
        opt = TrainableOptimizer([noisy, steady], lr=0.0, estimator=residual_gate.NAME, fused=False)
        gen = torch.Generator().manual_seed(1)
        for _ in range(100):
            noisy.grad = torch.randn(200, generator=gen)
            steady.grad = 1.0 + 0.1 * torch.randn(200, generator=gen)
            opt.step()
        noisy_info = gate.tensors[opt.state[noisy]["b"].data_ptr()]
        steady_info = gate.tensors[opt.state[steady]["b"].data_ptr()]
        assert noisy_info["ema"] > 1 and noisy_info["closed"] > 90, noisy_info["ema"]
        assert steady_info["ema"] < 0.1 and steady_info["closed"] == 0, steady_info["ema"]
    finally:
        FORMS.pop(residual_gate.NAME, None)


def test_residual_gate_refuses_a_negative_threshold():
    with pytest.raises(ValueError, match="threshold"):
        residual_gate.ResidualGate(-1.0)


def test_peer_step_cost_times_every_step_and_moves_the_weights():
    p = torch.nn.Parameter(torch.zeros(6, 4))
    times = peer_step_cost.step_seconds("to", [p], steps=3, lr=1e-2)
    assert len(times) == 3 and all(t > 0 for t in times)
    assert bool(p.detach().abs().sum() > 0)


def _long_run(config: str, seed: int, test: float, val: float) -> str:
    curve = [[0, 4.0, 0.0], [50, val + 0.1, 1.0], [100, val, 2.0]]
    rec = dict(task="pydoc_lora", model="real", config=config, seed=seed, test=test, final_val=val, val_curve=curve)
    return json.dumps({**rec, "steps": 100})


def test_long_runs_report_pairs_each_seed_and_marks_a_peer_run_that_is_missing(tmp_path):
    runs = [
        _long_run("adamw", 0, 2.90, 2.80),
        _long_run("nadamw", 0, 2.91, 2.81),
        _long_run("to_lookahead_folded", 0, 2.93, 2.79),
        _long_run("adamw", 1, 2.95, 2.85),
        _long_run("to_lookahead_folded", 1, 2.94, 2.84),
    ]
    (tmp_path / "runs.jsonl").write_text("\n".join(runs) + "\n")
    text = long_runs.report(argparse.Namespace(out=tmp_path, paired_with=["nadamw"]))
    row = next(line for line in text.splitlines() if line.startswith("| to_lookahead_folded"))
    cells = [c.strip() for c in row.split("|")]
    assert cells[4] == "+0.0300 -0.0100"  # minus AdamW, seeds 0 and 1
    assert cells[5] == "+0.0200 n/a"  # minus NAdamW: no NAdamW run for seed 1
    assert cells[6] == "100 100"  # reaches min(AdamW, NAdamW)'s final validation at its last evaluation
    assert "| nadamw" not in text  # a row without every seed is left out


def test_long_runs_dropin_lr_is_the_tasks_usual_rate_on_the_real_model():
    import study

    for name, task in study.TASKS.items():
        assert long_runs.dropin_lr(name, "real") == task.base_lr


def test_tangent_beta_forward_tangent_is_the_finite_difference_on_a_linear_loss():
    """With the Hessian zero (a loss linear in w, a fixed gradient sequence) the Hessian-free
    tangent at μ = 1 is the exact derivative of the final loss in β (decay and look-ahead on)."""
    out = tangent_beta.check(steps=40, n=256)
    assert abs(out["tangent"] - out["finite_difference"]) <= 0.02 * abs(out["finite_difference"]), out


def test_tangent_beta_watching_does_not_change_the_step():
    def weights(watch: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(5))]
        opt = TrainableOptimizer(params, lr=1e-2)
        if watch:
            tangent_beta.TangentBeta(0.0, stride=2).attach(opt)
        gen = torch.Generator().manual_seed(1)
        for _ in range(15):
            for p in params:
                p.grad = p.detach() * 0.5 + torch.randn(p.shape, generator=gen)
            opt.step()
        return [p.detach().clone() for p in params]

    for a, b in zip(weights(True), weights(False)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
