r"""Fused step kernels: one pass over each tensor per phase, compiled when asked.

:func:`fused_trainable_to` is the fast twin of the readable
``hf_to.optimizer._single_tensor_trainable_to``, with the same two phases.  It is the path of
CUDA and of sharded (DTensor) parameters; unsharded CPU groups take the one-pass C kernel of
:mod:`hf_to.native` instead (faster on a CPU: one call per group, no reduction pass), and come
here only with ``HF_TO_NATIVE=0`` or without a C compiler.

1. one *stats* kernel per tensor reads ``w`` and ``g`` (and the rank-one factors) once and
   returns the row ``[count, *Estimator.stat_names]``, ``count`` being the number of
   non-finite gradient entries;  the rows go through ``reduce_stats`` (one all-reduce for
   sharded parameters, so the count is the whole tensor's) and one host read of the counts;
2. one *update* kernel per tensor does the residual, the estimator step, the estimate, the
   Adam preconditioner and the weight update in a single pass: it reads ``w``, ``g`` and the
   ``k`` state tensors once and writes ``w`` and the ``k`` states once — the ``2k + 3``
   streams of an in-place elementwise step, with no parameter-sized temporary when compiled.

*Non-finite gradients* (see :func:`hf_to.estimators.nonfinite_action`).  ``diagonal`` and
``none`` are coordinate-wise: an entry whose gradient is ``inf``/``nan`` keeps its weight
and state (the kernel steps with ``g = 0`` there and selects the old values on store), so
the check costs no pass of its own; only a tensor non-finite in every entry is skipped
whole.  ``rank_one`` couples all coordinates and skips a tensor with any non-finite entry.

The kernels are plain PyTorch functions.  ``torch.compile`` (Inductor, ``dynamic=True`` so
that one kernel serves every tensor size) fuses each into one loop; where compilation is
unavailable or fails the same functions run eagerly (correct, but with temporaries), and a
warning says so once.  Compilation happens on the first call for each combination of flags
and dtypes, once per process; :func:`compile_seconds` reports the time spent there.  The
first step of each tensor (which seeds the intercept, and the rank-one ``v``) runs eagerly:
it happens once, and compiling its variant would double the compile time.

On a CPU without sharded parameters (no ``reduce_stats``) the two phases run tensor by
tensor, so that phase 2 re-reads ``w`` and ``g`` from the cache rather than from memory;
elsewhere all rows are reduced and read back together, as in the readable path.  In the
one-pass kernel the coordinate-wise estimators mask each entry on its own gradient, so
the sums and the step need no whole-tensor verdict in between.

*Low-memory state.*  With ``bfloat16`` state tensors the kernels compute in float32 and
store with **stochastic rounding**: a uniform pseudo-random integer in ``[0, 2**16)`` (a
hash of the element's index, the step and the state tensor, so no RNG state is consumed and
runs are reproducible) is added to the float32 bit pattern and the low 16 bits are dropped, so each stored value rounds up or
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
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .distributed import local_view
from .estimators import TINY, finite_mask_and_count, nonfinite_action

__all__ = [
    "AUTO_MIN_NUMEL",
    "FUSED_ESTIMATORS",
    "STATE_DTYPES",
    "compile_available",
    "compile_seconds",
    "env_switch",
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

_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_switch(name: str) -> bool:
    """An on/off environment variable, on when unset; a value that is neither raises."""
    value = os.environ.get(name, "1").strip().lower()
    if value not in _ON + _OFF:
        raise ValueError(f"{name}={os.environ[name]!r}: expected one of {_OFF} (off) or {_ON} (on)")
    return value in _ON


# -- stochastic rounding -------------------------------------------------------------------


_M32 = 0xFFFFFFFF


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mixer (int64 arithmetic, no overflow); vectorises where RNG calls do not."""
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def _seed(step: Tensor, salt: int) -> Tensor:
    """Rounding seed of one state tensor at one step (``salt`` tells the state tensors apart)."""
    return (step.to(torch.int64) * 0x9E3779B1 + salt * 0x7F4A7C15) & _M32


def _round_bf16(x: Tensor, seed: Tensor) -> Tensor:
    """float32 ``x`` rounded stochastically to bfloat16 (unbiased: E[result] = x).

    The 16 random bits of each element come from a hash of its index and ``seed`` (the
    step and the state tensor): cheap, vectorised, and reproducible without an RNG state.
    """
    bits = x.view(torch.int32)
    idx = torch.arange(x.numel(), device=x.device, dtype=torch.int64).view(x.shape)
    noise = (_hash32((idx + seed) & _M32) & 0xFFFF).to(torch.int32)
    # Adding to the bit pattern moves away from zero for either sign; the mask truncates.
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def stochastic_round_(dst: Tensor, x: Tensor, seed: int | None = None) -> Tensor:
    """Copy float32 ``x`` into bfloat16 ``dst`` with stochastic rounding; return ``dst``.

    ``seed`` (default: drawn from torch's generator) selects the rounding pattern.
    """
    if seed is None:
        seed = int(torch.randint(0, 2**31, ()))
    _store(dst, x, None, torch.tensor(seed, dtype=torch.int64, device=x.device))
    return dst


def _compute_dtype(b: Tensor) -> torch.dtype:
    return torch.float64 if b.dtype == torch.float64 else torch.float32


# -- phase 1: partial sums -----------------------------------------------------------------


# Row[0] of every stats row is the non-finite sentinel: the number of entries of g (in the
# compute dtype) that are inf or nan, counted as an integer and cast to the row's dtype
# (``finite_mask_and_count``).


def _stats_diagonal(w: Tensor, g: Tensor, b: Tensor) -> Tensor:
    cd = _compute_dtype(b)
    wf = w.to(cd)
    return torch.stack([finite_mask_and_count(g.to(cd))[1], (wf * wf).sum()])


def _stats_none(w: Tensor, g: Tensor, b: Tensor) -> Tensor:
    return finite_mask_and_count(g.to(_compute_dtype(b)))[1].reshape(1)


def _stats_rank_one(w: Tensor, g: Tensor, b: Tensor, u: Tensor, v: Tensor) -> Tensor:
    cd = _compute_dtype(b)
    wf, gf, bf, uf, vf = w.to(cd), g.to(cd), b.to(cd), u.to(cd), v.to(cd)
    count = finite_mask_and_count(gf)[1]
    # Same order as RankOneEstimator.stat_names: ww, vw, uu, ub, ug.
    return torch.stack([count, (wf * wf).sum(), (vf * wf).sum(), (uf * uf).sum(), (uf * bf).sum(), (uf * gf).sum()])


# -- phase 2: the elementwise step ---------------------------------------------------------

# Group hyperparameters travel as one small tensor ``hp`` (not Python floats): a compiled
# kernel then guards on one argument instead of seven, and a learning-rate schedule never
# recompiles.  ``step`` is the tensor's CPU step count *before* this step.
LR, DECAY, ALPHA, BETA, BETA2, EPS, FLOOR, WARMUP = range(8)


def _hyperparameters(
    lr: float,
    weight_decay: float,
    alpha: float,
    beta: float,
    beta2: float,
    eps: float,
    floor: float,
    device,
    beta_warmup: bool = True,
) -> Tensor:
    values = [lr, 1 - lr * weight_decay, alpha, beta, beta2, eps, floor, 1.0 if beta_warmup else 0.0]
    return torch.tensor(values, dtype=torch.float64, device=device)


def _beta(hp: Tensor, step: Tensor, cd: torch.dtype) -> Tensor:
    """β_t = max(β, 1/(step+1)) with the warm-up, β without (``step`` counts earlier steps)."""
    return torch.maximum(hp[BETA], hp[WARMUP] / (step.to(hp.device, torch.float64) + 1)).to(cd)


# ``ok`` says where the step is taken: ``None`` (everywhere), a 0-d flag (the whole tensor:
# rank-one in the one-pass kernel) or a mask shaped like the tensor (the coordinate-wise
# estimators: False at the entries whose gradient is not finite).


def _keep_if(ok: Tensor | None, new: Tensor, old: Tensor) -> Tensor:
    """``new`` where the step is taken; ``old`` (cast) where it is not."""
    return new if ok is None else torch.where(ok, new, old.to(new.dtype))


def _grad(g: Tensor, cd: torch.dtype, ok: Tensor | None) -> Tensor:
    """``g`` in the compute dtype, 0 at the masked entries (so no inf/nan enters their arithmetic).

    With a 0-d flag nothing of a skipped tensor is kept, so ``g`` goes in as it is.
    """
    gf = g.to(cd)
    return gf if ok is None or ok.dim() == 0 else torch.where(ok, gf, 0.0)


def _finite_part(ok: Tensor | None, x: Tensor) -> Tensor:
    """``x`` with 0 where the step is not taken (for the diagnostic sums)."""
    return x if ok is None else torch.where(ok, x, 0.0)


def _store(dst: Tensor, x: Tensor, ok: Tensor | None, seed: Tensor) -> None:
    """Write ``x`` (float32/float64) into the tensor ``dst`` of any float dtype.

    Where ``ok`` is False the old raw value of ``dst`` is written back, bit for bit (also
    in bfloat16: the old value is selected after the rounding).
    """
    if dst.dtype == torch.bfloat16 and x.dtype != torch.bfloat16:
        x = _round_bf16(x.float(), seed)
    dst.copy_(_keep_if(ok, x, dst))


def _finish(
    p: Tensor,
    w: Tensor,
    gf: Tensor,
    g_hat: Tensor,
    exp_avg_sq: Tensor | None,
    r: Tensor | None,
    hp: Tensor,
    step: Tensor,
    diagnostics: bool,
    ok: Tensor | None,
) -> Tensor | None:
    """Preconditioner, weight update and (optionally) the diagnostic sums ``[r·r, g·g, Ĝ·Ĝ]``."""
    d = g_hat
    if exp_avg_sq is not None:
        beta2 = hp[BETA2].to(w.dtype)
        # 1 - β₂ rounded from float64, as the readable path's addcmul value (and hf_to.native).
        v2 = exp_avg_sq.to(w.dtype) * beta2 + (1 - hp[BETA2]).to(w.dtype) * gf * gf
        bias_correction2 = (1 - hp[BETA2] ** (step.to(torch.float64) + 1)).to(w.dtype)
        d = g_hat / ((v2 / bias_correction2).sqrt() + hp[EPS].to(w.dtype))
        _store(exp_avg_sq, v2, ok, _seed(step, 5))
    # Parameters are stored with round-to-nearest, as in the readable path.
    p.copy_(_keep_if(ok, w * hp[DECAY].to(w.dtype) - hp[LR].to(w.dtype) * d, w))
    if not diagnostics:
        return None
    # Sums over the entries that step (gf is already 0 elsewhere).
    if r is None:
        rr = torch.zeros((), dtype=w.dtype, device=w.device)
    else:
        r = _finite_part(ok, r)
        rr = (r * r).sum()
    g_hat = _finite_part(ok, g_hat)
    return torch.stack([rr, (gf * gf).sum(), (g_hat * g_hat).sum()])


def _update_diagonal(
    p: Tensor,
    g: Tensor,
    b: Tensor,
    a: Tensor,
    exp_avg_sq: Tensor | None,
    row: Tensor,
    hp: Tensor,
    step: Tensor,
    n: int,
    normalize: bool,
    seed_intercept: bool,
    diagnostics: bool,
    ok: Tensor | None = None,
) -> Tensor | None:
    cd = _compute_dtype(b)
    w, gf = p.to(cd), _grad(g, cd, ok)
    r = None
    if seed_intercept:  # b_0 = g_0: r_0 = 0, the slope stays at A_0 = 0
        g_hat = gf
        _store(b, gf, ok, _seed(step, 1))
    else:
        af, bf = a.to(cd), b.to(cd)
        alpha = hp[ALPHA].to(cd)
        r = af * w + bf - gf
        if normalize:
            af = af - alpha * r * w / (w * w + (row[1] / n + hp[FLOOR].to(cd) + TINY))
        else:
            af = af - alpha * (r * w)
        bf = bf - _beta(hp, step, cd) * r
        g_hat = af * w + bf
        _store(a, af, ok, _seed(step, 2))
        _store(b, bf, ok, _seed(step, 1))
    return _finish(p, w, gf, g_hat, exp_avg_sq, r, hp, step, diagnostics, ok)


def _update_none(
    p: Tensor,
    g: Tensor,
    b: Tensor,
    exp_avg_sq: Tensor | None,
    row: Tensor,
    hp: Tensor,
    step: Tensor,
    n: int,
    normalize: bool,
    seed_intercept: bool,
    diagnostics: bool,
    ok: Tensor | None = None,
) -> Tensor | None:
    cd = _compute_dtype(b)
    w, gf = p.to(cd), _grad(g, cd, ok)
    r = None
    if seed_intercept:
        g_hat = gf
    else:
        bf = b.to(cd)
        r = bf - gf
        g_hat = bf - _beta(hp, step, cd) * r
    _store(b, g_hat, ok, _seed(step, 1))
    return _finish(p, w, gf, g_hat, exp_avg_sq, r, hp, step, diagnostics, ok)


def _update_rank_one(
    p: Tensor,
    g: Tensor,
    b: Tensor,
    u: Tensor,
    v: Tensor,
    exp_avg_sq: Tensor | None,
    row: Tensor,
    hp: Tensor,
    step: Tensor,
    n: int,
    normalize: bool,
    seed_intercept: bool,
    diagnostics: bool,
    ok: Tensor | None = None,
    first: bool = False,
) -> Tensor | None:
    cd = _compute_dtype(b)
    w, gf = p.to(cd), _grad(g, cd, ok)
    row = row.to(cd)
    ww, vw, uu, ub, ug = row[1], row[2], row[3], row[4], row[5]
    if first:  # v_0 = w_0/‖w_0‖ (1/√n when w_0 = 0), so v_0ᵀw_0 = ‖w_0‖
        norm = ww.sqrt()
        vf = torch.where(norm > 0, w / norm.clamp_min(TINY), max(n, 1) ** -0.5)
        vw = norm
    else:
        vf = v.to(cd)
    r = None
    if seed_intercept:
        g_hat = gf
        _store(b, gf, ok, _seed(step, 1))
        _store(v, vf, ok, _seed(step, 4))
    else:
        uf, bf = u.to(cd), b.to(cd)
        alpha = hp[ALPHA].to(cd)
        r = bf - gf + uf * vw
        ur = uu * vw + ub - ug
        rate = alpha / (vw * vw + uu * ww + n * hp[FLOOR].to(cd) + TINY) if normalize else alpha
        uf = uf - r * (rate * vw)
        vf = vf - w * (rate * ur)
        vw_new = vw - rate * ur * ww
        bf = bf - _beta(hp, step, cd) * r
        g_hat = bf + uf * vw_new
        _store(u, uf, ok, _seed(step, 3))
        _store(v, vf, ok, _seed(step, 4))
        _store(b, bf, ok, _seed(step, 1))
    return _finish(p, w, gf, g_hat, exp_avg_sq, r, hp, step, diagnostics, ok)


def _one_pass(stats: Callable[..., Tensor], update: Callable[..., Tensor | None]) -> Callable[..., Tensor]:
    """Both phases in one kernel for an unsharded tensor: the sums, then the step where finite.

    Returns ``[count, *diagnostic sums]`` (``count``: non-finite gradient entries).  The
    coordinate-wise estimators step every entry whose gradient is finite and write back the
    old values elsewhere (so a tensor that is non-finite everywhere is left as it was);
    rank-one writes nothing when ``count > 0``.
    """

    def kernel(
        p: Tensor,
        g: Tensor,
        b: Tensor,
        slope: list[Tensor],
        exp_avg_sq: Tensor | None,
        hp: Tensor,
        step: Tensor,
        normalize: bool,
        seed_intercept: bool,
        diagnostics: bool,
        first: bool,
    ) -> Tensor:
        cd = _compute_dtype(b)
        if update is _update_rank_one:
            row = stats(p, g, b, *slope)
            ok = row[0] == 0  # the update couples all coordinates: all or nothing
        else:
            ok, count = finite_mask_and_count(g.to(cd))  # coordinate-wise: entry by entry
            if update is _update_diagonal and normalize:
                w = p.to(cd)
                row = torch.stack([count, (w * w).sum()])  # wᵀw over all entries
            else:  # the sentinel only (wᵀw is not used)
                row = count.reshape(1)
        extra = {"first": first} if update is _update_rank_one else {}
        sums = update(
            p, g, b, *slope, exp_avg_sq, row, hp, step, p.numel(), normalize, seed_intercept, diagnostics, ok, **extra
        )
        head = row[:1]
        return head if sums is None else torch.cat([head, sums.to(head.dtype)])

    kernel.__name__ = f"_one_pass{update.__name__[len('_update') :]}"
    return kernel


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
_ONE_PASS: dict[str, Callable[..., Tensor]] = {name: _one_pass(_STATS[name], _UPDATES[name]) for name in _STATS}


# -- compilation with an eager fallback ----------------------------------------------------

_compiled: dict[tuple, Callable[..., Any]] = {}
_compile_failed = False
_compile_seconds = 0.0


def compile_available() -> bool:
    """Whether the fused kernels will be compiled (``torch.compile`` present, not disabled, not failed)."""
    if _compile_failed or not env_switch(_ENV_COMPILE):
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


def _fresh_copy(fn: Callable[..., Any], tag: int) -> Callable[..., Any]:
    """A copy of ``fn`` with its own code object.

    Dynamo caches compiled graphs per code object, with a limit on the number of variants;
    one code object per static configuration keeps each cache at one entry (cheap guards)
    and never runs into the limit, however many configurations a process uses.
    """
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def _call(name: str, table: dict[str, Callable[..., Any]], compile: bool, key: tuple, *args: Any) -> Any:
    """Run kernel ``name``: compiled for configuration ``key`` (first call timed) or eagerly."""
    global _compile_seconds
    eager = table[name]
    if not (compile and compile_available()):
        return eager(*args)
    fn = _compiled.get(key)
    new = fn is None
    if new:
        try:
            fn = torch.compile(_fresh_copy(eager, len(_compiled)), dynamic=True)
        except Exception as err:  # no compiler backend: the eager kernel is the fallback
            _disable_compile(err)
            return eager(*args)
    start = time.perf_counter()
    try:
        out = fn(*args)
    except Exception as err:  # compilation errors surface on the first call, before any write
        _disable_compile(err)
        return eager(*args)
    if new:
        _compiled[key] = fn
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
    beta_warmup: bool = True,
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
    hp = _hyperparameters(lr, weight_decay, alpha, beta, beta2, eps, floor, device, beta_warmup)
    out = None
    if diagnostics:
        out = {k: torch.zeros((), dtype=torch.float64, device=device) for k in _DIAG_KEYS}

    def flat(t: Tensor) -> Tensor:
        return t.view(-1) if t.is_contiguous() else t.reshape(-1)

    def kernel_args(p: Tensor, g: Tensor, state: dict[str, Tensor]) -> tuple:
        first = state["step"].item() == 0
        w = p.view(-1) if p.is_contiguous() else p.reshape(-1).clone()
        slope = [state[k].view(-1) for k in slope_keys]
        v2 = state["exp_avg_sq"].view(-1) if adam else None
        key = (
            device.type,
            p.dtype,
            g.dtype,
            state["b"].dtype,
            adam,
            normalize,
            first,
            first and intercept_from_gradient,
        )
        return first, w, (w, flat(g), state["b"].view(-1), slope, v2), key

    def finish(p: Tensor, w: Tensor, state: dict[str, Tensor], sums: Tensor | None) -> None:
        state["step"] += 1
        if not p.is_contiguous():
            p.copy_(w.view_as(p))
        if out is not None and sums is not None:
            rr, gg, hh = sums.to(device=device, dtype=torch.float64)
            out["residual_sq"] += rr
            out["grad_sq"] += gg
            out["estimate_sq"] += hh

    any_step = False
    if reduce_stats is None and device.type == "cpu":
        # Unsharded on a CPU: both phases in one kernel per tensor, so the sums and the step
        # read w and g once from memory, and the count is read without a device sync.
        for p, n, g, state in zip(params, numels, grads, states):
            first, w, (w, gf, b, slope, v2), key = kernel_args(p, g, state)
            args = (w, gf, b, slope, v2, hp, state["step"], normalize, first and intercept_from_gradient)
            args += (diagnostics, first and estimator == "rank_one")
            res = _call(estimator, _ONE_PASS, compile and not first, ("one_pass", estimator, *key, diagnostics), *args)
            action = nonfinite_action(estimator, res[0].item(), n, res.dtype)
            if action != "step" and out is not None:
                out["skipped"] += 1
            if action == "skip":  # the kernel wrote nothing
                continue
            any_step = True
            finish(p, w, state, res[1:] if diagnostics else None)
    else:
        # Phase 1: per-tensor partial sums, one reduction, one host read of the counts.
        rows = []
        for p, g, state in zip(params, grads, states):
            b = state["b"].view(-1)
            extra = [state[k].view(-1) for k in slope_keys] if estimator == "rank_one" else []
            key = ("stats", estimator, device.type, p.dtype, g.dtype, b.dtype)
            rows.append(_call(estimator, _STATS, compile, key, flat(p), flat(g), b, *extra).to(device))
        sums = torch.stack(rows)
        if reduce_stats is not None:
            sums = reduce_stats(sums)
        counts = sums[:, 0].tolist()
        # Phase 2: the elementwise step given the summed rows.
        for p, n, g, state, row, count in zip(params, numels, grads, states, sums, counts):
            action = nonfinite_action(estimator, count, n, sums.dtype)
            if action != "step" and out is not None:
                out["skipped"] += 1
            if action == "skip":
                continue
            any_step = True
            first, w, (w, gf, b, slope, v2), key = kernel_args(p, g, state)
            # Some entries non-finite (rare): mask them; this shard may hold none of them.
            ok = finite_mask_and_count(gf.to(_compute_dtype(b)))[0] if action == "masked" else None
            args = (w, gf, b, *slope, v2, row.to(b.device), hp, state["step"], n, normalize)
            args += (first and intercept_from_gradient, diagnostics, ok)
            if estimator == "rank_one":
                args += (first,)
            key = ("update", estimator, *key, diagnostics, ok is not None)
            sums_i = _call(estimator, _UPDATES, compile and not first, key, *args)
            finish(p, w, state, sums_i)
    if out is not None and any_step:
        out["steps"] += 1
    return out


_DIAG_KEYS = ("steps", "residual_sq", "grad_sq", "estimate_sq", "skipped")
