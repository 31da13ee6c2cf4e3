r"""Paper-literal reference implementation: the test oracle for every fast path.

One tensor at a time, straight from the update equations of Wang & Klabjan
(arXiv:2508.01764), with the slope matrix :math:`A` materialised as a dense
:math:`n\times n` matrix for *every* structure and its gradient obtained by the chain rule
from :math:`\partial_A \tfrac12\lVert r\rVert^2 = r w^\top`:

* full:      :math:`\partial A = r w^\top`
* diagonal:  :math:`\partial a = \mathrm{diag}(r w^\top)`
* rank-one:  :math:`\partial u = (r w^\top) v`, :math:`\partial v = (r w^\top)^\top u`
* none:      no slope.
* folded:    no slope; the intercept takes, besides its own step, the step the diagonal slope
  would add to the estimate at unmoved weights, :math:`\mathrm{diag}(\partial a)\,w`.

It is slow (O(n²) memory and time per tensor) and meant only for small tensors in tests.
Its state has the same keys and layout as :class:`~hf_to.TrainableOptimizer`, so the two
can be compared key by key.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .forms import intercept_rate
from .optimizer import TrainableOptimizer

__all__ = ["ReferenceTrainableOptimizer", "reference_step"]


def _dense_slope(estimator: str, state: dict, n: int, like: Tensor) -> Tensor:
    if estimator == "full":
        return state["A"].clone()
    if estimator == "diagonal":
        return torch.diag(state["a"].reshape(-1))
    if estimator == "rank_one":
        return torch.outer(state["u"].reshape(-1), state["v"].reshape(-1))
    return torch.zeros((n, n), dtype=like.dtype, device=like.device)


def reference_step(p: Tensor, g: Tensor, state: dict[str, Tensor], group: dict[str, Any]) -> bool:
    """Apply one TO step to parameter ``p`` with gradient ``g``; return False if skipped.

    ``state`` must have been created by :class:`~hf_to.TrainableOptimizer` (same keys).

    Non-finite gradient entries: ``rank_one`` and ``full`` skip the tensor if there is any;
    ``diagonal`` and ``none`` skip it only if every entry is non-finite, and otherwise step
    with ``g = 0`` at those entries and then restore their weight and state.
    """
    est = group["estimator"]
    dtype = state["b"].dtype
    gv = g.reshape(-1).to(dtype)
    bad = ~torch.isfinite(gv)
    if bad.any():
        if est in ("rank_one", "full") or bad.all():
            return False
        old = {k: v.clone() for k, v in state.items() if k != "step"}
        p_old = p.detach().clone()
        _step(p, gv.masked_fill(bad, 0), state, group)
        mask = bad.reshape(p.shape)
        for key, value in old.items():
            state[key] = torch.where(mask, value, state[key])
        p.copy_(torch.where(mask, p_old, p.detach()))
        return True
    _step(p, gv, state, group)
    return True


def _step(p: Tensor, gv: Tensor, state: dict[str, Tensor], group: dict[str, Any]) -> None:
    """One step of the update equations with the flat gradient ``gv`` (finite, state dtype)."""
    est = group["estimator"]
    dtype = state["b"].dtype
    w = p.detach().reshape(-1).to(dtype)
    n = w.numel()
    b = state["b"].reshape(-1).clone()
    if est == "rank_one" and int(state["step"]) == 0:
        # u_0 = 0, v_0 = w_0 / ‖w_0‖ (1/√n when w_0 = 0): A_0 = 0 but not a fixed point.
        norm = torch.linalg.vector_norm(w)
        v0 = w / norm if norm > 0 else torch.full_like(w, max(n, 1) ** -0.5)
        state["v"] = v0.reshape(p.shape)
    A = _dense_slope(est, state, n, w)

    if int(state["step"]) == 0 and group["intercept_init"] == "gradient":
        b = gv - A @ w  # b_0 = g_0 − A_0 w_0
    state["step"] += 1
    t = float(state["step"])

    # 1. residual
    r = A @ w + b - gv
    # 2. estimator: one gradient step on ½‖r‖² for the slope and the intercept
    grad_A = torch.outer(r, w)
    alpha = group["alpha"]
    normalized = group["alpha_scaling"] == "normalized"
    floor = group["norm_floor"]  # δ²
    if est == "full":
        scale = alpha / (w @ w + n * floor + 1e-30) if normalized else alpha
        state["A"] = A - scale * grad_A
    elif est in ("diagonal", "folded"):
        scale = alpha / (w * w + (w * w).mean() + floor + 1e-30) if normalized else alpha
        step_a = scale * torch.diagonal(grad_A)
        if est == "diagonal":
            state["a"] = (torch.diagonal(A) - step_a).reshape(p.shape)
        else:  # folded: the diagonal's slope step, evaluated at w, added to the intercept
            b = b - step_a * w
    elif est == "rank_one":
        u, v = state["u"].reshape(-1), state["v"].reshape(-1)
        scale = alpha / ((v @ w) ** 2 + (u @ u) * (w @ w) + n * floor + 1e-30) if normalized else alpha
        state["u"] = (u - scale * (grad_A @ v)).reshape(p.shape)
        state["v"] = (v - scale * (grad_A.T @ u)).reshape(p.shape)
    beta = intercept_rate(group["beta"], t, group["beta_warmup"])
    b = b - beta * r
    state["b"] = b.reshape(p.shape)
    # 3. estimate with the updated estimator
    g_hat = _dense_slope(est, state, n, w) @ w + b
    nesterov = group.get("nesterov", False)
    if nesterov:
        # the estimator's look-ahead: a fixed weight (the default 0.55), or one more intercept
        # step on the same gradient (weight β_t, nesterov=True)
        g_hat = g_hat + (beta if nesterov is True else nesterov) * (gv - g_hat)
    # 4. weights (optionally preconditioned), decoupled weight decay
    if group["preconditioner"] == "adam":
        v2 = group["beta2"] * state["exp_avg_sq"].reshape(-1) + (1 - group["beta2"]) * gv * gv
        state["exp_avg_sq"] = v2.reshape(p.shape)
        g_hat = g_hat / ((v2 / (1 - group["beta2"] ** t)).sqrt() + group["eps"])
    lr, wd = group["lr"], group["weight_decay"]
    w_new = (1 - lr * wd) * w - lr * g_hat
    p.copy_(w_new.reshape(p.shape))


class ReferenceTrainableOptimizer(TrainableOptimizer):
    """:class:`~hf_to.TrainableOptimizer` whose step is :func:`reference_step` (slow, exact)."""

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["tune_beta"]:
                # the oracle of the step at a given β; the tuning around it is tested against its
                # own prototype (recipes/experiments/tangent_beta.py, tests/test_tuning.py)
                raise ValueError("ReferenceTrainableOptimizer steps at a fixed beta: tune_beta must be 0")
            params, grads, states = self._gather(group)
            for p, g, state in zip(params, grads, states):
                reference_step(p, g, state, group)
        return loss
