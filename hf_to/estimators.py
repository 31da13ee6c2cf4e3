r"""Structures of the slope matrix :math:`A` of the pseudo-linear gradient estimator.

The Trainable Optimizer (TO) of Wang & Klabjan (arXiv:2508.01764) keeps, for every
parameter tensor flattened to :math:`w \in \mathbb{R}^n`, a *gradient estimator*

.. math::
    \hat G(w) = A\,w + b ,

whose parameters take one gradient step per iteration on the squared residual
:math:`\tfrac12\lVert r_t\rVert^2`, :math:`r_t = A_t w_t + b_t - g_t`.  Since
:math:`\partial \tfrac12\lVert r\rVert^2 / \partial A = r\,w^\top`, the chain rule gives the
update of each structure of :math:`A` (with the *slope rate* :math:`\alpha`):

========== ========================= ============================================ ==========
name       :math:`A`                 slope update                                 state
========== ========================= ============================================ ==========
full       dense :math:`n\times n`   :math:`A \leftarrow A - \alpha\, r w^\top`     n² values
diagonal   :math:`\mathrm{diag}(a)`  :math:`a \leftarrow a - \alpha\, r\odot w`     n values
rank_one   :math:`u v^\top`          :math:`u \leftarrow u - \alpha\,(v^\top w)\,r`, 2n values
                                     :math:`v \leftarrow v - \alpha\,(u^\top r)\,w`
none       :math:`0`                 — (the estimator is EMA momentum)            0
========== ========================= ============================================ ==========

Each structure is one strategy object with ``init`` (create the slope state with
:math:`A_0 = 0`), ``apply`` (return :math:`A w`) and ``update`` (the step above), selected by
name through :data:`ESTIMATORS`.  The optimizer owns the intercept :math:`b`, the rates and
the weights; the strategies only know their own slope state.

*Normalised slope rate.*  With ``alpha_scaling="normalized"`` (the default) the slope step is
divided by the squared norm of the estimator's input Jacobian — the normalised LMS rule —
so that the change of :math:`A w` in one step is at most :math:`\alpha \lVert r\rVert`
whatever the scale of :math:`w`.  ``alpha_scaling="none"`` is the paper-literal raw rate.
See ``docs/design-decisions.md`` for the measurement behind the default.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

__all__ = [
    "ESTIMATORS",
    "DiagonalEstimator",
    "Estimator",
    "FullEstimator",
    "NoSlopeEstimator",
    "RankOneEstimator",
    "get_estimator",
]

# Keeps a normalised step finite when w == 0 (e.g. a LoRA B matrix at initialisation).
_TINY = 1e-30


class Estimator:
    """Strategy interface for one structure of the slope matrix ``A``.

    All tensors handed to the methods are flat (``w.view(-1)``) and in the state dtype.
    """

    name: ClassVar[str]
    #: Names of the slope-state tensors this structure keeps in ``optimizer.state[p]``.
    state_keys: ClassVar[tuple[str, ...]]

    def numel(self, n: int) -> int:
        """Number of slope-state values for a tensor of ``n`` elements."""
        raise NotImplementedError

    def init(self, state: dict, w: Tensor) -> None:
        """Create the slope state with :math:`A_0 = 0`, shaped like the parameter."""
        raise NotImplementedError

    def apply(self, state: dict, w: Tensor) -> Tensor | None:
        """Return :math:`A w` (flat), or ``None`` when :math:`A \\equiv 0`."""
        raise NotImplementedError

    def update(self, state: dict, w: Tensor, r: Tensor, alpha: float | Tensor, normalize: bool) -> None:
        """One gradient step of the slope state on :math:`\\tfrac12\\lVert r\\rVert^2`."""
        raise NotImplementedError


class NoSlopeEstimator(Estimator):
    r""":math:`A \equiv 0`: :math:`\hat G = b` and :math:`b \leftarrow (1-\beta) b + \beta g` is EMA momentum."""

    name = "none"
    state_keys = ()

    def numel(self, n: int) -> int:
        return 0

    def init(self, state: dict, w: Tensor) -> None:
        return None

    def apply(self, state: dict, w: Tensor) -> Tensor | None:
        return None

    def update(self, state: dict, w: Tensor, r: Tensor, alpha: float | Tensor, normalize: bool) -> None:
        return None


class DiagonalEstimator(Estimator):
    r""":math:`A = \mathrm{diag}(a)`, :math:`a \leftarrow a - \alpha_i\, r \odot w`.

    Normalised rate, per coordinate: :math:`\alpha_i = \alpha / (w_i^2 + \overline{w^2})`, the
    LMS normalisation of each scalar regression :math:`g_i \approx a_i w_i + b_i`, regularised
    by the tensor's mean square :math:`\overline{w^2}` so that tiny :math:`w_i` cannot blow
    :math:`a_i` up (``|Δa_i| ≤ α|r_i| / (2·rms(w))``).
    """

    name = "diagonal"
    state_keys = ("a",)

    def numel(self, n: int) -> int:
        return n

    def init(self, state: dict, w: Tensor) -> None:
        state["a"] = torch.zeros_like(w)

    def apply(self, state: dict, w: Tensor) -> Tensor | None:
        return state["a"].view(-1) * w

    def update(self, state: dict, w: Tensor, r: Tensor, alpha: float | Tensor, normalize: bool) -> None:
        a = state["a"].view(-1)
        if normalize:
            w2 = w * w
            scale = w2 + w2.mean() + _TINY
            a.sub_(alpha * r * w / scale)
        else:
            a.sub_(alpha * r * w)


class RankOneEstimator(Estimator):
    r""":math:`A = u v^\top`; the chain rule through :math:`A` gives
    :math:`\partial_u = r\,(v^\top w)` and :math:`\partial_v = w\,(u^\top r)`, applied
    simultaneously (both from the old factors).

    :math:`u = v = 0` is a fixed point of this update, so the factors start at
    :math:`u_0 = 0`, :math:`v_0 = w_0/\lVert w_0\rVert` (the all-ones direction
    :math:`1/\sqrt n` when :math:`w_0 = 0`): :math:`A_0 = 0` exactly like the other structures,
    :math:`u` receives a gradient from the first non-zero residual, and nothing random is
    involved, so data-parallel ranks agree without seeding.

    Normalised rate: :math:`\alpha / ((v^\top w)^2 + \lVert u\rVert^2\lVert w\rVert^2)`, the
    squared Frobenius bound of the Jacobian of :math:`u v^\top w` with respect to
    :math:`(u, v)`.
    """

    name = "rank_one"
    state_keys = ("u", "v")

    def numel(self, n: int) -> int:
        return 2 * n

    def init(self, state: dict, w: Tensor) -> None:
        state["u"] = torch.zeros_like(w)
        norm = torch.linalg.vector_norm(w)
        # torch.where instead of an ``if`` on the norm: no host sync, same result on every rank.
        state["v"] = torch.where(norm > 0, w / norm.clamp_min(_TINY), w.numel() ** -0.5)

    def apply(self, state: dict, w: Tensor) -> Tensor | None:
        u, v = state["u"].view(-1), state["v"].view(-1)
        return u * torch.dot(v, w)

    def update(self, state: dict, w: Tensor, r: Tensor, alpha: float | Tensor, normalize: bool) -> None:
        u, v = state["u"].view(-1), state["v"].view(-1)
        vw = torch.dot(v, w)
        ur = torch.dot(u, r)
        if normalize:
            alpha = alpha / (vw * vw + torch.dot(u, u) * torch.dot(w, w) + _TINY)
        grad_u = r * vw
        grad_v = w * ur
        u.sub_(alpha * grad_u)
        v.sub_(alpha * grad_v)


class FullEstimator(Estimator):
    r"""Dense :math:`A \in \mathbb{R}^{n\times n}`, :math:`A \leftarrow A - \alpha\, r w^\top`.

    Normalised rate: :math:`\alpha / \lVert w\rVert^2` (normalised LMS).  Memory is
    :math:`n^2` values per tensor, so the optimizer refuses tensors above ``max_full_numel``.
    """

    name = "full"
    state_keys = ("A",)

    def numel(self, n: int) -> int:
        return n * n

    def init(self, state: dict, w: Tensor) -> None:
        n = w.numel()
        state["A"] = torch.zeros((n, n), dtype=w.dtype, device=w.device)

    def apply(self, state: dict, w: Tensor) -> Tensor | None:
        return state["A"] @ w

    def update(self, state: dict, w: Tensor, r: Tensor, alpha: float | Tensor, normalize: bool) -> None:
        if normalize:
            alpha = alpha / (torch.dot(w, w) + _TINY)
        state["A"].addr_(r * (-alpha), w)


#: Registry of slope structures by the name users pass as ``estimator=``.
ESTIMATORS: dict[str, Estimator] = {
    e.name: e for e in (FullEstimator(), DiagonalEstimator(), RankOneEstimator(), NoSlopeEstimator())
}


def get_estimator(name: str) -> Estimator:
    """Return the strategy for ``name``; raise ``ValueError`` listing the valid names."""
    try:
        return ESTIMATORS[name]
    except (KeyError, TypeError):
        raise ValueError(f"Invalid estimator: {name!r}; expected one of {sorted(ESTIMATORS)}") from None
