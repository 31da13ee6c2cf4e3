r"""Structures of the slope matrix :math:`A` of the pseudo-linear gradient estimator.

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
========== ========================= =============================================== =========

Each structure is one strategy object, selected by name through :data:`ESTIMATORS`:

* ``init(state, w)`` creates the slope state with :math:`A_0 = 0`;
* ``stat_names`` / ``local_stats(...)`` list the whole-tensor sums the step needs (such as
  :math:`v^\top w`).  They are *partial* sums over the elements at hand, so that a sharded
  parameter can add them across ranks in one collective for all tensors before the step;
* ``step(...)`` does the residual, the estimator step and the estimate with those sums,
  elementwise.

*Normalised slope rate.*  With ``alpha_scaling="normalized"`` (the default) the slope step is
divided by the squared norm of the estimator's input Jacobian — the normalised LMS rule —
plus a floor :math:`n\delta^2` (``norm_floor`` = :math:`\delta^2`, default 1e-3), so that
:math:`A w` moves by at most :math:`\alpha \lVert r\rVert` in one step whatever the scale of
:math:`w`, and :math:`A` itself cannot blow up when :math:`w` is near zero (biases, a LoRA B
matrix at initialisation), where a pure NLMS rate :math:`\alpha/\lVert w\rVert^2` would make
:math:`\lVert A\rVert \sim \lVert r\rVert/\lVert w\rVert` and the estimate explode as soon as
:math:`w` moves.  For weights with mean square below :math:`\delta^2` the rate is about the
raw :math:`\alpha/n` (full, rank-one) or :math:`\alpha` (diagonal).  ``alpha_scaling="none"``
is the paper-literal raw rate.  See
``docs/design-decisions.md`` for the measurements behind the default.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

__all__ = [
    "BETA_WARMUPS",
    "COORDINATEWISE_ESTIMATORS",
    "DISPLACEMENT_ESTIMATORS",
    "ESTIMATORS",
    "SLOPE_INPUTS",
    "DiagonalEstimator",
    "DisplacementDiagonalEstimator",
    "Estimator",
    "FullEstimator",
    "NoSlopeEstimator",
    "RankOneEstimator",
    "count_nonfinite",
    "finite_mask_and_count",
    "get_estimator",
    "intercept_rate",
    "nonfinite_action",
]

# Keeps a normalised step finite when w == 0 (e.g. a LoRA B matrix at initialisation).
TINY = 1e-30

#: Structures whose update decouples per entry (but for the scalar wᵀw of the normalised
#: rate): an entry with a non-finite gradient can be left alone while the others step.
COORDINATEWISE_ESTIMATORS = ("diagonal", "none")


#: ``beta_warmup`` values: ``True`` (running mean, :math:`\beta_t=\max(\beta, 1/t)`),
#: ``"adam"`` (Adam's bias correction as a rate, :math:`\beta_t=\beta/(1-(1-\beta)^t)`) and
#: ``False`` (the paper's constant :math:`\beta`).
BETA_WARMUPS = (True, False, "adam")
#: ``slope_input``: what the slope multiplies: ``"weights"`` (the paper, :math:`A w`) or
#: ``"displacement"`` (:math:`A (w-\bar w)`, :math:`\bar w` an EMA of the weights).
SLOPE_INPUTS = ("weights", "displacement")


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


def valid_beta_warmup(value: object) -> bool:
    """``True``, ``False`` or ``"adam"`` (an int 1/0 is not a bool here)."""
    return isinstance(value, bool) or (isinstance(value, str) and value == "adam")


def nonfinite_action(estimator: str, count: float, n: int, dtype: torch.dtype = torch.float32) -> str:
    """What one tensor's step does given ``count`` non-finite gradient entries of its ``n``.

    ``"step"`` (none), ``"masked"`` (a coordinate-wise estimator with some but not all
    entries non-finite: those entries keep their weight and state, the others step) or
    ``"skip"`` (nothing is written and ``step`` does not advance: every entry is non-finite,
    or any entry for ``rank_one`` and ``full``, whose update couples all coordinates).

    ``count`` is the sentinel of the per-tensor stats row, a sum in ``dtype`` (over shards for
    a sharded tensor).  Above 2**24 (float32) the count is rounded, so ``n`` is rounded alike.
    """
    if count == 0:
        return "step"
    if estimator not in COORDINATEWISE_ESTIMATORS:
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


class Estimator:
    """Strategy interface for one structure of the slope matrix ``A``.

    Tensors handed to ``local_stats`` and ``step`` are flat views in the state dtype: the
    weights ``w``, the gradient ``g`` and the intercept ``b`` (updated in place).  ``stats``
    holds the globally summed values named by ``stat_names``, as 0-d tensors.
    """

    name: ClassVar[str]
    #: Names of the slope-state tensors this structure keeps in ``optimizer.state[p]``.
    state_keys: ClassVar[tuple[str, ...]]
    #: Whole-tensor sums the step needs (``ww`` = wᵀw, ...).
    stat_names: ClassVar[tuple[str, ...]] = ("ww",)

    def numel(self, n: int) -> int:
        """Number of slope-state values for a tensor of ``n`` elements."""
        raise NotImplementedError

    def init(self, state: dict, w: Tensor) -> None:
        """Create the slope state with :math:`A_0 = 0`, shaped like ``w`` (the parameter)."""
        raise NotImplementedError

    def predict(self, state: dict, w: Tensor) -> Tensor:
        r"""The estimate :math:`\hat G(w) = A w + b` from the current state (whole tensors)."""
        flat = w.reshape(-1).to(state["b"].dtype)
        return (self._slope_times(state, flat) + state["b"].reshape(-1)).reshape(w.shape)

    def _slope_times(self, state: dict, w: Tensor) -> Tensor:
        raise NotImplementedError

    def local_stats(self, state: dict, w: Tensor, g: Tensor, b: Tensor) -> list[Tensor]:
        """Partial sums, over the elements at hand, of the quantities in ``stat_names``."""
        return [torch.dot(w, w)]

    def step(
        self,
        state: dict,
        w: Tensor,
        g: Tensor,
        b: Tensor,
        stats: dict[str, Tensor],
        *,
        n: int,
        alpha: float,
        beta: float,
        normalize: bool,
        floor: float = 1e-3,
        first: bool,
        intercept_from_gradient: bool,
    ) -> tuple[Tensor, Tensor | None]:
        r"""Residual, estimator step, estimate: return :math:`(\hat G_t, r_t)` (flat).

        On the first step with ``intercept_from_gradient`` the intercept starts at
        :math:`b_0 = g_0 - A_0 w_0 = g_0`, so :math:`r_0 = 0`, nothing else moves and ``None``
        is returned for the residual.
        """
        if first and intercept_from_gradient:
            b.copy_(g)
            return b.clone(), None
        r = self._residual(state, w, g, b, stats)
        self._update_slope(state, w, r, stats, n=n, alpha=alpha, normalize=normalize, floor=floor)
        b.add_(r, alpha=-beta)
        return self._estimate(state, w, b, stats), r

    # Structure-specific pieces of ``step``.
    def _residual(self, state: dict, w: Tensor, g: Tensor, b: Tensor, stats: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def _update_slope(
        self,
        state: dict,
        w: Tensor,
        r: Tensor,
        stats: dict[str, Tensor],
        *,
        n: int,
        alpha: float,
        normalize: bool,
        floor: float,
    ) -> None:
        raise NotImplementedError

    def _estimate(self, state: dict, w: Tensor, b: Tensor, stats: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError


class NoSlopeEstimator(Estimator):
    r""":math:`A \equiv 0`: :math:`\hat G = b` and :math:`b \leftarrow (1-\beta) b + \beta g` is EMA momentum."""

    name = "none"
    state_keys = ()
    stat_names = ()

    def numel(self, n: int) -> int:
        return 0

    def init(self, state: dict, w: Tensor) -> None:
        return None

    def local_stats(self, state, w, g, b):
        return []

    def _slope_times(self, state, w):
        return torch.zeros_like(w)

    def _residual(self, state, w, g, b, stats):
        return b - g

    def _update_slope(self, state, w, r, stats, *, n, alpha, normalize, floor):
        return None

    def _estimate(self, state, w, b, stats):
        return b.clone()


class DiagonalEstimator(Estimator):
    r""":math:`A = \mathrm{diag}(a)`, :math:`a \leftarrow a - \alpha_i\, r \odot w`.

    Normalised rate, per coordinate:
    :math:`\alpha_i = \alpha / (w_i^2 + \overline{w^2} + \delta^2)`, the LMS normalisation of
    each scalar regression :math:`g_i \approx a_i w_i + b_i`, regularised by the tensor's mean
    square :math:`\overline{w^2} = w^\top w / n` and the floor :math:`\delta^2` so that a tiny
    :math:`w_i` cannot blow :math:`a_i` up.
    """

    name = "diagonal"
    state_keys = ("a",)

    def numel(self, n: int) -> int:
        return n

    def init(self, state: dict, w: Tensor) -> None:
        state["a"] = torch.zeros_like(w, memory_format=torch.contiguous_format)

    def _slope_times(self, state, w):
        return state["a"].reshape(-1) * w

    def _residual(self, state, w, g, b, stats):
        return torch.addcmul(b - g, state["a"].view(-1), w)

    def _update_slope(self, state, w, r, stats, *, n, alpha, normalize, floor):
        a = state["a"].view(-1)
        if normalize:
            a.sub_(alpha * r * w / (w * w + (stats["ww"] / n + floor + TINY)))
        else:
            a.sub_(r * w, alpha=alpha)

    def _estimate(self, state, w, b, stats):
        return torch.addcmul(b, state["a"].view(-1), w)


class RankOneEstimator(Estimator):
    r""":math:`A = u v^\top`; the chain rule through :math:`A` gives
    :math:`\partial_u = r\,(v^\top w)` and :math:`\partial_v = w\,(u^\top r)`, applied
    simultaneously (both from the old factors).

    :math:`u = v = 0` is a fixed point of this update, so the factors start at
    :math:`u_0 = 0` and :math:`v_0 = w_0/\lVert w_0\rVert` (any unit vector when
    :math:`w_0 = 0`, where :math:`v^\top w` vanishes anyway): :math:`A_0 = 0` exactly as for the
    other structures, :math:`u` receives a gradient from the first non-zero residual because
    :math:`v_0^\top w_0 = \lVert w_0\rVert \neq 0`, and nothing random is involved, so
    data-parallel ranks agree without seeding.

    All whole-vector products come from five sums of the old state,
    :math:`v^\top w,\ u^\top u,\ u^\top b,\ u^\top g,\ w^\top w`:
    :math:`u^\top r = u^\top u\,(v^\top w) + u^\top b - u^\top g` and, after the step,
    :math:`v'^\top w = v^\top w - \alpha (u^\top r)\, w^\top w`.

    Normalised rate: :math:`\alpha / ((v^\top w)^2 + \lVert u\rVert^2\lVert w\rVert^2 + n\delta^2)`,
    the squared Frobenius norm of the Jacobian of :math:`u v^\top w` with respect to
    :math:`(u, v)`, plus the floor.
    """

    name = "rank_one"
    state_keys = ("u", "v")
    stat_names = ("ww", "vw", "uu", "ub", "ug")

    def numel(self, n: int) -> int:
        return 2 * n

    def init(self, state: dict, w: Tensor) -> None:
        # v_0 needs ‖w_0‖, a whole-tensor sum: it is set on the first step from the summed
        # ``ww`` so that sharded parameters need no extra collective.
        state["u"] = torch.zeros_like(w, memory_format=torch.contiguous_format)
        state["v"] = torch.zeros_like(w, memory_format=torch.contiguous_format)

    def local_stats(self, state, w, g, b):
        u, v = state["u"].view(-1), state["v"].view(-1)
        return [torch.dot(w, w), torch.dot(v, w), torch.dot(u, u), torch.dot(u, b), torch.dot(u, g)]

    def step(self, state, w, g, b, stats, *, n, alpha, beta, normalize, floor=1e-3, first, intercept_from_gradient):
        if first:
            norm = stats["ww"].sqrt()
            state["v"].view(-1).copy_(torch.where(norm > 0, w / norm.clamp_min(TINY), max(n, 1) ** -0.5))
            stats = {**stats, "vw": norm}  # v_0ᵀw_0 = ‖w_0‖
        return super().step(
            state,
            w,
            g,
            b,
            stats,
            n=n,
            alpha=alpha,
            beta=beta,
            normalize=normalize,
            floor=floor,
            first=first,
            intercept_from_gradient=intercept_from_gradient,
        )

    def _slope_times(self, state, w):
        return state["u"].reshape(-1) * torch.dot(state["v"].reshape(-1), w)

    def _residual(self, state, w, g, b, stats):
        return (b - g).add_(state["u"].view(-1) * stats["vw"])

    def _update_slope(self, state, w, r, stats, *, n, alpha, normalize, floor):
        u, v = state["u"].view(-1), state["v"].view(-1)
        vw, uu, ww = stats["vw"], stats["uu"], stats["ww"]
        ur = uu * vw + stats["ub"] - stats["ug"]
        rate = alpha / (vw * vw + uu * ww + n * floor + TINY) if normalize else torch.as_tensor(alpha, dtype=w.dtype)
        u.sub_(r * (rate * vw))
        v.sub_(w * (rate * ur))
        # v'ᵀw for the estimate, from the sums: no second pass over v.
        stats["vw_new"] = vw - rate * ur * ww

    def _estimate(self, state, w, b, stats):
        return b + state["u"].view(-1) * stats["vw_new"]


class FullEstimator(Estimator):
    r"""Dense :math:`A \in \mathbb{R}^{n\times n}`, :math:`A \leftarrow A - \alpha\, r w^\top`.

    Normalised rate: :math:`\alpha / (\lVert w\rVert^2 + n\delta^2)` (normalised LMS with a floor).  Memory is
    :math:`n^2` values per tensor, so the optimizer refuses tensors above ``max_full_numel``.
    """

    name = "full"
    state_keys = ("A",)

    def numel(self, n: int) -> int:
        return n * n

    def init(self, state: dict, w: Tensor) -> None:
        n = w.numel()
        state["A"] = torch.zeros((n, n), dtype=w.dtype, device=w.device)

    def _slope_times(self, state, w):
        return state["A"] @ w

    def _residual(self, state, w, g, b, stats):
        return torch.addmv(b - g, state["A"], w)

    def _update_slope(self, state, w, r, stats, *, n, alpha, normalize, floor):
        rate = alpha / (stats["ww"] + n * floor + TINY) if normalize else alpha
        state["A"].addr_(r * (-rate), w)

    def _estimate(self, state, w, b, stats):
        return torch.addmv(b, state["A"], w)


class DisplacementDiagonalEstimator(DiagonalEstimator):
    r"""Diagonal slope on the weights' *displacement*: :math:`\hat G(w) = a\odot(w-\bar w) + b`.

    The same model class as :math:`\mathrm{diag}(a)\,w + c` (with :math:`c = b - a\odot\bar w`),
    reparametrised around an *anchor* :math:`\bar w`, an EMA of the weights at rate
    ``anchor_rate`` :math:`\gamma`.  During fine-tuning :math:`w` moves by about lr per step
    while :math:`|w|` is much larger, so :math:`(w, 1)` are nearly collinear and an LMS step on
    the raw weights mostly rescales the intercept; on :math:`x = w - \bar w` the slope instead
    learns how the gradient changes *along the trajectory*, and :math:`a\odot x` corrects the
    lag of the intercept (an average of gradients taken around :math:`\bar w`).

    Per step, with :math:`x = w_t - \bar w_t`: :math:`r = a\odot x + b - g`,
    :math:`a \leftarrow a - \alpha\, r\odot x / (x^2 + \overline{x^2} + \epsilon)` (normalised
    LMS on the displacement, :math:`\overline{x^2} = x^\top x/n`; ``norm_floor`` is not used:
    the displacement's own scale is the reference), :math:`b \leftarrow b - \beta_t r`,
    :math:`\hat G = a\odot x + b`.  After the weights step, the anchor moves,
    :math:`\bar w \leftarrow \bar w + \gamma (w_{t+1} - \bar w)`, and :math:`b` is re-expressed,
    :math:`b \leftarrow b + a\odot\Delta\bar w`, so that the estimator's function
    :math:`\hat G(\cdot)` does not change.  :math:`\bar w_0 = w_0`, :math:`a_0 = 0`.
    """

    name = "diagonal"
    state_keys = ("a", "w_bar")
    stat_names = ("xx",)

    def init(self, state: dict, w: Tensor) -> None:
        super().init(state, w)
        state["w_bar"] = w.clone(memory_format=torch.contiguous_format)

    def numel(self, n: int) -> int:
        return 2 * n

    @staticmethod
    def _x(state: dict, w: Tensor) -> Tensor:
        return w - state["w_bar"].view(-1)

    def _slope_times(self, state, w):
        return state["a"].reshape(-1) * (w - state["w_bar"].reshape(-1))

    def local_stats(self, state, w, g, b):
        x = self._x(state, w)
        return [torch.dot(x, x)]

    def _residual(self, state, w, g, b, stats):
        return torch.addcmul(b - g, state["a"].view(-1), self._x(state, w))

    def _update_slope(self, state, w, r, stats, *, n, alpha, normalize, floor):
        a, x = state["a"].view(-1), self._x(state, w)
        if normalize:
            a.sub_(alpha * r * x / (x * x + (stats["xx"] / n + TINY)))
        else:
            a.sub_(r * x, alpha=alpha)

    def _estimate(self, state, w, b, stats):
        return torch.addcmul(b, state["a"].view(-1), self._x(state, w))

    def move_anchor(self, state: dict, w_new: Tensor, b: Tensor, rate: float) -> None:
        r""":math:`\bar w \mathrel{+}= \gamma(w_{t+1}-\bar w)`, :math:`b \mathrel{+}= a\odot\Delta\bar w`."""
        w_bar = state["w_bar"].view(-1)
        delta = (w_new - w_bar).mul_(rate)
        b.addcmul_(state["a"].view(-1), delta)
        w_bar.add_(delta)


#: Registry of slope structures by the name users pass as ``estimator=``.
ESTIMATORS: dict[str, Estimator] = {
    e.name: e for e in (FullEstimator(), DiagonalEstimator(), RankOneEstimator(), NoSlopeEstimator())
}
#: The structures available with ``slope_input="displacement"``.
DISPLACEMENT_ESTIMATORS: dict[str, Estimator] = {"diagonal": DisplacementDiagonalEstimator()}


def get_estimator(name: str, slope_input: str = "weights") -> Estimator:
    """Return the strategy for ``name`` (and ``slope_input``); raise ``ValueError`` listing the valid names."""
    registry = DISPLACEMENT_ESTIMATORS if slope_input == "displacement" else ESTIMATORS
    try:
        return registry[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Invalid estimator: {name!r}; expected one of {sorted(registry)} with slope_input={slope_input!r}"
        ) from None
