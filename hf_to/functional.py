r"""The functional TO step: one path chooser, the readable per-tensor step, the calls of the kernels.

:func:`trainable_to` steps a list of tensors with one :class:`~hf_to.config.StepConfig`.
:func:`choose_path` alone decides which implementation runs a group — the C kernel
(:mod:`hf_to.native`), the Triton step (:mod:`hf_to.gpu`) or the readable path below — and why;
the optimizer logs the choice at DEBUG level and :meth:`~hf_to.TrainableOptimizer.step_paths`
reports it.  Every path computes the math of :class:`~hf_to.TrainableOptimizer`, each form's
per-element step coming from :mod:`hf_to.forms`.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import native
from .config import StepConfig, check_state_dtype
from .distributed import local_view
from .forms import Form, count_nonfinite, get_form, intercept_rate, nonfinite_action
from .rounding import with_float32_state
from .settings import env_switch

__all__ = ["Path", "choose_path", "empty_stats", "trainable_to"]

logger = logging.getLogger(__name__)

#: Diagnostic sums of one step (see :meth:`hf_to.TrainableOptimizer.diagnostics`).
STAT_KEYS = ("steps", "residual_sq", "grad_sq", "estimate_sq", "skipped")


def empty_stats(device: torch.device | str = "cpu") -> dict[str, Tensor]:
    return {k: torch.zeros((), dtype=torch.float64, device=device) for k in STAT_KEYS}


class Path(NamedTuple):
    """Which implementation steps a group (``"native"``, ``"triton"`` or ``"readable"``) and why."""

    name: str
    reason: str


#: ``HF_TO_TRITON=0`` keeps CUDA groups off the Triton step (then they take the readable path).
ENV_TRITON = "HF_TO_TRITON"
_gpu_import_failed = False


def _gpu_module(device_type: str) -> tuple[Any, str]:
    """:mod:`hf_to.gpu` (imported on first use by a CUDA group: CPU-only use never needs triton;
    the tests import it themselves to run it in Triton's interpreter), or ``None`` and why."""
    global _gpu_import_failed
    gpu = sys.modules.get(f"{__package__}.gpu")
    if gpu is None and device_type == "cuda" and not _gpu_import_failed:
        try:
            from . import gpu
        except ImportError as err:
            logger.warning("hf_to: cannot import the Triton step (%s); CUDA groups take the readable path", err)
            _gpu_import_failed = True
    if gpu is None:
        return None, "triton is not installed" if _gpu_import_failed else "the Triton step is not loaded"
    if device_type == "cuda" or (device_type == "cpu" and gpu.INTERPRET_ON_CPU):
        return gpu, ""
    return None, f"the Triton step runs on CUDA tensors, these are on {device_type}"


def choose_path(
    cfg: StepConfig,
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
) -> Path:
    """The one place that decides how a group steps (cf. ``torch.optim.adam``'s dispatcher).

    ``fused=False`` is the readable path.  Otherwise a CUDA group (or a CPU group with
    :data:`hf_to.gpu.INTERPRET_ON_CPU`) takes the Triton step when its form claims ``"triton"``
    and the tensors fit it; a CPU group (plain or FSDP2 shards) takes the C kernel when its form claims
    ``"native"``, the tensors fit it and the kernel builds; anything else the readable path.
    """
    form = get_form(cfg.estimator)
    if cfg.fused is False:
        return Path("readable", "fused=False")
    device_type = local_view(params[0]).device.type
    triton_on = env_switch(ENV_TRITON)  # (read every step: a bad value raises wherever it runs)
    why = f"no kernel runs on {device_type} tensors"
    if device_type == "cpu":
        why = _native_misfit(cfg, form, params, grads, states)
        if why is None:
            return Path("native", "C kernel")
    gpu, gpu_why = _gpu_module(device_type)
    if gpu is None:
        return Path("readable", why if device_type == "cpu" else gpu_why)
    if "triton" not in form.kernels:
        return Path("readable", f"estimator={cfg.estimator!r} has no Triton step")
    if not triton_on:
        return Path("readable", f"{ENV_TRITON}=0")
    misfit = gpu.misfit(params, grads, states, form)
    return (
        Path("readable", f"the Triton step does not take these tensors: {misfit}")
        if misfit
        else Path("triton", "Triton step")
    )


def _native_misfit(cfg: StepConfig, form: Form, params, grads, states) -> str | None:
    """Why a CPU group (plain, or FSDP2 shards) cannot take the C kernel (``None``: it can)."""
    if "native" not in form.kernels:
        return f"estimator={cfg.estimator!r} has no C kernel"
    if not native.eligible(cfg.estimator, params, grads, states):
        return "the tensors do not fit the C kernel (dtype, layout or type)"
    if not native.available():
        return "the C kernel is unavailable (HF_TO_NATIVE=0, or no compiler)"
    return None


def trainable_to(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    config: StepConfig | None = None,
    *,
    diagnostics: bool = False,
    reduce_stats: Callable[[Tensor], Tensor] | None = None,
    native_plans: dict | None = None,
    on_path: Callable[[Path], None] | None = None,
    **keywords: Any,
) -> dict[str, Tensor] | None:
    """Functional TO step over a list of tensors (the math of :class:`~hf_to.TrainableOptimizer`).

    ``config`` (or the :class:`~hf_to.config.StepConfig` fields as ``keywords``, with its
    defaults) sets the step.  The step runs in two phases.  Phase 1 computes, per tensor,
    partial sums over the elements at hand: a non-finite sentinel (the number of non-finite
    gradient entries) and the whole-tensor sums the form needs (``Form.stat_names``).  They are
    passed through ``reduce_stats`` (the identity on one process; one all-reduce for all
    tensors when parameters are sharded) and decide the tensors to skip or mask.  Phase 2 is
    elementwise given those sums.  :func:`choose_path` picks the implementation; ``on_path`` is
    told its choice.  Returns the local diagnostic sums of this call, or ``None`` when
    ``diagnostics`` is off.
    """
    if config is None:
        config = StepConfig(**keywords)
    elif keywords:
        raise TypeError("pass either config or keywords, not both")
    if config.tune_beta:
        raise ValueError(
            "Invalid tune_beta: the functional step takes beta as given; the tuned rate (hf_to.tuning) "
            "lives in TrainableOptimizer, which keeps it per param group"
        )
    if not params:
        return None
    path = choose_path(config, params, grads, states)
    if on_path is not None:
        on_path(path)
    if path.name == "triton":
        return sys.modules[f"{__package__}.gpu"].triton_trainable_to(
            params, grads, states, config, diagnostics=diagnostics, reduce_stats=reduce_stats
        )
    if config.capturable and local_view(params[0]).device.type == "cuda":
        raise RuntimeError(
            f"capturable=True: this CUDA param group (estimator={config.estimator!r}, fused={config.fused!r}) "
            f"cannot take the Triton step of hf_to.gpu ({path.reason}), and the readable path reads step counts "
            "and non-finite counts on the host"
        )
    if path.name == "native":
        return native.native_step(
            params, grads, states, config, diagnostics=diagnostics, plans=native_plans, reduce_stats=reduce_stats
        )
    return _readable(params, grads, states, config, diagnostics=diagnostics, reduce_stats=reduce_stats)


def _readable(params, grads, states, cfg: StepConfig, *, diagnostics: bool, reduce_stats):
    """The readable path; bfloat16 state through float32 working copies (:mod:`hf_to.rounding`)."""
    for p, state in zip(params, states):
        if p.dtype == torch.float64 and state["b"].dtype != torch.float64:
            check_state_dtype(state["b"].dtype, [p])  # e.g. a model made float64 after its first step
    kwargs = dict(params=params, grads=grads, cfg=cfg, diagnostics=diagnostics, reduce_stats=reduce_stats)
    if states[0]["b"].dtype == torch.bfloat16:
        return with_float32_state(_single_tensor, states, **kwargs)
    return _single_tensor(states=states, **kwargs)


def _single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    *,
    cfg: StepConfig,
    diagnostics: bool,
    reduce_stats: Callable[[Tensor], Tensor] | None,
) -> dict[str, Tensor] | None:
    form = get_form(cfg.estimator)
    lr = float(cfg.lr)
    device = grads[0].device
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
        torch.stack([count(gf), *form.local_stats(state, w, gf, bf)]).to(device)
        for (w, gf, bf, _), state in zip(views, states)
    ]
    sums = torch.stack(rows)
    if reduce_stats is not None:
        sums = reduce_stats(sums)
    counts = sums[:, 0].tolist()
    if reduce_stats is None:
        counts = [0.0 if math.isfinite(c) else count_nonfinite(v[1]).item() for c, v in zip(counts, views)]
    actions = [nonfinite_action(form, c, n, sums.dtype) for c, n in zip(counts, numels)]

    stats = empty_stats(device) if diagnostics else None
    for p, n, state, (w, gf, bf, in_place), row, action in zip(params, numels, states, views, sums, actions):
        if action != "step" and stats is not None:
            stats["skipped"] += 1
        if action == "skip":
            continue
        bad = kept = None
        if action == "masked":
            # Some entries of a coordinate-wise form's gradient are non-finite: step the others
            # with g = 0 there, then put back those entries' weight and state (rare).
            bad = ~torch.isfinite(gf)
            slots = [w, *(state[k].view(-1) for k in form.state_keys(cfg.adam))]
            kept = [(t, t[bad]) for t in slots]
            gf = gf.masked_fill(bad, 0)
        first = state["step"].item() == 0
        state["step"] += 1
        rate = intercept_rate(cfg.beta, state["step"].item(), cfg.beta_warmup)
        named = {k: v.to(bf.device) for k, v in zip(form.stat_names, row[1:])}
        g_hat, r = _estimator_step(form, state, w, gf, bf, named, n, cfg, rate, first)
        if stats is not None:
            # Sums over the finite entries (the masked ones contribute 0).
            if r is not None:
                r = r if bad is None else r.masked_fill(bad, 0)
                stats["residual_sq"] += torch.dot(r, r).to(device)
            stats["grad_sq"] += torch.dot(gf, gf).to(device)
            h = g_hat if bad is None else g_hat.masked_fill(bad, 0)
            stats["estimate_sq"] += torch.dot(h, h).to(device)
        if cfg.looks_ahead:
            # The look-ahead Ĝ + λ (g − Ĝ): a fixed weight λ (default 0.55), or λ = β_t with
            # nesterov=True, one more intercept step on this gradient (see TrainableOptimizer).
            g_hat.add_(gf - g_hat, alpha=cfg.lookahead(rate))
        if cfg.adam:
            v = state["exp_avg_sq"].view(-1)
            v.mul_(cfg.beta2).addcmul_(gf, gf, value=1 - cfg.beta2)
            bias_correction2 = 1 - cfg.beta2 ** state["step"].item()
            g_hat.div_((v / bias_correction2).sqrt_().add_(cfg.eps))
        if cfg.weight_decay != 0:
            w.mul_(1 - lr * cfg.weight_decay)
        w.add_(g_hat, alpha=-lr)
        if kept is not None:
            for t, old in kept:
                t[bad] = old
        if not in_place:
            p.copy_(w.view_as(p))

    if stats is not None and any(a != "skip" for a in actions):
        stats["steps"] += 1
    return stats


def _estimator_step(
    form: Form,
    state: dict,
    w: Tensor,
    g: Tensor,
    b: Tensor,
    sums: dict,
    n: int,
    cfg: StepConfig,
    rate: float,
    first: bool,
) -> tuple[Tensor, Tensor | None]:
    r"""Residual, estimator step and estimate of one tensor in place: :math:`(\hat G_t, r_t)` (flat).

    On the first step with ``intercept_init="gradient"`` the intercept starts at
    :math:`b_0 = g_0 - A_0 w_0 = g_0`, so :math:`r_0 = 0`, nothing else moves and the residual
    is ``None``.
    """
    if first and form.first is not None:
        sums = form.first(state, w, sums, n)
    if first and cfg.intercept_from_gradient:
        b.copy_(g)
        return b.clone(), None
    rates = dict(nf=n, alpha=cfg.alpha, floor=cfg.norm_floor, beta_t=rate, normalize=cfg.normalize)
    if form.tensor_step is not None:
        r, g_hat = form.tensor_step(state, w, g, b, sums, **rates)
        return g_hat, r
    slope = [state[k].view(-1) for k in form.slope_keys]
    s1, s2 = [*slope, None, None][:2]
    given = [sums.get(k) for k in ("ww", "vw", "uu", "ub", "ug")]
    r, s1_new, s2_new, b_new, g_hat = form.step(w, g, b, s1, s2, *given, *rates.values())
    for old, new in zip(slope, (s1_new, s2_new)):
        old.copy_(new)
    b.copy_(b_new)
    return g_hat, r
