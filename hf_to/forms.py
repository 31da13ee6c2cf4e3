r"""The forms of the gradient estimator: each structure of the slope matrix :math:`A`, described once.

The Trainable Optimizer (TO) of Wang & Klabjan (arXiv:2508.01764) keeps, for every
parameter tensor flattened to :math:`w \in \mathbb{R}^n`, a *gradient estimator*

.. math::
    \hat G(w) = A\,w + b ,

whose parameters take one gradient step per iteration on the squared residual
:math:`\tfrac12\lVert r_t\rVert^2`, :math:`r_t = A_t w_t + b_t - g_t`.  Since
:math:`\partial \tfrac12\lVert r\rVert^2 / \partial A = r\,w^\top`, the chain rule gives the
update of each structure of :math:`A` (with the *slope rate* :math:`\alpha` and the
*intercept rate* :math:`\beta`, :math:`b \leftarrow b - \beta r` for all):

========== ========================= =============================================== =========
name       :math:`A`                 slope update                                    state
========== ========================= =============================================== =========
full       dense :math:`n\times n`   :math:`A \leftarrow A - \alpha\, r w^\top`        n² values
diagonal   :math:`\mathrm{diag}(a)`  :math:`a \leftarrow a - \alpha\, r\odot w`        n values
rank_one   :math:`u v^\top`          :math:`u \leftarrow u - \alpha\,(v^\top w)\,r`,   2n values
                                     :math:`v \leftarrow v - \alpha\,(u^\top r)\,w`
none       :math:`0`                 — (the estimator is EMA momentum)               0
folded     diag(a) folded into b     :math:`b \leftarrow b - \alpha_i w_i^2\, r_i`   0
                                     (besides :math:`b`'s own step)
========== ========================= =============================================== =========

``folded`` is ``diagonal`` without its slope vector: while the weights stand still the
diagonal estimate at the current weights, :math:`a\odot w + b`, moves exactly as an intercept
whose rate is raised per coordinate by :math:`\alpha_i w_i^2` (:math:`\alpha_i` the normalised
rate below), so ``folded`` keeps only that sum, in :math:`b`, and drops the slope's *travel
term* :math:`a\odot\Delta w` (:func:`folded_step`).  In fine-tuning, where the weights move
little per step, the two forms train alike at half the estimator's memory.

A form is one :class:`Form`: the names of its slope-state tensors, the whole-tensor sums its
step needs (``stat_names``; partial sums over the elements at hand, so that sharded
parameters add them across ranks in one collective before the step), how it starts and
predicts, and its **per-element step**: a plain arithmetic function of the tile's values and
the tensor's sums (:func:`diagonal_step`, :func:`rank_one_step`, :func:`none_step`).  The
readable path (:mod:`hf_to.functional`) runs that function on whole tensors; the Triton step
(:mod:`hf_to.gpu`) compiles the very same function into its kernel; the C kernel
(``native.c``) is a hand transcription, claimed by ``kernels`` and tested against the readable
path for every form that claims it.  ``full`` is a matrix-vector step with its own readable
step and no kernel.  :func:`register_form` adds a form (experiments do, see
``recipes/experiments/``); ``docs/adding-a-form.md`` walks through one.

*Normalised slope rate.*  With ``alpha_scaling="normalized"`` (the default) the slope step is
divided by the squared norm of the estimator's input Jacobian — the normalised LMS rule —
plus a floor :math:`n\delta^2` (``norm_floor`` = :math:`\delta^2`, default 1e-3), so that
:math:`A w` moves by at most :math:`\alpha \lVert r\rVert` in one step whatever the scale of
:math:`w`, and :math:`A` itself cannot blow up when :math:`w` is near zero (biases, a LoRA B
matrix at initialisation).  An LMS step with such a rate shrinks the residual of the sample
it learns from for :math:`0 < \alpha < 2` (:data:`MAX_NORMALIZED_ALPHA`); above it the step
overshoots by more than it corrects and the estimator diverges.  ``alpha_scaling="none"`` is
the paper-literal raw rate, whose stable range depends on the scale of :math:`w`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "FORMS",
    "KERNELS",
    "MAX_NORMALIZED_ALPHA",
    "Form",
    "count_nonfinite",
    "diagonal_step",
    "finite_mask_and_count",
    "folded_step",
    "get_form",
    "intercept_rate",
    "none_step",
    "nonfinite_action",
    "rank_one_step",
    "register_form",
    "unit_residual_rate",
]

#: Keeps a normalised step finite when w == 0 (e.g. a LoRA B matrix at initialisation).
#: (Written as a literal in the step functions: Triton compiles them and reads no globals.)
TINY = 1e-30

#: The normalised slope step contracts the residual it learns from only for α in (0, 2).
MAX_NORMALIZED_ALPHA = 2.0

#: Kernels a form may claim beside the readable path: the CPU's C kernel, the GPU's Triton step.
KERNELS = ("native", "triton")


# -- the per-element steps: plain arithmetic, run on tensors and compiled by Triton ----------
# Arguments: the tile's weights w, gradient g (0 where masked), intercept b and slope state
# s1, s2; the tensor's sums ww, vw, uu, ub, ug (those of its ``stat_names``; the others are
# placeholders); nf = n as a float; the rates; ``normalize`` (a compile-time constant for Triton).
# Returns (r, s1', s2', b', Ĝ): residual, new slope state, new intercept, the estimate Ĝ(w).


def diagonal_step(w, g, b, s1, s2, ww, vw, uu, ub, ug, nf, alpha, floor, beta_t, normalize):
    r""":math:`A=\mathrm{diag}(a)`: :math:`a' = a - \alpha_i r\odot w`, normalised per coordinate by
    :math:`\alpha_i = \alpha/(w_i^2 + w^\top w/n + \delta^2)`, the LMS normalisation of each scalar
    regression :math:`g_i \approx a_i w_i + b_i`, regularised by the tensor's mean square."""
    r = b - g + s1 * w
    if normalize:
        a = s1 - alpha * r * w / (w * w + (ww / nf + floor + 1e-30))
    else:
        a = s1 - alpha * (r * w)
    b_new = b - beta_t * r
    return r, a, s2, b_new, a * w + b_new


def rank_one_step(w, g, b, s1, s2, ww, vw, uu, ub, ug, nf, alpha, floor, beta_t, normalize):
    r""":math:`A = u v^\top`: :math:`\partial_u = r\,(v^\top w)`, :math:`\partial_v = w\,(u^\top r)`,
    both from the old factors.  Every whole-vector product comes from the sums of the old state:
    :math:`u^\top r = u^\top u\,(v^\top w) + u^\top b - u^\top g` and, after the step,
    :math:`v'^\top w = v^\top w - \alpha (u^\top r)\, w^\top w`.  Normalised rate:
    :math:`\alpha / ((v^\top w)^2 + \lVert u\rVert^2\lVert w\rVert^2 + n\delta^2)`, the squared
    Frobenius norm of the Jacobian of :math:`u v^\top w` with respect to :math:`(u, v)`."""
    r = b - g + s1 * vw
    ur = uu * vw + ub - ug
    if normalize:
        rate = alpha / (vw * vw + uu * ww + nf * floor + 1e-30)
    else:
        rate = alpha
    u = s1 - r * (rate * vw)
    v = s2 - w * (rate * ur)
    vw_new = vw - rate * ur * ww
    b_new = b - beta_t * r
    return r, u, v, b_new, b_new + u * vw_new


def folded_step(w, g, b, s1, s2, ww, vw, uu, ub, ug, nf, alpha, floor, beta_t, normalize):
    r""":math:`\hat G = b` with the diagonal slope folded into a per-coordinate intercept rate:
    :math:`b' = b - (\beta_t + \alpha\, w^2/(w^2 + w^\top w/n + \delta^2))\, r`, :math:`r = b - g`
    (raw rate: :math:`\beta_t + \alpha w^2`).  This is how the diagonal form's estimate at the
    current weights, :math:`a\odot w + b`, moves when the weights do not move between steps
    (its travel term :math:`a\odot\Delta w` dropped), kept as one vector: 4 bytes per
    parameter instead of the diagonal's 8."""
    r = b - g
    if normalize:
        rate = beta_t + alpha * (w * w) / (w * w + (ww / nf + floor + 1e-30))
    else:
        rate = beta_t + alpha * (w * w)
    b_new = b - rate * r
    return r, s1, s2, b_new, b_new


def none_step(w, g, b, s1, s2, ww, vw, uu, ub, ug, nf, alpha, floor, beta_t, normalize):
    r""":math:`A \equiv 0`: :math:`\hat G = b`, :math:`b' = (1-\beta) b + \beta g`, EMA momentum."""
    r = b - g
    b_new = b - beta_t * r
    return r, s1, s2, b_new, b_new


# -- whole-tensor pieces (readable path) ------------------------------------------------------


def _zeros_like_keys(*keys: str) -> Callable[[dict, Tensor], None]:
    def init(state: dict, w: Tensor) -> None:
        for key in keys:
            state[key] = torch.zeros_like(w, memory_format=torch.contiguous_format)

    return init


def _rank_one_first(state: dict, w: Tensor, sums: dict[str, Tensor], n: int) -> dict[str, Tensor]:
    r""":math:`u = v = 0` is a fixed point of the rank-one update, so the factors start at
    :math:`u_0 = 0`, :math:`v_0 = w_0/\lVert w_0\rVert` (:math:`1/\sqrt n` everywhere when
    :math:`w_0 = 0`): :math:`A_0 = 0` as for the other forms, :math:`u` receives a gradient from
    the first non-zero residual, and nothing random is involved, so data-parallel ranks agree.
    :math:`\lVert w_0\rVert` comes from the summed ``ww``: no extra collective when sharded."""
    norm = sums["ww"].sqrt()
    state["v"].view(-1).copy_(torch.where(norm > 0, w / norm.clamp_min(TINY), max(n, 1) ** -0.5))
    return {**sums, "vw": norm}


def _full_step(state, w, g, b, sums, *, nf, alpha, floor, beta_t, normalize):
    """Dense :math:`A \\leftarrow A - \\alpha\\, r w^\\top`, normalised by :math:`\\lVert w\\rVert^2 + n\\delta^2`."""
    A = state["A"]
    r = torch.addmv(b - g, A, w)
    rate = alpha / (sums["ww"] + nf * floor + TINY) if normalize else alpha
    A.addr_(r * (-rate), w)
    b.add_(r, alpha=-beta_t)
    return r, torch.addmv(b, A, w)


@dataclass(frozen=True)
class Form:
    """One structure of the slope matrix :math:`A` (see the module docstring)."""

    name: str
    #: Slope-state tensors kept in ``optimizer.state[p]`` beside ``b`` (and ``exp_avg_sq``).
    slope_keys: tuple[str, ...]
    #: Whole-tensor sums the step needs, as partial sums over the elements at hand.
    stat_names: tuple[str, ...]
    #: ``A w`` for a flat ``w`` from the state (for :meth:`predict`).
    slope_times: Callable[[dict, Tensor], Tensor]
    #: Slope-state values per parameter element count ``n``.
    state_numel: Callable[[int], int]
    #: The per-element step (signature of :func:`diagonal_step`), or ``None`` with ``tensor_step``.
    step: Callable | None = None
    #: Instead, a step on the whole flat tensor (``full``'s matrix step, an experiment's own) that
    #: updates the state in place and returns (r, Ĝ); signature of ``_full_step``.
    tensor_step: Callable | None = None
    #: A dense n×n slope: tensors above ``max_full_numel`` and sharded tensors are refused.
    dense: bool = False
    #: Kernels beside the readable path that implement this form (a subset of :data:`KERNELS`).
    kernels: frozenset[str] = frozenset()
    #: The update decouples per entry (but for the normaliser's wᵀw): a non-finite gradient
    #: entry can keep its weight and state while the others step.
    coordinatewise: bool = False
    #: Prepares a tensor's first step (rank-one's v_0); returns the sums the step then uses.
    first: Callable[[dict, Tensor, dict[str, Tensor], int], dict[str, Tensor]] | None = None
    #: Creates the slope state, A_0 = 0 (default: zeros shaped like the parameter per key).
    init_state: Callable[[dict, Tensor], None] | None = field(default=None, repr=False)

    def state_keys(self, adam: bool) -> tuple[str, ...]:
        """The tensors of a parameter's state besides ``step``, in the kernels' column order:
        the intercept ``b``, the slope state, and ``exp_avg_sq`` with the Adam preconditioner."""
        return ("b", *self.slope_keys, *(("exp_avg_sq",) if adam else ()))

    def init(self, state: dict, w: Tensor) -> None:
        """Create the slope state with :math:`A_0 = 0`, shaped like ``w`` (the parameter)."""
        (self.init_state or _zeros_like_keys(*self.slope_keys))(state, w)

    def predict(self, state: dict, w: Tensor) -> Tensor:
        r"""The estimate :math:`\hat G(w) = A w + b` from the current state (whole tensors)."""
        flat = w.reshape(-1).to(state["b"].dtype)
        return (self.slope_times(state, flat) + state["b"].reshape(-1)).reshape(w.shape)

    def local_stats(self, state: dict, w: Tensor, g: Tensor, b: Tensor) -> list[Tensor]:
        """Partial sums, over the elements at hand, of the quantities in ``stat_names``."""
        values = {"ww": lambda: torch.dot(w, w)}
        if self.stat_names[1:]:
            u, v = state["u"].view(-1), state["v"].view(-1)
            values |= {
                "vw": lambda: torch.dot(v, w),
                "uu": lambda: torch.dot(u, u),
                "ub": lambda: torch.dot(u, b),
                "ug": lambda: torch.dot(u, g),
            }
        return [values[name]() for name in self.stat_names]


#: The forms by the name users pass as ``estimator=``.
FORMS: dict[str, Form] = {
    f.name: f
    for f in (
        Form(
            "full",
            ("A",),
            ("ww",),
            slope_times=lambda s, w: s["A"] @ w,
            state_numel=lambda n: n * n,
            tensor_step=_full_step,
            dense=True,
            init_state=lambda s, w: s.__setitem__("A", torch.zeros((w.numel(),) * 2, dtype=w.dtype, device=w.device)),
        ),
        Form(
            "diagonal",
            ("a",),
            ("ww",),
            slope_times=lambda s, w: s["a"].reshape(-1) * w,
            state_numel=lambda n: n,
            step=diagonal_step,
            kernels=frozenset(KERNELS),
            coordinatewise=True,
        ),
        Form(
            "rank_one",
            ("u", "v"),
            ("ww", "vw", "uu", "ub", "ug"),
            slope_times=lambda s, w: s["u"].reshape(-1) * torch.dot(s["v"].reshape(-1), w),
            state_numel=lambda n: 2 * n,
            step=rank_one_step,
            kernels=frozenset(KERNELS),
            first=_rank_one_first,
        ),
        Form(
            "folded",
            (),
            ("ww",),
            slope_times=lambda s, w: torch.zeros_like(w),
            state_numel=lambda n: 0,
            step=folded_step,
            kernels=frozenset(KERNELS),
            coordinatewise=True,
        ),
        Form(
            "none",
            (),
            (),
            slope_times=lambda s, w: torch.zeros_like(w),
            state_numel=lambda n: 0,
            step=none_step,
            kernels=frozenset(KERNELS),
            coordinatewise=True,
        ),
    )
}


def get_form(name: str) -> Form:
    """The form called ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return FORMS[name]
    except (KeyError, TypeError):
        raise ValueError(f"Invalid estimator: {name!r} (expected one of {sorted(FORMS)})") from None


def register_form(form: Form, *, replace: bool = False) -> Form:
    """Make ``estimator=form.name`` valid in this process (an experiment's own form).

    A registered form runs on the readable path and on the kernels it claims; claiming a
    kernel means that kernel implements its step (the built-in kernels know only the built-in
    forms, so an experiment's form claims none).  ``replace=True`` overrides a form of that name.
    """
    if not isinstance(form, Form):
        raise TypeError(f"register_form takes a Form, got {type(form).__name__}")
    if form.name in FORMS and not replace:
        raise ValueError(f"a form named {form.name!r} exists; pass replace=True to override it")
    if (form.step is None) == (form.tensor_step is None):
        raise ValueError(f"form {form.name!r}: give exactly one of step (per element) or tensor_step")
    if not form.kernels <= set(KERNELS) or (form.kernels and FORMS.get(form.name) is None):
        raise ValueError(f"form {form.name!r} claims kernels {sorted(form.kernels)} that do not implement it")
    FORMS[form.name] = form
    return form


# -- the intercept rate and non-finite gradients, shared by every path ------------------------


def unit_residual_rate(
    form: Form, w: Tensor, w_ms: float | Tensor, *, alpha, floor, beta_t, normalize
) -> Tensor | float:
    r"""The rate :math:`k_t` at which ``form``'s step moves the intercept toward the gradient, per
    coordinate of the flat ``w`` (:math:`b' = b - k_t\odot r` with the slope state at 0): minus
    the new intercept of the form's own step at :math:`b = 0`, :math:`g = -1` (a unit residual),
    so that the rate is written once, in the step.  :math:`\beta_t` for every form but ``folded``,
    whose rate adds :math:`\alpha\, w^2/(w^2 + \overline{w^2} + \delta^2)` (``w_ms`` is
    :math:`\overline{w^2}`, the tensor's mean square); a matrix form (``full``) gives :math:`\beta_t`."""
    if form.step is None:
        return beta_t
    zero = torch.zeros_like(w)
    b_new = form.step(w, zero - 1, zero, zero, zero, w_ms, 0.0, 0.0, 0.0, 0.0, 1.0, alpha, floor, beta_t, normalize)[3]
    return -b_new


def intercept_rate(beta: float, t: float, warmup: bool | str) -> float:
    r"""The intercept rate :math:`\beta_t` of step ``t`` (1-based) under ``beta_warmup``.

    ``True``: :math:`\max(\beta, 1/t)`, so :math:`b` is the running mean of the first
    :math:`1/\beta` corrected gradients, then an EMA.  ``"adam"``:
    :math:`\beta/(1-(1-\beta)^t)`, the rate at which an EMA started at 0 and divided by
    Adam's bias correction :math:`1-\beta_1^t` (:math:`\beta_1 = 1-\beta`) moves: with
    ``estimator="none"`` and the Adam preconditioner the optimizer is then AdamW.
    ``False``: the paper's constant :math:`\beta`.
    """
    if warmup == "adam" and not isinstance(warmup, bool):
        return beta / -math.expm1(t * math.log1p(-beta)) if beta < 1 else 1.0
    if warmup is True:
        return max(beta, 1.0 / t)
    return beta


def nonfinite_action(form: Form, count: float, n: int, dtype: torch.dtype = torch.float32) -> str:
    """What one tensor's step does given ``count`` non-finite gradient entries of its ``n``.

    ``"step"`` (none), ``"masked"`` (a coordinate-wise form with some but not all entries
    non-finite: those entries keep their weight and state, the others step) or ``"skip"``
    (nothing is written and ``step`` does not advance: every entry is non-finite, or any entry
    for a form whose update couples all coordinates).

    ``count`` is the sentinel of the per-tensor stats row, a sum in ``dtype`` (over shards for
    a sharded tensor).  Above 2**24 (float32) the count is rounded, so ``n`` is rounded alike.
    """
    if count == 0:
        return "step"
    if not form.coordinatewise:
        return "skip"
    whole = float(n) if n <= 2**24 or dtype == torch.float64 else float(torch.tensor(float(n), dtype=dtype))
    return "skip" if count >= whole else "masked"


def count_nonfinite(g: Tensor) -> Tensor:
    """The non-finite sentinel: the number of ``inf``/``nan`` entries of ``g``, in ``g``'s dtype.

    Counted as an integer (exact), then cast, so that the rows of all tensors stack and sum
    over shards like the other whole-tensor sums.
    """
    return finite_mask_and_count(g)[1]


def finite_mask_and_count(g: Tensor) -> tuple[Tensor, Tensor]:
    """``(mask, count)``: True where ``g`` is finite, and the number of other entries (``g``'s dtype).

    Eagerly ``z = g·0`` (0 where ``g`` is finite, nan where not) gives both several times
    faster than ``isfinite`` and a boolean sum; under ``torch.compile`` (where Inductor folds
    ``g·0`` to 0, and the loops fuse anyway) ``isfinite`` is used.
    """
    if torch.compiler.is_compiling():
        mask = torch.isfinite(g)
        return mask, mask.logical_not().sum().to(g.dtype)
    z = g * 0
    return z == 0, torch.count_nonzero(z).to(g.dtype)
