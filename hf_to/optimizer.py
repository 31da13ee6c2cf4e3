r"""The Trainable Optimizer (TO) as a ``torch.optim.Optimizer``.

Paper: Ruiqi Wang and Diego Klabjan, "A Trainable Optimizer", arXiv:2508.01764.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Iterable
from itertools import chain, repeat
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.weak import WeakIdKeyDictionary

from . import native
from .distributed import all_reduce_diagnostics, check_unflattened, is_sharded, local_view, make_stats_reducer
from .estimators import (
    BETA_WARMUPS,
    DISPLACEMENT_ESTIMATORS,
    ESTIMATORS,
    SLOPE_INPUTS,
    Estimator,
    count_nonfinite,
    get_estimator,
    intercept_rate,
    nonfinite_action,
    valid_beta_warmup,
)
from .rounding import with_float32_state
from .settings import FAST_ESTIMATORS, STATE_DTYPES, env_switch

__all__ = [
    "ALPHA_SCALINGS",
    "BETA_WARMUPS",
    "INTERCEPT_INITS",
    "PRECONDITIONERS",
    "SLOPE_INPUTS",
    "TrainableOptimizer",
    "trainable_to",
]

#: ``"adam"``: divide the estimate by :math:`\sqrt{\hat v_t}+\epsilon` (Adam's second moment of
#: the raw gradient); ``"none"``: the paper-literal step along :math:`\hat G_t`.
PRECONDITIONERS = ("adam", "none")
#: ``"normalized"``: normalised-LMS slope rate (see :mod:`hf_to.estimators`); ``"none"``: raw α.
ALPHA_SCALINGS = ("normalized", "none")
#: ``"gradient"``: :math:`b_0 = g_0 - A_0 w_0` (zero first residual); ``"zero"``: :math:`b_0 = 0`.
INTERCEPT_INITS = ("gradient", "zero")

#: Group key stamped into every param group so that a checkpoint of another optimizer is
#: recognised on ``load_state_dict``.
ALGORITHM_KEY = "algorithm"
ALGORITHM = "trainable_to"


class TrainableOptimizer(Optimizer):
    r"""Pseudo-linear Trainable Optimizer: weights step along a trained gradient estimator.

    For every parameter tensor, flattened to :math:`w`, with stochastic gradient :math:`g_t`:

    .. math::
        \begin{aligned}
        &\textbf{input}: \gamma \text{ (lr)},\ \alpha \text{ (slope rate)},\
            \beta \text{ (intercept rate)},\ \lambda \text{ (weight decay)},\
            \beta_2, \epsilon \text{ (preconditioner)} \\
        &\textbf{init}: A_0 = 0,\ b_0 = g_0 \ (\text{so } r_0 = 0),\ v_0 = 0 \\
        &\textbf{for}\ t = 0, 1, \dots \\
        &\quad r_t = A_t w_t + b_t - g_t                         && \text{residual} \\
        &\quad A_{t+1} = A_t - \alpha\, \partial_A \tfrac12\lVert r_t\rVert^2,\quad
               b_{t+1} = b_t - \beta_t\, r_t                     && \text{estimator step} \\
        &\quad \beta_t = \beta / (1 - (1-\beta)^{t+1}) \ \text{(default)},\
               \max(\beta, 1/(t+1)) \text{ or } \beta \ \text{(paper)} && \text{intercept rate} \\
        &\quad \hat G_t = A_{t+1} w_t + b_{t+1}                  && \text{estimate} \\
        &\quad \tilde G_t = \hat G_t + \beta_t (g_t - \hat G_t) \ \text{(default)}
               \ \text{or}\ \hat G_t \ \text{(paper)}              && \text{look-ahead} \\
        &\quad d_t = \tilde G_t \ \text{(paper)}\quad\text{or}\quad
               d_t = \tilde G_t / (\sqrt{v_{t+1}/(1-\beta_2^{t+1})} + \epsilon),\
               v_{t+1} = \beta_2 v_t + (1-\beta_2) g_t^2     && \text{preconditioner} \\
        &\quad w_{t+1} = (1 - \gamma\lambda)\, w_t - \gamma\, d_t && \text{weights}
        \end{aligned}

    The structure of :math:`A` is chosen by ``estimator`` (see :mod:`hf_to.estimators`):
    ``"full"`` (dense, the paper's main form, small tensors only), ``"diagonal"`` and
    ``"rank_one"`` (the paper's O(n) variants) and ``"none"`` (:math:`A \equiv 0`, EMA momentum:
    with ``preconditioner="none", beta_warmup=False, nesterov=False`` it is
    ``SGD(momentum=1-β, dampening=1-β)``).  With the normalised slope rate (default) the
    :math:`\alpha` above is divided per structure by the squared norm of the estimator's input
    Jacobian plus a floor (see :mod:`hf_to.estimators`).

    The default ``preconditioner="adam"`` makes the step size independent of the gradient
    scale so that AdamW's learning rates (1e-5 … 3e-4 for LLM fine-tuning) carry over; the
    paper-literal update is ``preconditioner="none", alpha_scaling="none",
    intercept_init="zero", beta_warmup=False, nesterov=False`` (registered as
    ``"to_paper_<estimator>"``).
    The measurements behind each default are in ``docs/design-decisions.md``.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate :math:`\gamma` (default: 1e-3).
        estimator: structure of :math:`A`: ``"diagonal"`` (default), ``"rank_one"``,
            ``"full"`` or ``"none"``.
        alpha: slope rate :math:`\alpha`, the step of :math:`A` on the residual loss
            (default: 0.1; with ``alpha_scaling="normalized"`` the largest fraction of the
            residual that the slope term absorbs per step).
        beta: intercept rate :math:`\beta`, the step of :math:`b` (default: 0.1; the
            ``1 - beta1`` of Adam).
        preconditioner: ``"adam"`` (default) or ``"none"`` (paper).
        beta2: decay of the preconditioner's second moment (default: 0.999).
        eps: term added to the preconditioner's denominator (default: 1e-8).
        weight_decay: decoupled weight decay :math:`\lambda`, as in AdamW (default: 0).
        alpha_scaling: ``"normalized"`` (default) or ``"none"`` (paper).
        norm_floor: :math:`\delta^2`, the floor of the weights' mean square in the normalised
            slope rate; keeps :math:`A` bounded when :math:`w \approx 0` (default: 1e-3).
        beta_warmup: the intercept rate of the first steps (see
            :func:`hf_to.estimators.intercept_rate`).  ``"adam"`` (default):
            :math:`\beta_t = \beta/(1-(1-\beta)^{t+1})`, Adam's bias correction written as a
            rate, so that with :math:`A \equiv 0` the optimizer *is* AdamW and the slope term is
            a trained correction on top of it; ``True``: :math:`\max(\beta, 1/(t+1))`, the
            running mean of the first :math:`1/\beta` corrected gradients (the default before
            2026-11-30, ``"to_running_mean"`` in the registry; it lags Adam's EMA early on);
            ``False``: the paper's constant :math:`\beta`.  With ``True`` or ``"adam"`` the first
            step sets :math:`b_1 = g_0 - A_0 w_0` whatever ``intercept_init`` says.
        slope_input: what the slope multiplies: ``"weights"`` (default, the paper's
            :math:`A w`) or ``"displacement"`` (:math:`A (w - \bar w)`, :math:`\bar w` an EMA of
            the weights at ``anchor_rate``; ``estimator="diagonal"`` only; see
            :class:`hf_to.estimators.DisplacementDiagonalEstimator`).  Experimental: it lost
            to the default in the fine-tuning study, and its normalisation has no floor, so at a
            constant lr near convergence, where the displacement collapses, :math:`a` can grow
            until the step diverges.
        anchor_rate: the rate :math:`\gamma` of the anchor's EMA with
            ``slope_input="displacement"`` (default: 0.1).
        nesterov: step along :math:`\hat G_{t+1}(w_t) + \beta_t (g_t - \hat G_{t+1}(w_t))`, the
            estimate after one more intercept step on the same gradient (the estimator's
            look-ahead, as Nesterov's momentum looks one step ahead), instead of
            :math:`\hat G_{t+1}(w_t)`.  With ``estimator="none"`` and the Adam preconditioner it
            is NAdam's direction :math:`\beta_1 m_t + (1-\beta_1) g_t` with a constant
            :math:`\beta_1`.  Default ``True`` since 2026-11-30 (chosen by the fine-tuning study;
            ``False`` is the paper's step, ``"to_without_nesterov"`` in the registry).
            Checkpoints written before the keyword existed resume with ``False``.
        intercept_init: ``"gradient"`` (default, :math:`b_0 = g_0`) or ``"zero"`` (paper-literal
            reading, :math:`b_0 = 0`).
        max_full_numel: largest tensor (in elements) the ``"full"`` estimator accepts; its
            state holds ``n**2`` values (default: 4096, i.e. 64 MiB in fp32).
        diagnostics: accumulate the estimator's health on the device (see
            :meth:`diagnostics`); off by default, and then no step reads anything back.
        fused: ``None`` (default) or ``True``: the fastest step available.  On a CPU that is the
            one-pass C kernel of :mod:`hf_to.native` (one call per param group; built on first
            use with the system C compiler, ``HF_TO_NATIVE=0`` turns it off), for plain or
            FSDP2-sharded (one all-reduce per group) float32/bfloat16/float16 parameters and
            the diagonal, rank-one and none estimators.  It carries whole-tensor sums from one step to the next and notices
            any write PyTorch makes to the weights or state between steps (version counters);
            writes through ``p.data`` bypass those counters, so write on the parameter itself
            under ``torch.no_grad()`` instead, or set ``HF_TO_NATIVE=0``.
            On CUDA (plain or FSDP2-sharded parameters) it is the multi-tensor Triton step of
            :mod:`hf_to.gpu`: two kernel launches per param group whatever its tensor count
            (three with sharded parameters), no host sync.  Elsewhere (no C compiler,
            ``HF_TO_NATIVE=0``, no triton) the readable path.
            ``False``: the readable per-tensor path.
        state_dtype: dtype of the state tensors: ``None`` (default: float32, float64 for
            float64 parameters), ``torch.float32`` or ``torch.bfloat16`` (half the state
            memory, stored with stochastic rounding; not for ``estimator="full"``).  float64
            parameters need float64 state: a narrower ``state_dtype`` raises ``ValueError``
            (the step computes in the state's dtype and would round the weights to it).
        capturable: as in ``torch.optim.Adam``: the step never reads a device value on the
            host nor branches on one in Python, so that it can be captured in a CUDA graph
            (``torch.cuda.graphs``, ``torch.compile(mode="reduce-overhead")``); ``step``
            counts live on the parameter's device.  On CUDA the Triton step is capturable
            anyway; ``capturable=True`` makes a group that cannot take it (``fused=False``,
            ``estimator="full"``, no triton) raise instead of syncing.  A ``lr`` given as a
            tensor is read on the device (a float ``lr`` is captured as it is).  On a CPU it
            is accepted and changes nothing (default: ``False``).

    State (per parameter, created on the first step): ``step`` (0-d float32; on the CPU, on
    the parameter's device for CUDA parameters or ``capturable=True``),
    ``b`` and the slope state of the estimator (``a``; ``u``, ``v``; ``A``), and
    ``exp_avg_sq`` with the Adam preconditioner.  State is float32 for float16/bfloat16/float32
    parameters and float64 for float64 parameters, and keeps that dtype through
    ``load_state_dict``.

    Non-finite gradients: with the coordinate-wise estimators ``"diagonal"`` and ``"none"``
    the entries whose gradient is ``inf``/``nan`` keep their weight and every state entry
    for that step while the other entries step as usual (the tensor's ``step`` advances; the
    normalised rate's :math:`w^\top w` still sums all entries); a tensor whose gradient is
    non-finite in *every* entry is skipped (weights, state and its ``step`` untouched).
    ``"rank_one"`` and ``"full"`` couple all coordinates, so they skip a tensor with any
    non-finite gradient entry.  Partly and wholly skipped tensors are counted in
    :meth:`diagnostics`.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        *,
        estimator: str = "diagonal",
        alpha: float = 0.1,
        beta: float = 0.1,
        preconditioner: str = "adam",
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        alpha_scaling: str = "normalized",
        norm_floor: float = 1e-3,
        intercept_init: str = "gradient",
        beta_warmup: bool | Literal["adam"] = "adam",
        slope_input: str = "weights",
        anchor_rate: float = 0.1,
        nesterov: bool = True,
        max_full_numel: int = 4096,
        diagnostics: bool = False,
        fused: bool | None = None,
        state_dtype: torch.dtype | None = None,
        capturable: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            estimator=estimator,
            alpha=alpha,
            beta=beta,
            preconditioner=preconditioner,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            alpha_scaling=alpha_scaling,
            norm_floor=norm_floor,
            intercept_init=intercept_init,
            beta_warmup=beta_warmup,
            slope_input=slope_input,
            anchor_rate=anchor_rate,
            nesterov=nesterov,
            max_full_numel=max_full_numel,
            fused=fused,
            state_dtype=state_dtype,
            capturable=capturable,
        )
        _validate_hyperparameters(defaults)
        defaults[ALGORITHM_KEY] = ALGORITHM
        self.track_diagnostics = bool(diagnostics)
        super().__init__(params, defaults)
        self._diag: list[dict[str, Tensor]] = []
        # The native kernel's per-group descriptors and carried sums (hf_to.native): owned
        # here so that they, and the state tensors they reference, go with the optimizer.
        self._native_plans: dict = {}
        # Per param group index: the group and the (estimator, preconditioner, slope_input) its
        # state was last checked against; a group changed (or replaced) between steps is checked again.
        self._forms: dict[int, tuple[dict, tuple[str, str, str]]] = {}

    # -- torch.optim plumbing -------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _validate_hyperparameters(group)
            _check_full_size(group)
            _check_state_dtype(group["state_dtype"], group["params"])
        except ValueError:
            self.param_groups.pop()
            raise
        # The tensors given to the optimizer: a flat partition swapped in later by a wrapper
        # (DeepSpeed ZeRO) is recognised by its absence (see hf_to.distributed.flattened_reason).
        given = self.__dict__.setdefault("_given_params", WeakIdKeyDictionary())
        for p in group["params"]:
            given[p] = True

    def __getstate__(self) -> dict[str, Any]:
        # copy.deepcopy and pickle keep the diagnostics switch and what it accumulated.
        return {**super().__getstate__(), "track_diagnostics": self.track_diagnostics, "_diag": self._diag}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("track_diagnostics", False)
        self.__dict__.setdefault("_diag", [])
        self._native_plans = {}
        self._forms = {}
        self._given_params = WeakIdKeyDictionary({p: True for g in self.param_groups for p in g["params"]})
        for group in self.param_groups:
            group.setdefault("alpha_scaling", "normalized")
            group.setdefault("norm_floor", 1e-3)
            group.setdefault("intercept_init", "gradient")
            group.setdefault("beta_warmup", True)
            group.setdefault("slope_input", "weights")
            group.setdefault("anchor_rate", 0.1)
            group.setdefault("nesterov", False)
            group.setdefault("max_full_numel", 4096)
            group.setdefault("fused", None)
            group.setdefault("state_dtype", None)
            group.setdefault("capturable", False)
            group.setdefault(ALGORITHM_KEY, ALGORITHM)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, refusing one of another optimizer or another estimator.

        Unlike the base class, floating-point state keeps its saved dtype (float32 estimator
        state of bfloat16 parameters stays float32) and is only moved to the parameter's device;
        float64 parameters of a group with ``state_dtype=None`` get float64 state (widened, as a
        fresh start would make it).  Every state tensor is copied, the step count too (a 0-d
        float32 CPU tensor, also when saved as a Python number): the optimizer never shares
        state with the dict it loaded.
        """
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, "
                f"this optimizer has {len(self.param_groups)}"
            )
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if saved.get(ALGORITHM_KEY) != ALGORITHM:
                raise ValueError(
                    f"param group {i} of the loaded state dict was not written by TrainableOptimizer "
                    f"(no '{ALGORITHM_KEY}: {ALGORITHM}' stamp; keys: {sorted(k for k in saved if k != 'params')}); "
                    "resume with the optimizer that wrote the checkpoint, or start the optimizer afresh"
                )
            # slope_input and beta_warmup need not match: the saved group's values (and state) win,
            # so a checkpoint written under an older default resumes exactly.
            for key in ("estimator", "preconditioner"):
                if saved.get(key) != group[key]:
                    raise ValueError(
                        f"param group {i}: the checkpoint was written with {key}={saved.get(key)!r}, "
                        f"this optimizer has {key}={group[key]!r}; their states are not interchangeable"
                    )
        self._native_plans.clear()
        self._forms.clear()
        super().load_state_dict(state_dict)
        # The base class casts floating state to the parameter dtype; undo that from the source.
        saved_ids = chain.from_iterable(g["params"] for g in saved_groups)
        params = chain.from_iterable(zip(g["params"], repeat(g)) for g in self.param_groups)
        for saved_id, (p, group) in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if key == "step":
                    self.state[p][key] = _step_count(value)
                elif isinstance(value, Tensor) and value.is_floating_point():
                    wide = p.dtype == torch.float64 and group["state_dtype"] is None
                    self.state[p][key] = value.detach().to(
                        device=p.device, dtype=torch.float64 if wide else None, copy=True
                    )

    # -- the step -------------------------------------------------------------------------

    def _init_group(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], list[dict]]:
        """Collect the parameters with gradients; create their state on first use."""
        estimator = get_estimator(group["estimator"], group["slope_input"])
        params, grads, states = [], [], []
        full = group["estimator"] == "full"
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError("TrainableOptimizer does not support sparse gradients")
            if p.is_complex():
                raise RuntimeError(
                    "TrainableOptimizer does not support complex parameters; view them as real with torch.view_as_real"
                )
            if full and is_sharded(p):
                raise ValueError(
                    f"estimator='full' cannot run on a sharded parameter of shape {tuple(p.shape)}: its "
                    "n x n matrix A couples all shards. Use estimator='diagonal' or 'rank_one' with FSDP"
                )
            state = self.state[p]
            if not state:
                check_unflattened(
                    p,
                    self._given_params,
                    estimator=group["estimator"],
                    alpha_scaling=group["alpha_scaling"],
                    index=next(i for i, g in enumerate(self.param_groups) if g is group),
                )
                _init_state(state, p, estimator, group)
            params.append(p)
            grads.append(grad)
            states.append(state)
        return params, grads, states

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.track_diagnostics and len(self._diag) < len(self.param_groups):
            # Groups added since (add_param_group) start empty; the others keep their sums.
            self._diag += [_empty_stats() for _ in range(len(self.param_groups) - len(self._diag))]
        for i, group in enumerate(self.param_groups):
            form = (group["estimator"], group["preconditioner"], group["slope_input"])
            checked = self._forms.get(i)
            if checked is None or checked[0] is not group or checked[1] != form:
                self._check_state_form(i, group)
                self._forms[i] = (group, form)
            params, grads, states = self._init_group(group)
            if not params:
                continue
            stats = trainable_to(
                params,
                grads,
                states,
                lr=group["lr"],
                estimator=group["estimator"],
                alpha=group["alpha"],
                beta=group["beta"],
                preconditioner=group["preconditioner"],
                beta2=group["beta2"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                alpha_scaling=group["alpha_scaling"],
                norm_floor=group["norm_floor"],
                intercept_init=group["intercept_init"],
                beta_warmup=group["beta_warmup"],
                slope_input=group["slope_input"],
                anchor_rate=group["anchor_rate"],
                nesterov=group["nesterov"],
                diagnostics=self.track_diagnostics,
                reduce_stats=self._stats_reducer(params),
                fused=group["fused"],
                native_plans=self._native_plans,
                capturable=group["capturable"],
            )
            if stats is not None:
                acc = self._diag[i]
                for key, value in stats.items():
                    acc[key] = acc[key].to(value.device) + value
        return loss

    def _check_state_form(self, index: int, group: dict[str, Any]) -> None:
        """Refuse a step whose group's ``estimator``/``preconditioner`` no longer match the state
        its parameters hold (changed in ``param_groups`` after a step): a clear ``ValueError``
        rather than a ``KeyError`` deep in the step, as ``load_state_dict`` refuses it."""
        expected = {"step", "b", *get_estimator(group["estimator"], group["slope_input"]).state_keys}
        if group["preconditioner"] == "adam":
            expected.add("exp_avg_sq")
        for p in group["params"]:
            state = self.state.get(p)
            if state and state.keys() != expected:
                missing, extra = sorted(expected - state.keys()), sorted(state.keys() - expected)
                raise ValueError(
                    f"param group {index} has estimator={group['estimator']!r}, "
                    f"preconditioner={group['preconditioner']!r}, slope_input={group['slope_input']!r}, but the state of its parameter of shape "
                    f"{tuple(p.shape)} was made for another form (missing {missing}, unexpected {extra}); "
                    "estimator, preconditioner and slope_input cannot change under existing state: restore them, or "
                    "start afresh with a new optimizer (or clear opt.state)"
                )

    def _stats_reducer(self, params: list[Tensor]) -> Callable[[Tensor], Tensor] | None:
        """How to sum phase-1 partial sums across the ranks that hold shards of ``params``.

        ``None`` (nothing to sum) for ordinary tensors on one process or replicated by DDP.
        """
        return make_stats_reducer(params)

    # -- diagnostics ----------------------------------------------------------------------

    def diagnostics(self, *, reset: bool = True, all_reduce: bool = False) -> list[dict[str, float]]:
        r"""The estimator's health per param group since the last reset (one host sync).

        For each group: ``steps`` (optimizer steps that updated at least one tensor),
        ``residual_sq`` (mean over steps of :math:`\sum_p \lVert r_t\rVert^2`, the residual
        before the estimator step), ``grad_sq`` (:math:`\sum_p\lVert g_t\rVert^2`),
        ``estimate_sq`` (:math:`\sum_p\lVert \hat G_t\rVert^2`), ``relative_residual``
        (``residual_sq / grad_sq``; near 1 means the estimator explains little of the
        gradient, near 0 that it tracks it) and ``skipped`` (tensor updates skipped wholly
        or partly for non-finite gradients; the sums above cover the finite entries only).
        Empty list when ``diagnostics=False``.

        With sharded (FSDP2) parameters each rank accumulates the sums over its local shards;
        ``all_reduce=True`` sums them over the shard group (one collective per sharded param
        group: call it on every rank).
        """
        out = []
        accs = all_reduce_diagnostics(self._diag, self.param_groups) if all_reduce else self._diag
        for acc in accs:
            values = {k: float(v) for k, v in acc.items()}
            steps = max(values["steps"], 1.0)
            rec = {
                "steps": values["steps"],
                "residual_sq": values["residual_sq"] / steps,
                "grad_sq": values["grad_sq"] / steps,
                "estimate_sq": values["estimate_sq"] / steps,
                "skipped": values["skipped"],
            }
            rec["relative_residual"] = rec["residual_sq"] / rec["grad_sq"] if rec["grad_sq"] > 0 else 0.0
            out.append(rec)
        if reset:
            self._diag = [_empty_stats() for _ in self.param_groups] if self.track_diagnostics else []
        return out

    @torch.no_grad()
    def gradient_estimate(self, p: Tensor, w: Tensor | None = None) -> Tensor:
        r"""The estimator's current :math:`\hat G(w) = A w + b` for parameter ``p``.

        ``w`` defaults to the parameter's current value.  Right after a step, passing the
        weights *before* that step returns the :math:`\hat G_t` the step moved along.
        """
        group = next((g for g in self.param_groups if any(q is p for q in g["params"])), None)
        if group is None:
            raise ValueError(f"the tensor of shape {tuple(p.shape)} is not a parameter of this optimizer")
        state = self.state.get(p)  # not self.state[p]: a defaultdict would insert an empty entry
        if not state:
            raise ValueError("no estimator state for this parameter yet: call step() first")
        return get_estimator(group["estimator"], group["slope_input"]).predict(state, p.detach() if w is None else w)

    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors (all parameters, ``step`` included)."""
        return sum(
            v.numel() * v.element_size() for s in self.state.values() for v in s.values() if isinstance(v, Tensor)
        )


# -- validation ----------------------------------------------------------------------------


def _validate_hyperparameters(group: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the argument and value of the first invalid setting."""
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Invalid lr: a Tensor lr must have one element, got shape {tuple(lr.shape)}")
        lr = float(lr)
    checks = [
        ("lr", lr, isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0, "a finite number >= 0"),
        ("alpha", group["alpha"], _num(group["alpha"]) and group["alpha"] >= 0, "a finite number >= 0"),
        ("beta", group["beta"], _num(group["beta"]) and 0 < group["beta"] <= 1, "in (0, 1]"),
        ("beta2", group["beta2"], _num(group["beta2"]) and 0 <= group["beta2"] < 1, "in [0, 1)"),
        ("eps", group["eps"], _num(group["eps"]) and group["eps"] >= 0, "a finite number >= 0"),
        (
            "norm_floor",
            group["norm_floor"],
            _num(group["norm_floor"]) and group["norm_floor"] >= 0,
            "a finite number >= 0",
        ),
        (
            "weight_decay",
            group["weight_decay"],
            _num(group["weight_decay"]) and group["weight_decay"] >= 0,
            "a finite number >= 0",
        ),
        ("estimator", group["estimator"], group["estimator"] in ESTIMATORS, f"one of {sorted(ESTIMATORS)}"),
        ("preconditioner", group["preconditioner"], group["preconditioner"] in PRECONDITIONERS, PRECONDITIONERS),
        ("alpha_scaling", group["alpha_scaling"], group["alpha_scaling"] in ALPHA_SCALINGS, ALPHA_SCALINGS),
        ("intercept_init", group["intercept_init"], group["intercept_init"] in INTERCEPT_INITS, INTERCEPT_INITS),
        ("beta_warmup", group["beta_warmup"], valid_beta_warmup(group["beta_warmup"]), "True, False or 'adam'"),
        ("slope_input", group["slope_input"], group["slope_input"] in SLOPE_INPUTS, SLOPE_INPUTS),
        (
            "anchor_rate",
            group["anchor_rate"],
            _num(group["anchor_rate"]) and 0 < group["anchor_rate"] <= 1,
            "in (0, 1]",
        ),
        (
            "max_full_numel",
            group["max_full_numel"],
            isinstance(group["max_full_numel"], int)
            and not isinstance(group["max_full_numel"], bool)
            and group["max_full_numel"] >= 1,
            "an int >= 1",
        ),
    ]
    checks.append(
        (
            "state_dtype",
            group["state_dtype"],
            group["state_dtype"] in STATE_DTYPES
            and not (group["state_dtype"] == torch.bfloat16 and group["estimator"] not in FAST_ESTIMATORS),
            f"one of {STATE_DTYPES}; bfloat16 with estimator in {FAST_ESTIMATORS}",
        )
    )
    checks.append(("fused", group["fused"], group["fused"] in (None, True, False), "None, True or False"))
    checks.append(("capturable", group["capturable"], isinstance(group["capturable"], bool), "True or False"))
    checks.append(("nesterov", group["nesterov"], isinstance(group["nesterov"], bool), "True or False"))
    for name, value, ok, expected in checks:
        if not ok:
            raise ValueError(f"Invalid {name}: {value!r} (expected {expected})")
    if group["slope_input"] == "displacement" and group["estimator"] not in DISPLACEMENT_ESTIMATORS:
        raise ValueError(
            f"Invalid slope_input: 'displacement' with estimator={group['estimator']!r} "
            f"(expected estimator in {sorted(DISPLACEMENT_ESTIMATORS)})"
        )
    if group["preconditioner"] == "adam" and group["eps"] == 0:
        # eps = 0 divides by zero where a gradient coordinate has always been zero.
        raise ValueError("Invalid eps: 0 (expected > 0 with preconditioner='adam')")


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_state_dtype(state_dtype: torch.dtype | None, params: Iterable[Tensor]) -> None:
    """float64 parameters need float64 state: the step computes in the state's dtype and would
    round the weights to it every step.  (Computing in float64 beside narrower state would
    need a second precision in every estimator and kernel, for a setting whose only use,
    smaller state, contradicts the choice of float64 weights.)"""
    if state_dtype is None or state_dtype == torch.float64:
        return
    for p in params:
        if p.dtype == torch.float64:
            raise ValueError(
                f"Invalid state_dtype: {state_dtype} for a float64 parameter of shape {tuple(p.shape)} "
                f"(the step computes in the state's dtype and would round the weights to {state_dtype}); "
                "use state_dtype=None (float64 state for float64 parameters) or put float64 "
                "parameters in a param group of their own"
            )


def _step_count(value: Any) -> Tensor:
    """A loaded ``step`` as this optimizer keeps it: a fresh 0-d float32 CPU tensor (checkpoints
    edited or converted by other tools may hold a Python number, or another dtype)."""
    if isinstance(value, Tensor):
        return value.detach().to(device="cpu", dtype=torch.float32, copy=True).reshape(())
    return torch.tensor(float(value), dtype=torch.float32)


def _check_full_size(group: dict[str, Any]) -> None:
    """The dense estimator stores n² values per tensor: refuse tensors above the limit."""
    if group["estimator"] != "full":
        return
    limit = group["max_full_numel"]
    for p in group["params"]:
        n = p.numel()
        if n > limit:
            gib = n * n * 4 / 2**30
            raise ValueError(
                f"estimator='full' on a parameter of shape {tuple(p.shape)} ({n} elements) needs an "
                f"{n}x{n} matrix A: {n * n} values, {gib:.2f} GiB in float32. The limit is "
                f"max_full_numel={limit}; use estimator='diagonal' or 'rank_one' (O(n) memory), "
                "put large tensors in another param group, or raise max_full_numel"
            )


# -- state ---------------------------------------------------------------------------------


def state_dtype_for(p: Tensor) -> torch.dtype:
    """Estimator state is float64 for float64 parameters and float32 otherwise."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _init_state(state: dict, p: Tensor, estimator: Estimator, group: dict[str, Any]) -> None:
    w = p.detach().to(group.get("state_dtype") or state_dtype_for(p), copy=True)
    # ``step`` stays a CPU tensor where the host reads it (the readable path, the C kernel):
    # that costs no device sync.  The Triton step reads and advances it on the GPU.
    on_device = group.get("capturable", False) or local_view(p).device.type == "cuda"
    state["step"] = torch.tensor(0.0, dtype=torch.float32, device=local_view(p).device if on_device else "cpu")
    state["b"] = torch.zeros_like(w, memory_format=torch.contiguous_format)
    estimator.init(state, w.contiguous())
    if group["preconditioner"] == "adam":
        state["exp_avg_sq"] = torch.zeros_like(w, memory_format=torch.contiguous_format)


_STAT_KEYS = ("steps", "residual_sq", "grad_sq", "estimate_sq", "skipped")


def _empty_stats(device: torch.device | str = "cpu") -> dict[str, Tensor]:
    return {k: torch.zeros((), dtype=torch.float64, device=device) for k in _STAT_KEYS}


# -- functional API ------------------------------------------------------------------------


def trainable_to(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    *,
    lr: float | Tensor,
    estimator: str,
    alpha: float,
    beta: float,
    preconditioner: str,
    beta2: float,
    eps: float,
    weight_decay: float,
    alpha_scaling: str = "normalized",
    norm_floor: float = 1e-3,
    intercept_init: str = "gradient",
    beta_warmup: bool | str = "adam",
    slope_input: str = "weights",
    anchor_rate: float = 0.1,
    nesterov: bool = True,
    diagnostics: bool = False,
    reduce_stats: Callable[[Tensor], Tensor] | None = None,
    fused: bool | None = None,
    native_plans: dict | None = None,
    capturable: bool = False,
) -> dict[str, Tensor] | None:
    """Functional TO step over a list of tensors (the math of :class:`TrainableOptimizer`).

    The step runs in two phases.  Phase 1 computes, per tensor, partial sums over the
    elements at hand: a non-finite sentinel (the number of non-finite gradient entries) and
    the whole-tensor sums the estimator needs (``Estimator.stat_names``).  They are stacked
    into one ``(tensors, sums)`` matrix, passed through ``reduce_stats`` (the identity on one
    process; one all-reduce for all tensors when parameters are sharded, so the count is the
    whole tensor's) and read back once to find the tensors to skip or mask (see
    :func:`hf_to.estimators.nonfinite_action`).  Phase 2 is elementwise given those sums.

    ``fused`` selects the path (see :class:`TrainableOptimizer`); unless it is ``False``: the
    one-pass C kernel of :mod:`hf_to.native` for CPU groups (sharded too), the Triton kernels of
    :mod:`hf_to.gpu` for CUDA groups (which do both phases on the device, no host read); else
    this readable path.  ``capturable`` makes a CUDA group that cannot take the Triton step raise.

    Returns the local diagnostic sums of this call, or ``None`` when ``diagnostics`` is off.
    """
    common = dict(
        lr=lr,
        alpha=alpha,
        beta=beta,
        adam=preconditioner == "adam",
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        normalize=alpha_scaling == "normalized",
        floor=norm_floor,
        intercept_from_gradient=intercept_init == "gradient",
        beta_warmup=beta_warmup,
        diagnostics=diagnostics,
        reduce_stats=reduce_stats,
    )
    # The C kernel implements the weights form (every warm-up, the Nesterov direction); the
    # Triton kernels every form of the diagonal, rank-one and none estimators.  The rest take
    # the readable path.
    native_form = slope_input == "weights"
    form = dict(slope_input=slope_input, anchor_rate=anchor_rate, nesterov=nesterov)  # Triton and readable
    if fused is not False:
        if native_form and native.eligible(estimator, params, grads, states) and native.available():
            common["lr"] = float(lr)
            return _native_trainable_to(
                params, grads, states, estimator=estimator, plans=native_plans, nesterov=nesterov, **common
            )
        gpu = _gpu_step(estimator, params)
        if gpu is not None:
            out = gpu.triton_trainable_to(params, grads, states, estimator=estimator, **form, **common)
            if out is not NotImplemented:
                return out
    if capturable and local_view(params[0]).device.type == "cuda":
        raise RuntimeError(
            f"capturable=True: this CUDA param group (estimator={estimator!r}, fused={fused!r}, "
            f"slope_input={slope_input!r}) cannot take the Triton step of hf_to.gpu (estimators "
            f"{FAST_ESTIMATORS}, float32/bfloat16/float16 contiguous parameters, fused=None or True, triton "
            "installed), and the readable path reads step counts and non-finite counts on the host"
        )
    common["lr"] = float(lr)
    return _readable_trainable_to(params, grads, states, estimator=estimator, **form, **common)


#: ``HF_TO_TRITON=0`` keeps CUDA groups off the Triton step (then they take the readable path).
_ENV_TRITON = "HF_TO_TRITON"
_gpu_import_failed = False


def _gpu_step(estimator: str, params: list[Tensor]) -> Any:
    """:mod:`hf_to.gpu` if this group can take its Triton step, else ``None``.

    Imported on first use by a CUDA group (triton comes with it), so CPU-only use never needs
    triton; the tests import it themselves to run it on CPU tensors in Triton's interpreter.
    """
    global _gpu_import_failed
    if estimator not in FAST_ESTIMATORS or not env_switch(_ENV_TRITON):
        return None
    gpu = sys.modules.get(f"{__package__}.gpu")
    if gpu is None:
        if _gpu_import_failed or local_view(params[0]).device.type != "cuda":
            return None
        try:
            from . import gpu
        except ImportError as err:
            logging.getLogger(__name__).warning(
                "hf_to: cannot import the Triton step (%s); CUDA groups take the readable path", err
            )
            _gpu_import_failed = True
            return None
    return gpu if gpu.eligible(estimator, params) else None


def _readable_trainable_to(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    *,
    estimator: str,
    slope_input: str = "weights",
    anchor_rate: float = 0.1,
    nesterov: bool = False,
    **common: Any,
) -> dict[str, Tensor] | None:
    """The readable path; bfloat16 state through float32 working copies (:mod:`hf_to.rounding`)."""
    for p, state in zip(params, states):
        if p.dtype == torch.float64 and state["b"].dtype != torch.float64:
            _check_state_dtype(state["b"].dtype, [p])  # e.g. a model made float64 after its first step
    strategy = get_estimator(estimator, slope_input)
    if states[0]["b"].dtype == torch.bfloat16:
        return with_float32_state(
            _single_tensor_trainable_to,
            states,
            params=params,
            grads=grads,
            estimator=strategy,
            anchor_rate=anchor_rate,
            nesterov=nesterov,
            **common,
        )
    return _single_tensor_trainable_to(
        params, grads, states, estimator=strategy, anchor_rate=anchor_rate, nesterov=nesterov, **common
    )


def _native_trainable_to(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    *,
    estimator: str,
    plans: dict | None,
    nesterov: bool = False,
    **common: Any,
) -> dict[str, Tensor] | None:
    """The one-pass C kernel of :mod:`hf_to.native` (first steps included)."""
    return native.native_step(
        params,
        grads,
        states,
        estimator=estimator,
        plans=plans,
        nesterov=nesterov,
        **common,
    )


def _single_tensor_trainable_to(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    *,
    lr: float,
    estimator: Estimator,
    alpha: float,
    beta: float,
    adam: bool,
    beta2: float,
    eps: float,
    weight_decay: float,
    normalize: bool,
    floor: float,
    intercept_from_gradient: bool,
    beta_warmup: bool | str,
    diagnostics: bool,
    reduce_stats: Callable[[Tensor], Tensor] | None,
    anchor_rate: float = 0.1,
    nesterov: bool = False,
) -> dict[str, Tensor] | None:
    device = grads[0].device
    move_anchor = getattr(estimator, "move_anchor", None)
    # Flat views in the state dtype; ``w`` aliases the parameter when no cast is needed.
    # Sharded (DTensor) parameters, gradients and state work on their local shards.
    views = []
    numels = [p.numel() for p in params]  # the whole tensor's n, also for a DTensor
    states = [{k: local_view(v) for k, v in state.items()} for state in states]
    params = [local_view(p) for p in params]
    for p, g, state in zip(params, grads, states):
        b = state["b"]
        in_place = p.dtype == b.dtype and p.is_contiguous()
        w = p.view(-1) if in_place else p.detach().reshape(-1).to(b.dtype)
        views.append((w, local_view(g).reshape(-1).to(b.dtype), b.view(-1), in_place))

    # Phase 1: partial sums, one row per tensor: [non-finite count (sentinel), *stat_names].
    # Unsharded, the count is needed only where Σg is not finite (some entry is inf/nan, or
    # the sum overflowed): Σg stands in for it, a few times cheaper, and is replaced below.
    count = count_nonfinite if reduce_stats is not None else torch.sum
    rows = [
        torch.stack([count(gf), *estimator.local_stats(state, w, gf, bf)]).to(device)
        for (w, gf, bf, _), state in zip(views, states)
    ]
    sums = torch.stack(rows)
    if reduce_stats is not None:
        sums = reduce_stats(sums)
    counts = sums[:, 0].tolist()
    if reduce_stats is None:
        counts = [0.0 if math.isfinite(c) else count_nonfinite(v[1]).item() for c, v in zip(counts, views)]
    actions = [nonfinite_action(estimator.name, c, n, sums.dtype) for c, n in zip(counts, numels)]

    stats = _empty_stats(device) if diagnostics else None
    for p, n, state, (w, gf, bf, in_place), row, action in zip(params, numels, states, views, sums, actions):
        if action != "step" and stats is not None:
            stats["skipped"] += 1
        if action == "skip":
            continue
        bad = kept = None
        if action == "masked":
            # Some entries of a coordinate-wise estimator's gradient are non-finite: step the
            # others with g = 0 there, then put back those entries' weight and state (rare).
            bad = ~torch.isfinite(gf)
            slots = [w, bf, *(state[k].view(-1) for k in estimator.state_keys)]
            if adam:
                slots.append(state["exp_avg_sq"].view(-1))
            kept = [(t, t[bad]) for t in slots]
            gf = gf.masked_fill(bad, 0)
        first = state["step"].item() == 0
        state["step"] += 1
        named = {k: v.to(bf.device) for k, v in zip(estimator.stat_names, row[1:])}
        rate = intercept_rate(beta, state["step"].item(), beta_warmup)
        g_hat, r = estimator.step(
            state,
            w,
            gf,
            bf,
            named,
            n=n,
            alpha=alpha,
            beta=rate,
            normalize=normalize,
            floor=floor,
            first=first,
            intercept_from_gradient=intercept_from_gradient,
        )
        if stats is not None:
            # Sums over the finite entries (the masked ones contribute 0).
            if r is not None:
                r = r if bad is None else r.masked_fill(bad, 0)
                stats["residual_sq"] += torch.dot(r, r).to(device)
            stats["grad_sq"] += torch.dot(gf, gf).to(device)
            h = g_hat if bad is None else g_hat.masked_fill(bad, 0)
            stats["estimate_sq"] += torch.dot(h, h).to(device)
        if nesterov:
            # One more intercept step on this gradient: Ĝ + β_t (g − Ĝ) (see TrainableOptimizer).
            g_hat.add_(gf - g_hat, alpha=rate)

        if adam:
            v = state["exp_avg_sq"].view(-1)
            v.mul_(beta2).addcmul_(gf, gf, value=1 - beta2)
            bias_correction2 = 1 - beta2 ** state["step"].item()
            g_hat.div_((v / bias_correction2).sqrt_().add_(eps))

        if weight_decay != 0:
            w.mul_(1 - lr * weight_decay)
        w.add_(g_hat, alpha=-lr)
        if move_anchor is not None:
            move_anchor(state, w, bf, anchor_rate)
        if kept is not None:
            for t, old in kept:
                t[bad] = old
        if not in_place:
            p.copy_(w.view_as(p))

    if stats is not None and any(a != "skip" for a in actions):
        stats["steps"] += 1
    return stats
