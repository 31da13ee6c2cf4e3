r"""The Trainable Optimizer (TO) as a ``torch.optim.Optimizer``.

Paper: Ruiqi Wang and Diego Klabjan, "A Trainable Optimizer", arXiv:2508.01764.

This module is the torch plumbing: param groups and their validation, state created on first
use, checkpoints (``load_state_dict``, old checkpoints), diagnostics.  The step itself is the
functional :func:`hf_to.functional.trainable_to`; each form's math is in :mod:`hf_to.forms`;
every keyword with its default and check is in :mod:`hf_to.config`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable
from itertools import chain, repeat
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.weak import WeakIdKeyDictionary

from . import tuning
from .config import FIELDS, LEGACY_DEFAULTS, StepConfig, constructor_signature, validate
from .distributed import (
    all_reduce_diagnostics,
    check_unflattened,
    flattened_reason,
    is_sharded,
    local_view,
    make_stats_reducer,
)
from .forms import FORMS, get_form
from .functional import Path, empty_stats, trainable_to

__all__ = ["TrainableOptimizer"]

logger = logging.getLogger("hf_to")

#: Group key stamped into every param group so that a checkpoint of another optimizer is
#: recognised on ``load_state_dict``.
ALGORITHM_KEY = "algorithm"
ALGORITHM = "trainable_to"
#: Keys an older version kept in param groups and this one does not (dropped on load).
_RETIRED_KEYS = {"slope_input": "weights", "anchor_rate": None}


class TrainableOptimizer(Optimizer):
    r"""Pseudo-linear Trainable Optimizer: weights step along a trained gradient estimator.

    For every parameter tensor, flattened to :math:`w`, with stochastic gradient :math:`g_t`:

    .. math::
        \begin{aligned}
        &\textbf{input}: \gamma \text{ (lr)},\ \alpha \text{ (slope rate)},\
            \beta \text{ (intercept rate)},\ \omega \text{ (weight decay)},\
            \beta_2, \epsilon \text{ (preconditioner)} \\
        &\textbf{init}: A_0 = 0,\ b_0 = g_0 \ (\text{so } r_0 = 0),\ v_0 = 0 \\
        &\textbf{for}\ t = 0, 1, \dots \\
        &\quad r_t = A_t w_t + b_t - g_t                         && \text{residual} \\
        &\quad A_{t+1} = A_t - \alpha\, \partial_A \tfrac12\lVert r_t\rVert^2,\quad
               b_{t+1} = b_t - \beta_t\, r_t                     && \text{estimator step} \\
        &\quad \beta_t = \beta / (1 - (1-\beta)^{t+1}) \ \text{(default)},\
               \max(\beta, 1/(t+1)) \text{ or } \beta \ \text{(paper)} && \text{intercept rate} \\
        &\quad \hat G_t = A_{t+1} w_t + b_{t+1}                  && \text{estimate} \\
        &\quad \tilde G_t = \hat G_t + \lambda (g_t - \hat G_t),\ \lambda = 0.55 \ \text{(default)},
               \ \beta_t \ \text{or}\ 0 \ \text{(paper)}             && \text{look-ahead} \\
        &\quad d_t = \tilde G_t \ \text{(paper)}\quad\text{or}\quad
               d_t = \tilde G_t / (\sqrt{v_{t+1}/(1-\beta_2^{t+1})} + \epsilon),\
               v_{t+1} = \beta_2 v_t + (1-\beta_2) g_t^2     && \text{preconditioner} \\
        &\quad w_{t+1} = (1 - \gamma\omega)\, w_t - \gamma\, d_t && \text{weights}
        \end{aligned}

    The structure of :math:`A` is chosen by ``estimator`` (see :mod:`hf_to.forms`):
    ``"full"`` (dense, the paper's main form, small tensors only), ``"diagonal"`` and
    ``"rank_one"`` (the paper's O(n) variants), ``"none"`` (:math:`A \equiv 0`, EMA momentum:
    with ``preconditioner="none", beta_warmup=False, nesterov=False`` it is
    ``SGD(momentum=1-β, dampening=1-β)``) and ``"folded"`` (the default: the diagonal form with
    its slope folded into the intercept, :math:`b_{t+1} = b_t - (\beta_t + \alpha_i w_i^2) r_t`,
    exact while the weights stand still; it drops the slope's term :math:`a \odot \Delta w`).  With the normalised slope rate (default) the
    :math:`\alpha` above is divided per structure by the squared norm of the estimator's input
    Jacobian plus a floor (see :mod:`hf_to.forms`).

    The default ``preconditioner="adam"`` makes the step size independent of the gradient
    scale so that AdamW's learning rates (1e-5 … 3e-4 for LLM fine-tuning) carry over; the
    paper-literal update is ``preconditioner="none", alpha_scaling="none",
    intercept_init="zero", beta_warmup=False, nesterov=False`` (registered as
    ``"to_paper_<estimator>"``).
    The measurements behind each default are in ``docs/design-decisions.md``.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate :math:`\gamma` (default: 1e-3).
        estimator: structure of :math:`A`: ``"folded"`` (default since 2026-12-07; 4 bytes of
            estimator per parameter, 8 with the preconditioner: AdamW's), ``"diagonal"`` (the
            default before, ``"to_diagonal"``; 8 bytes, 12), ``"rank_one"``, ``"full"`` or
            ``"none"``.  A checkpoint written with another estimator resumes with its own (with a
            warning) when this optimizer's estimator is the default; any other mismatch raises.
        alpha: slope rate :math:`\alpha`, the step of :math:`A` on the residual loss
            (default: 0.1; with ``alpha_scaling="normalized"`` the largest fraction of the
            residual that the slope term absorbs per step, below 2, where the normalised step
            stops shrinking the residual and the estimator diverges).
        beta: intercept rate :math:`\beta`, the step of :math:`b` (default: 0.1; the
            ``1 - beta1`` of Adam).
        preconditioner: ``"adam"`` (default) or ``"none"`` (paper).
        beta2: decay of the preconditioner's second moment (default: 0.999).
        eps: term added to the preconditioner's denominator (default: 1e-8).
        weight_decay: decoupled weight decay :math:`\omega`, as in AdamW (default: 0).
        alpha_scaling: ``"normalized"`` (default) or ``"none"`` (paper).
        norm_floor: :math:`\delta^2`, the floor of the weights' mean square in the normalised
            slope rate; keeps :math:`A` bounded when :math:`w \approx 0` (default: 1e-3).
        beta_warmup: the intercept rate of the first steps (see
            :func:`hf_to.forms.intercept_rate`).  ``"adam"`` (default):
            :math:`\beta_t = \beta/(1-(1-\beta)^{t+1})`, Adam's bias correction written as a
            rate, so that with :math:`A \equiv 0` the optimizer *is* AdamW and the slope term is
            a trained correction on top of it; ``True``: :math:`\max(\beta, 1/(t+1))`, the
            running mean of the first :math:`1/\beta` corrected gradients (the default before
            2026-11-30, ``"to_running_mean"`` in the registry; it lags Adam's EMA early on);
            ``False``: the paper's constant :math:`\beta`.  With ``True`` or ``"adam"`` the first
            step sets :math:`b_1 = g_0 - A_0 w_0` whatever ``intercept_init`` says.
        nesterov: the look-ahead weight λ of the step direction
            :math:`d_t = (1-\lambda)\hat G_{t+1}(w_t) + \lambda g_t`, the estimate moved toward
            the gradient it was just trained on (the estimator's look-ahead, as Nesterov's
            momentum looks one step ahead).  A float λ in [0, 1]; default ``0.55`` since
            2026-12-06: heavy memory (β = 0.1 keeps a β₁ = 0.9 average in the intercept) and a
            light look-ahead, the direction NAdamW steps along in runs of a few hundred steps
            (:math:`\approx 0.45\, m_t + 0.55\, g_t`; chosen on the proxy and confirmed on
            SmolLM2-135M, docs/design-decisions.md).  ``True`` ties the weight to the intercept
            rate, λ = β_t: the step along :math:`\hat G_{t+1}(w_t) + \beta_t (g_t - \hat
            G_{t+1}(w_t))`, the estimate after one more intercept step on the same gradient
            (the default from 2026-11-30 to 2026-12-06, ``"to_lookahead_beta"`` in the
            registry); with ``estimator="none"`` and the Adam preconditioner it is NAdam's
            direction :math:`\beta_1 m_t + (1-\beta_1) g_t` with a constant :math:`\beta_1`.
            ``False`` (λ = 0) is the paper's step along :math:`\hat G_{t+1}(w_t)`
            (``"to_without_nesterov"``).  A checkpoint resumes with the value it was written
            with; one written before the keyword existed resumes with ``False``.
        intercept_init: ``"gradient"`` (default, :math:`b_0 = g_0`) or ``"zero"`` (paper-literal
            reading, :math:`b_0 = 0`).
        max_full_numel: largest tensor (in elements) the ``"full"`` estimator accepts; its
            state holds ``n**2`` values (default: 4096, i.e. 64 MiB in fp32).
        diagnostics: (``True`` or ``False``) accumulate the estimator's health on the device (see
            :meth:`diagnostics`); off by default, and then no step reads anything back.
        fused: ``None`` (default) or ``True``: the fastest step available.  On a CPU that is the
            one-pass C kernel of :mod:`hf_to.native` (one call per param group; built on first
            use with the system C compiler, ``HF_TO_NATIVE=0`` turns it off), for plain or
            FSDP2-sharded (one all-reduce per group) float32/bfloat16/float16 parameters and the
            folded, diagonal, rank-one and none estimators.  It carries whole-tensor sums from one step
            to the next and notices any write PyTorch makes to the weights or state between
            steps (version counters); writes through ``p.data`` bypass those counters, so write on the parameter itself
            under ``torch.no_grad()`` instead, or set ``HF_TO_NATIVE=0``.
            On CUDA (plain or FSDP2-sharded parameters) it is the multi-tensor Triton step of
            :mod:`hf_to.gpu`: two kernel launches per param group whatever its tensor count
            (three with sharded parameters), no host sync.  Elsewhere (no C compiler,
            ``HF_TO_NATIVE=0``, no triton) the readable path.
            ``False``: the readable per-tensor path.  Which path each group took, and why, is
            logged at DEBUG level (logger ``hf_to``) and returned by :meth:`step_paths`.
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
        tune_beta: κ, the step of :math:`\log\beta` on the training loss's hypergradient
            (:mod:`hf_to.tuning`): each param group trains its own β, carried forward through
            the trajectory, within [0.02, 0.6]; the tuned β is the group's ``beta``, saved with
            it.  ``0`` (default) keeps β fixed.  Adds two float32 vectors of one value in 64
            per tensor (denser in a group of fewer than 262,144 values) and two reads back to
            the host per group and step (refused with ``capturable=True``, and on the flat
            partitions of DeepSpeed ZeRO and FSDP1).  A checkpoint written before the keyword
            existed resumes with 0.

    State (per parameter, created on the first step): ``step`` (0-d float32; on the CPU, on
    the parameter's device for CUDA parameters or ``capturable=True``),
    ``b`` and the slope state of the estimator (``a``; ``u``, ``v``; ``A``; none for ``folded``
    and ``none``), and
    ``exp_avg_sq`` with the Adam preconditioner.  State is float32 for float16/bfloat16/float32
    parameters and float64 for float64 parameters, and keeps that dtype through
    ``load_state_dict``.

    Non-finite gradients: with the coordinate-wise estimators ``"folded"``, ``"diagonal"`` and ``"none"``
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
        lr: float | Tensor = StepConfig.lr,
        *,
        diagnostics: bool = False,
        **options: Any,
    ) -> None:
        unknown = sorted(set(options) - set(FIELDS))
        if unknown:
            raise TypeError(f"TrainableOptimizer got unexpected keyword arguments {unknown}; valid: {list(FIELDS)}")
        if not isinstance(diagnostics, bool):
            raise ValueError(f"Invalid diagnostics: {diagnostics!r} (expected True or False)")
        defaults = vars(StepConfig(lr=lr, **options)).copy()
        validate(defaults)
        defaults[ALGORITHM_KEY] = ALGORITHM
        self.track_diagnostics = diagnostics
        super().__init__(params, defaults)
        self._diag: list[dict[str, Tensor]] = []
        # The native kernel's per-group descriptors and carried sums (hf_to.native): owned
        # here so that they, and the state tensors they reference, go with the optimizer.
        self._native_plans: dict = {}
        # Per param group index: the group and the (estimator, preconditioner) its state was
        # last checked against; a group changed (or replaced) between steps is checked again.
        self._forms: dict[int, tuple[dict, tuple[str, str]]] = {}
        self._paths: dict[int, Path] = {}

    # -- torch.optim plumbing -------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            validate(group, params=group["params"])
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
        self._native_plans, self._forms, self._paths = {}, {}, {}
        self._given_params = WeakIdKeyDictionary({p: True for g in self.param_groups for p in g["params"]})
        for group in self.param_groups:
            _upgrade_group(group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, refusing one of another optimizer or another estimator.

        Unlike the base class, floating-point state keeps its saved dtype (float32 estimator
        state of bfloat16 parameters stays float32) and is only moved to the parameter's device;
        float64 parameters of a group with ``state_dtype=None`` get float64 state (widened, as a
        fresh start would make it).  Every state tensor is copied, the step count too (a 0-d
        float32 CPU tensor, also when saved as a Python number): the optimizer never shares
        state with the dict it loaded.  Keywords a checkpoint predates take the values of its
        day (:data:`hf_to.config.LEGACY_DEFAULTS`), so it resumes exactly.
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
            if saved.get("slope_input", "weights") != "weights":
                raise ValueError(
                    f"param group {i} was written with slope_input={saved['slope_input']!r}, an experimental form "
                    "this version no longer has (it lost the fine-tuning study; docs/design-decisions.md)"
                )
            # beta_warmup and nesterov need not match: the saved group's values (and state) win,
            # so a checkpoint written under an older default resumes exactly.  So does the
            # estimator where this optimizer's equals today's default (a Trainer resuming with
            # --optim trainable_to builds it so; the default changed on 2026-12-07); another
            # estimator, or another preconditioner, must match.
            for key in ("estimator", "preconditioner"):
                if key == "estimator" and saved.get(key) in FORMS and group[key] == StepConfig.estimator != saved[key]:
                    logger.warning(
                        "hf_to: param group %d resumes with the checkpoint's estimator=%r, not the default %r",
                        i,
                        saved[key],
                        group[key],
                    )
                elif saved.get(key) != group[key]:
                    raise ValueError(
                        f"param group {i}: the checkpoint was written with {key}={saved.get(key)!r}, "
                        f"this optimizer has {key}={group[key]!r}; their states are not interchangeable"
                    )
        self._native_plans.clear()
        self._forms.clear()
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            _upgrade_group(group)
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

    # (Not ``_init_group``: torch.compile's Dynamo special-cases a method of that name on
    # optimizers and expects torch's return convention from it.)
    def _gather(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], list[dict]]:
        """Collect the parameters with gradients; create their state on first use."""
        form = get_form(group["estimator"])
        params, grads, states = [], [], []
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
            if form.dense and is_sharded(p):
                raise ValueError(
                    f"estimator={form.name!r} cannot run on a sharded parameter of shape {tuple(p.shape)}: its "
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
                if group["tune_beta"] and (reason := flattened_reason(p, self._given_params)) is not None:
                    raise ValueError(
                        f"tune_beta cannot run on {reason}: each rank would tune its own beta on its slice of "
                        "the model. Use tune_beta=0 with DeepSpeed ZeRO or FSDP1; with FSDP2 (fully_shard) or "
                        "DDP it tunes one beta per param group from the sums of all ranks"
                    )
                _init_state(state, p, group)
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
            self._diag += [empty_stats() for _ in range(len(self.param_groups) - len(self._diag))]
        for i, group in enumerate(self.param_groups):
            form = (group["estimator"], group["preconditioner"])
            checked = self._forms.get(i)
            if checked is None or checked[0] is not group or checked[1] != form:
                self._check_state_form(i, group)
                self._forms[i] = (group, form)
            params, grads, states = self._gather(group)
            if not params:
                continue
            reducer = self._stats_reducer(params)
            snap = tuning.before_step(group, params, grads, states, reducer) if group["tune_beta"] else None
            # the step itself takes β as given (the functional step refuses tune_beta)
            config = StepConfig.from_group({**group, "tune_beta": 0.0})
            stats = trainable_to(
                params,
                grads,
                states,
                config,
                diagnostics=self.track_diagnostics,
                reduce_stats=reducer,
                native_plans=self._native_plans,
                on_path=lambda path, i=i: self._note_path(i, path),
            )
            if snap is not None:
                tuning.after_step(group, states, snap, config.lookahead)
            if stats is not None:
                acc = self._diag[i]
                for key, value in stats.items():
                    acc[key] = acc[key].to(value.device) + value
        return loss

    def _stats_reducer(self, params: list[Tensor]) -> Callable[[Tensor], Tensor] | None:
        """How to sum phase-1 partial sums across the ranks that hold shards of ``params``
        (``None``: nothing to sum, for tensors on one process or replicated by DDP)."""
        return make_stats_reducer(params)

    def _note_path(self, index: int, path: Path) -> None:
        if self._paths.get(index) != path:
            logger.debug("hf_to: param group %d takes the %s path (%s)", index, path.name, path.reason)
            self._paths[index] = path

    def step_paths(self) -> list[Path | None]:
        """Per param group, the path its last step took (``native``, ``triton`` or ``readable``) and
        why (``None`` for a group that has not stepped): what :func:`hf_to.functional.choose_path` chose."""
        return [self._paths.get(i) for i in range(len(self.param_groups))]

    def _check_state_form(self, index: int, group: dict[str, Any]) -> None:
        """Refuse a step whose group's ``estimator``/``preconditioner`` no longer match the state
        its parameters hold (changed in ``param_groups`` after a step): a clear ``ValueError``
        rather than a ``KeyError`` deep in the step, as ``load_state_dict`` refuses it."""
        expected = {"step", *get_form(group["estimator"]).state_keys(group["preconditioner"] == "adam")}
        for p in group["params"]:
            state = self.state.get(p)
            if not state:
                continue
            # the tuned rate's tangents (hf_to.tuning) come and go with tune_beta: any form may hold them
            keys = state.keys() - set(tuning.STATE_KEYS)
            if keys != expected:
                missing, extra = sorted(expected - keys), sorted(keys - expected)
                raise ValueError(
                    f"param group {index} has estimator={group['estimator']!r}, "
                    f"preconditioner={group['preconditioner']!r}, but the state of its parameter of shape "
                    f"{tuple(p.shape)} was made for another form (missing {missing}, unexpected {extra}); "
                    "estimator and preconditioner cannot change under existing state: restore them, or "
                    "start afresh with a new optimizer (or clear opt.state)"
                )

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
            self._diag = [empty_stats() for _ in self.param_groups] if self.track_diagnostics else []
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
        return get_form(group["estimator"]).predict(state, p.detach() if w is None else w)

    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors (all parameters, ``step`` included)."""
        return sum(
            v.numel() * v.element_size() for s in self.state.values() for v in s.values() if isinstance(v, Tensor)
        )


TrainableOptimizer.__init__.__signature__ = constructor_signature(  # type: ignore[attr-defined]
    leading=[
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Iterable),
    ],
    trailing=[inspect.Parameter("diagnostics", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool)],
)


# -- groups and state ----------------------------------------------------------------------


def _upgrade_group(group: dict[str, Any]) -> None:
    """A group of an older checkpoint: keywords it predates take the values of its day."""
    for key, value in LEGACY_DEFAULTS.items():
        group.setdefault(key, value)
    for key in _RETIRED_KEYS:
        group.pop(key, None)
    group.setdefault(ALGORITHM_KEY, ALGORITHM)


def _step_count(value: Any) -> Tensor:
    """A loaded ``step`` as this optimizer keeps it: a fresh 0-d float32 CPU tensor (checkpoints
    edited or converted by other tools may hold a Python number, or another dtype)."""
    if isinstance(value, Tensor):
        return value.detach().to(device="cpu", dtype=torch.float32, copy=True).reshape(())
    return torch.tensor(float(value), dtype=torch.float32)


def state_dtype_for(p: Tensor) -> torch.dtype:
    """Estimator state is float64 for float64 parameters and float32 otherwise."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _init_state(state: dict, p: Tensor, group: dict[str, Any]) -> None:
    w = p.detach().to(group.get("state_dtype") or state_dtype_for(p), copy=True)
    # ``step`` stays a CPU tensor where the host reads it (the readable path, the C kernel):
    # that costs no device sync.  The Triton step reads and advances it on the GPU.
    on_device = group.get("capturable", False) or local_view(p).device.type == "cuda"
    state["step"] = torch.tensor(0.0, dtype=torch.float32, device=local_view(p).device if on_device else "cpu")
    state["b"] = torch.zeros_like(w, memory_format=torch.contiguous_format)
    get_form(group["estimator"]).init(state, w.contiguous())
    if group["preconditioner"] == "adam":
        state["exp_avg_sq"] = torch.zeros_like(w, memory_format=torch.contiguous_format)
