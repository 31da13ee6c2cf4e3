r"""Fused step kernels: one pass over each tensor per phase, compiled when asked.

:func:`fused_trainable_to` is the fast twin of the readable
``hf_to.optimizer._single_tensor_trainable_to``, with the same two phases:

1. one *stats* kernel per tensor reads ``w`` and ``g`` (and the rank-one factors) once and
   returns the row ``[Σg, *Estimator.stat_names]``;  the rows go through ``reduce_stats``
   (one all-reduce for sharded parameters) and one host read of the finite flags;
2. one *update* kernel per tensor does the residual, the estimator step, the estimate, the
   Adam preconditioner and the weight update in a single pass: it reads ``w``, ``g`` and the
   ``k`` state tensors once and writes ``w`` and the ``k`` states once — the ``2k + 3``
   streams of an in-place elementwise step, with no parameter-sized temporary when compiled.

The kernels are plain PyTorch functions.  ``torch.compile`` (Inductor, ``dynamic=True`` so
that one kernel serves every tensor size) fuses each into one loop; where compilation is
unavailable or fails the same functions run eagerly (correct, but with temporaries), and a
warning says so once.  Compilation happens on the first call for each combination of flags
and dtypes, once per process; :func:`compile_seconds` reports the time spent there.

On a CPU without sharded parameters (no ``reduce_stats``) the two phases run tensor by
tensor, so that phase 2 re-reads ``w`` and ``g`` from the cache rather than from memory;
elsewhere all rows are reduced and read back together, as in the readable path.

*Low-memory state.*  With ``bfloat16`` state tensors the kernels compute in float32 and
store with **stochastic rounding**: a uniform random integer in ``[0, 2**16)`` is added to
the float32 bit pattern and the low 16 bits are dropped, so each stored value rounds up or
down with probability proportional to its distance, and updates smaller than one bfloat16
ulp survive on average instead of vanishing (the expected stored value equals the float32
value).  Parameters themselves are stored with round-to-nearest, as in the readable path.

The ``full`` estimator is matrix-vector bound (``n ≤ max_full_numel``) and keeps the
readable path.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .distributed import local_view
from .estimators import TINY

__all__ = [
    "AUTO_MIN_NUMEL",
    "FUSED_ESTIMATORS",
    "STATE_DTYPES",
    "compile_available",
    "compile_seconds",
    "fused_trainable_to",
    "stochastic_round_",
    "use_fused",
]

logger = logging.getLogger(__name__)

#: Estimators with fused kernels (``full`` keeps the readable path).
FUSED_ESTIMATORS = ("diagonal", "rank_one", "none")

#: Accepted ``state_dtype`` values (``None``: float32, float64 for float64 parameters).
STATE_DTYPES = (None, torch.float32, torch.bfloat16)

#: With ``fused=None`` a CPU param group is compiled from this many elements on (a full
#: fine-tune of a 100M-parameter model qualifies, a LoRA adapter set or a test model does not):
#: compilation costs tens of seconds once per process, which only long runs of large
#: groups pay back.  CUDA groups are always compiled.
AUTO_MIN_NUMEL = 1 << 24

#: Set ``HF_TO_COMPILE=0`` to never call ``torch.compile`` (the kernels then run eagerly).
_ENV_COMPILE = "HF_TO_COMPILE"


# -- stochastic rounding -------------------------------------------------------------------


def _round_bf16(x: Tensor) -> Tensor:
    """float32 ``x`` rounded stochastically to bfloat16 (unbiased: E[result] = x)."""
    bits = x.view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    # Adding to the bit pattern moves away from zero for either sign; the mask truncates.
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def _store(dst: Tensor, x: Tensor) -> None:
    """Write ``x`` (float32/float64) into the state tensor ``dst`` of any float dtype."""
    if dst.dtype == torch.bfloat16:
        dst.copy_(_round_bf16(x.float()))
    else:
        dst.copy_(x)


def stochastic_round_(dst: Tensor, x: Tensor) -> Tensor:
    """Copy float32 ``x`` into bfloat16 ``dst`` with stochastic rounding; return ``dst``."""
    _store(dst, x)
    return dst


def _compute_dtype(b: Tensor) -> torch.dtype:
    return torch.float64 if b.dtype == torch.float64 else torch.float32


# -- phase 1: partial sums -----------------------------------------------------------------


def _stats_diagonal(w: Tensor, g: Tensor, b: Tensor) -> Tensor:
    cd = _compute_dtype(b)
    wf = w.to(cd)
    return torch.stack([g.to(cd).sum(), (wf * wf).sum()])


def _stats_none(w: Tensor, g: Tensor, b: Tensor) -> Tensor:
    return g.to(_compute_dtype(b)).sum().reshape(1)


def _stats_rank_one(w: Tensor, g: Tensor, b: Tensor, u: Tensor, v: Tensor) -> Tensor:
    cd = _compute_dtype(b)
    wf, gf, bf, uf, vf = w.to(cd), g.to(cd), b.to(cd), u.to(cd), v.to(cd)
    # Same order as RankOneEstimator.stat_names: ww, vw, uu, ub, ug.
    return torch.stack([gf.sum(), (wf * wf).sum(), (vf * wf).sum(), (uf * uf).sum(), (uf * bf).sum(), (uf * gf).sum()])


# -- phase 2: the elementwise step ---------------------------------------------------------


def _finish(
    p: Tensor,
    w: Tensor,
    gf: Tensor,
    g_hat: Tensor,
    exp_avg_sq: Tensor | None,
    r: Tensor | None,
    lr: float,
    decay: float,
    beta2: float,
    bias_correction2: float,
    eps: float,
    diagnostics: bool,
) -> Tensor | None:
    """Preconditioner, weight update and (optionally) the diagnostic sums ``[r·r, g·g, Ĝ·Ĝ]``."""
    d = g_hat
    if exp_avg_sq is not None:
        v2 = exp_avg_sq.to(w.dtype) * beta2 + (1 - beta2) * gf * gf
        d = g_hat / ((v2 / bias_correction2).sqrt() + eps)
        _store(exp_avg_sq, v2)
    p.copy_(w * decay - lr * d)
    if not diagnostics:
        return None
    rr = (r * r).sum() if r is not None else torch.zeros((), dtype=w.dtype, device=w.device)
    return torch.stack([rr, (gf * gf).sum(), (g_hat * g_hat).sum()])


def _update_diagonal(
    p: Tensor,
    g: Tensor,
    b: Tensor,
    a: Tensor,
    exp_avg_sq: Tensor | None,
    row: Tensor,
    n: int,
    lr: float,
    decay: float,
    alpha: float,
    beta: float,
    beta2: float,
    bias_correction2: float,
    eps: float,
    normalize: bool,
    floor: float,
    seed_intercept: bool,
    diagnostics: bool,
) -> Tensor | None:
    cd = _compute_dtype(b)
    w, gf = p.to(cd), g.to(cd)
    r = None
    if seed_intercept:  # b_0 = g_0: r_0 = 0, the slope stays at A_0 = 0
        g_hat = gf
        _store(b, gf)
    else:
        af, bf = a.to(cd), b.to(cd)
        r = af * w + bf - gf
        if normalize:
            af = af - alpha * r * w / (w * w + (row[1] / n + floor + TINY))
        else:
            af = af - alpha * (r * w)
        bf = bf - beta * r
        g_hat = af * w + bf
        _store(a, af)
        _store(b, bf)
    return _finish(p, w, gf, g_hat, exp_avg_sq, r, lr, decay, beta2, bias_correction2, eps, diagnostics)


def _update_none(
    p: Tensor,
    g: Tensor,
    b: Tensor,
    exp_avg_sq: Tensor | None,
    lr: float,
    decay: float,
    beta: float,
    beta2: float,
    bias_correction2: float,
    eps: float,
    seed_intercept: bool,
    diagnostics: bool,
) -> Tensor | None:
    cd = _compute_dtype(b)
    w, gf = p.to(cd), g.to(cd)
    r = None
    if seed_intercept:
        g_hat = gf
    else:
        bf = b.to(cd)
        r = bf - gf
        g_hat = bf - beta * r
    _store(b, g_hat)
    return _finish(p, w, gf, g_hat, exp_avg_sq, r, lr, decay, beta2, bias_correction2, eps, diagnostics)


def _update_rank_one(
    p: Tensor,
    g: Tensor,
    b: Tensor,
    u: Tensor,
    v: Tensor,
    exp_avg_sq: Tensor | None,
    row: Tensor,
    n: int,
    lr: float,
    decay: float,
    alpha: float,
    beta: float,
    beta2: float,
    bias_correction2: float,
    eps: float,
    normalize: bool,
    floor: float,
    first: bool,
    seed_intercept: bool,
    diagnostics: bool,
) -> Tensor | None:
    cd = _compute_dtype(b)
    w, gf = p.to(cd), g.to(cd)
    ww, vw, uu, ub, ug = row[1], row[2], row[3], row[4], row[5]
    if first:  # v_0 = w_0/‖w_0‖ (1/√n when w_0 = 0), so v_0ᵀw_0 = ‖w_0‖
        norm = ww.sqrt()
        vf = torch.where(norm > 0, w / norm.clamp_min(TINY), n**-0.5)
        vw = norm
    else:
        vf = v.to(cd)
    r = None
    if seed_intercept:
        g_hat = gf
        _store(b, gf)
        _store(v, vf)
    else:
        uf, bf = u.to(cd), b.to(cd)
        r = bf - gf + uf * vw
        ur = uu * vw + ub - ug
        rate = alpha / (vw * vw + uu * ww + n * floor + TINY) if normalize else alpha
        uf = uf - r * (rate * vw)
        vf = vf - w * (rate * ur)
        vw_new = vw - rate * ur * ww
        bf = bf - beta * r
        g_hat = bf + uf * vw_new
        _store(u, uf)
        _store(v, vf)
        _store(b, bf)
    return _finish(p, w, gf, g_hat, exp_avg_sq, r, lr, decay, beta2, bias_correction2, eps, diagnostics)


_STATS: dict[str, Callable[..., Tensor]] = {
    "diagonal": _stats_diagonal,
    "rank_one": _stats_rank_one,
    "none": _stats_none,
}
_UPDATES: dict[str, Callable[..., Tensor | None]] = {
    "diagonal": _update_diagonal,
    "rank_one": _update_rank_one,
    "none": _update_none,
}


# -- compilation with an eager fallback ----------------------------------------------------

_compiled: dict[str, Callable[..., Any]] = {}
_compile_failed = False
_compile_seconds = 0.0
_seen_keys: set[tuple] = set()


def compile_available() -> bool:
    """Whether the fused kernels will be compiled (``torch.compile`` present, not disabled, not failed)."""
    if _compile_failed or os.environ.get(_ENV_COMPILE, "1") == "0":
        return False
    return hasattr(torch, "compile")


def compile_seconds() -> float:
    """Wall time this process spent in kernel calls that compiled a new kernel variant."""
    return _compile_seconds


def _disable_compile(err: BaseException) -> None:
    global _compile_failed
    if not _compile_failed:
        logger.warning(
            "hf_to: torch.compile of the fused TO kernels failed (%s: %s); running them eagerly from now on",
            type(err).__name__,
            err,
        )
    _compile_failed = True


def _call(name: str, table: dict[str, Callable[..., Any]], compile: bool, key: tuple, *args: Any) -> Any:
    """Run kernel ``name``: compiled (first call per ``key`` timed as compile time) or eagerly."""
    global _compile_seconds
    eager = table[name]
    if not (compile and compile_available()):
        return eager(*args)
    fn = _compiled.get(f"{id(table)}:{name}")
    if fn is None:
        try:
            fn = torch.compile(eager, dynamic=True)
        except Exception as err:  # no compiler backend: the eager kernel is the fallback
            _disable_compile(err)
            return eager(*args)
        _compiled[f"{id(table)}:{name}"] = fn
    new = key not in _seen_keys
    start = time.perf_counter() if new else 0.0
    try:
        out = fn(*args)
    except Exception as err:  # compilation errors surface on the first call, before any write
        _disable_compile(err)
        return eager(*args)
    if new:
        _seen_keys.add(key)
        _compile_seconds += time.perf_counter() - start
    return out


def use_fused(
    fused: bool | None, estimator: str, params: list[Tensor], states: list[dict[str, Tensor]]
) -> tuple[bool, bool]:
    """Which path a group takes: ``(fused kernels?, compiled?)``.

    ``fused=False`` is the readable path, ``fused=True`` the compiled kernels (eager where
    compilation is unavailable), ``None`` the compiled kernels on CUDA or for CPU groups of at
    least :data:`AUTO_MIN_NUMEL` elements and the readable path otherwise.  bfloat16 state
    always takes the kernels (the readable path has no stochastic rounding), eagerly unless
    compilation was chosen.  ``estimator="full"`` always takes the readable path.
    """
    if estimator not in FUSED_ESTIMATORS:
        return False, False
    if fused is None:
        big = params[0].device.type == "cuda" or sum(p.numel() for p in params) >= AUTO_MIN_NUMEL
        fused = big and compile_available()
    bf16_state = states[0]["b"].dtype == torch.bfloat16
    return bool(fused) or bf16_state, bool(fused)


# -- the driver ----------------------------------------------------------------------------


def fused_trainable_to(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    *,
    lr: float,
    estimator: str,
    alpha: float,
    beta: float,
    adam: bool,
    beta2: float,
    eps: float,
    weight_decay: float,
    normalize: bool,
    floor: float,
    intercept_from_gradient: bool,
    diagnostics: bool,
    reduce_stats: Callable[[Tensor], Tensor] | None,
    compile: bool,
) -> dict[str, Tensor] | None:
    """One TO step with the fused kernels (same arguments and result as the readable path)."""
    if estimator not in FUSED_ESTIMATORS:
        raise ValueError(f"no fused kernel for estimator={estimator!r}; fused estimators: {FUSED_ESTIMATORS}")
    device = grads[0].device
    numels = [p.numel() for p in params]  # the whole tensor's n, also for a DTensor
    states = [{k: local_view(v) for k, v in state.items()} for state in states]
    params = [local_view(p) for p in params]
    grads = [local_view(g) for g in grads]
    slope_keys = {"diagonal": ("a",), "rank_one": ("u", "v"), "none": ()}[estimator]
    decay = 1 - lr * weight_decay
    out = None
    if diagnostics:
        out = {k: torch.zeros((), dtype=torch.float64, device=device) for k in _DIAG_KEYS}

    def flat(t: Tensor) -> Tensor:
        return t.view(-1) if t.is_contiguous() else t.reshape(-1)

    def phase1(p: Tensor, g: Tensor, state: dict[str, Tensor]) -> Tensor:
        b = state["b"]
        args = (flat(p), flat(g), b.view(-1), *(state[k].view(-1) for k in slope_keys if estimator == "rank_one"))
        key = ("stats", estimator, device.type, p.dtype, g.dtype, b.dtype)
        return _call(estimator, _STATS, compile, key, *args)

    def phase2(p: Tensor, n: int, g: Tensor, state: dict[str, Tensor], row: Tensor) -> None:
        first = state["step"].item() == 0
        state["step"] += 1
        seed = first and intercept_from_gradient
        bias_correction2 = 1 - beta2 ** state["step"].item() if adam else 1.0
        v2 = state["exp_avg_sq"].view(-1) if adam else None
        w = p.view(-1) if p.is_contiguous() else p.reshape(-1).clone()
        b = state["b"].view(-1)
        slope = [state[k].view(-1) for k in slope_keys]
        if estimator == "diagonal":
            args = (w, flat(g), b, *slope, v2, row, n, lr, decay, alpha, beta, beta2, bias_correction2, eps)
            args += (normalize, floor, seed, diagnostics)
        elif estimator == "rank_one":
            args = (w, flat(g), b, *slope, v2, row, n, lr, decay, alpha, beta, beta2, bias_correction2, eps)
            args += (normalize, floor, first, seed, diagnostics)
        else:
            args = (w, flat(g), b, v2, lr, decay, beta, beta2, bias_correction2, eps, seed, diagnostics)
        key = ("update", estimator, device.type, p.dtype, g.dtype, b.dtype, adam, normalize, first, seed, diagnostics)
        sums = _call(estimator, _UPDATES, compile, key, *args)
        if not p.is_contiguous():
            p.copy_(w.view_as(p))
        if out is not None:
            rr, gg, hh = sums.to(device=device, dtype=torch.float64)
            out["residual_sq"] += rr
            out["grad_sq"] += gg
            out["estimate_sq"] += hh

    any_finite = False
    if reduce_stats is None and device.type == "cpu":
        # No collective and no device sync: finish each tensor while it is still in cache.
        for p, n, g, state in zip(params, numels, grads, states):
            row = phase1(p, g, state)
            if not torch.isfinite(row[0]).item():
                if out is not None:
                    out["skipped"] += 1
                continue
            any_finite = True
            phase2(p, n, g, state, row)
    else:
        sums = torch.stack([phase1(p, g, state).to(device) for p, g, state in zip(params, grads, states)])
        if reduce_stats is not None:
            sums = reduce_stats(sums)
        finite = torch.isfinite(sums[:, 0]).tolist()
        for p, n, g, state, row, ok in zip(params, numels, grads, states, sums, finite):
            if not ok:
                if out is not None:
                    out["skipped"] += 1
                continue
            any_finite = True
            phase2(p, n, g, state, row.to(state["b"].device))
    if out is not None and any_finite:
        out["steps"] += 1
    return out


_DIAG_KEYS = ("steps", "residual_sq", "grad_sq", "estimate_sq", "skipped")
