r"""The intercept rate β trained on the training loss (``tune_beta``): a forward tangent.

Which β (:math:`1-\beta_1` of Adam) trains fastest depends on the task: light memory wins LoRA
fine-tuning, heavy memory full fine-tuning (``docs/design-decisions.md``).  With
``tune_beta=κ > 0`` each param group tunes its own β by the derivative of the next mini-batch
loss with respect to β, carried through the whole trajectory rather than one step (the one-step
hypergradient of Baydin et al. 2018 raises the rate on every task: a greedy, short-horizon
view).  The derivative of the weights is propagated forward (forward mode, as real-time
recurrent learning does; MARTHE, Donini et al. 2020, for the learning rate) with the
Hessian-free approximation :math:`\partial g/\partial\beta \approx 0` and a discount
:math:`\mu` (:data:`DISCOUNT`) standing in for the contraction the Hessian would apply.  With
the intercept's per-coordinate rate :math:`k_t` (:math:`\beta_t`, plus :math:`\alpha\rho` for
``estimator="folded"``, see :mod:`hf_to.forms`; the other forms' slopes are taken as not
depending on β), the look-ahead weight λ, Adam's denominator
:math:`D_t = \sqrt{\hat v_{t+1}} + \epsilon` (1 without the preconditioner) and the
learning rate :math:`\gamma_t`:

.. math::
    \dot b_t &= (1-k_t)\,\dot b_{t-1} - \beta'_t\,(b_{t-1} - g_t), \\
    \dot w_{t+1} &= \mu\,(1-\gamma_t\omega)\,\dot w_t - \gamma_t\,(1-\lambda)\,\dot b_t / D_t,

with :math:`\beta'_t = \partial\beta_t/\partial\beta` (``beta_warmup``'s rate), and before
every step, from the new gradient,

.. math::
    \log\beta \leftarrow \mathrm{clip}\big(\log\beta - \kappa\,\cos(g_{t+1}, \dot w_{t+1}),\
    \log\beta_{\min},\ \log\beta_{\max}\big),

:math:`dL_{t+1}/d\beta \approx g_{t+1}\cdot\dot w_{t+1}` summed over the group's tensors (one
cosine per group: a shared rate's derivative is the sum of its tensors').  The tuned β is the
group's ``beta`` (saved and resumed with it).  The cosine makes the step scale-free; the clip
(:data:`BETA_RANGE`) keeps β where the step is an average (β ≤ 0.6: more than 40 % of the old
estimate kept) whatever the gradients do.

*Memory.*  :math:`\dot b` and :math:`\dot w` are kept on at most :data:`SAMPLES` evenly strided
coordinates of each tensor (``beta_b_dot``, ``beta_w_dot`` in its state, float32): the sums are
unbiased subsamples, and the cost is at most 32 KiB per tensor whatever its size (7 MiB for
SmolLM2-135M's full fine-tuning, 210 weight matrices, beside 0.79 GiB of AdamW's state).  With FSDP2 each rank samples its
shard (at most :data:`SAMPLES` values per rank), the group's sums are all-reduced, and the
tangents are DTensors of one row per rank, so DCP checkpoints save and load them (resume at
the same number of ranks).  Every step reads three numbers per group back to
the host, so ``tune_beta`` is refused with ``capturable=True``.

The prototype this equals, its study and the exactness check (the tangent against a finite
difference where the Hessian is zero) are in ``recipes/experiments/tangent_beta.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .distributed import is_sharded, local_view

try:  # torch >= 2.4 exposes DTensor publicly
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - older torch
    DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]
from .forms import TINY, intercept_rate

#: At most this many coordinates of each tensor carry the tangents (evenly strided).
SAMPLES = 4096
#: μ, the discount of the weights' tangent per step (a horizon of about 100 steps).
DISCOUNT = 0.99
#: Where the tuned β stays.
BETA_RANGE = (0.02, 0.6)
#: The per-parameter state the tuning keeps besides the form's.
STATE_KEYS = ("beta_b_dot", "beta_w_dot")


def _layout(p: Tensor) -> tuple[int, int]:
    """(stride, length) of ``p``'s samples: every ``stride``-th local value, ``length`` of them.

    A plain tensor samples ⌈n / SAMPLES⌉-strided values of its n.  A sharded one (FSDP2:
    ``Shard(0)``, chunks of ⌈rows / ranks⌉ rows) samples its local shard with the stride and the
    length of the largest shard, the same on every rank, zero-padded (a padded entry stays zero),
    so that its tangents are one row per rank of a DTensor that checkpoints like any state."""
    if not is_sharded(p):
        n = p.numel()
        stride = max(1, -(-n // SAMPLES))
        return stride, -(-n // stride)
    ranks = math.prod(p.device_mesh.size(i) for i, pl in enumerate(p.placements) if pl.is_shard())
    rows = p.shape[0] if p.dim() else 1
    largest = -(-rows // ranks) * (p.numel() // max(rows, 1))
    stride = max(1, -(-largest // SAMPLES))
    return stride, max(1, -(-largest // stride))


def sample(x: Tensor, p: Tensor) -> Tensor:
    """A float32 copy of ``x``'s local values at ``p``'s sample positions (a copy: the step
    updates the state and the weights in place), zero-padded to the layout's length."""
    stride, length = _layout(p)
    flat = local_view(x).detach().reshape(-1)[::stride].to(torch.float32, copy=True)
    return flat if flat.numel() == length else torch.nn.functional.pad(flat, (0, length - flat.numel()))


def _new_tangent(p: Tensor) -> Tensor:
    """Zeros in ``p``'s sample layout: a plain vector, or for a sharded ``p`` a DTensor of one
    row per shard (``Shard(0)`` where ``p`` is sharded, ``Replicate`` elsewhere)."""
    _, length = _layout(p)
    if not is_sharded(p):
        return torch.zeros(length, device=p.device)
    local = torch.zeros(1, length, device=local_view(p).device)
    placements = [Shard(0) if pl.is_shard() else Replicate() for pl in p.placements]
    return DTensor.from_local(local, p.device_mesh, placements, run_check=False)


def rate_derivative(beta: float, t: float, warmup: bool | str) -> float:
    """:math:`\\partial\\beta_t/\\partial\\beta` of ``intercept_rate`` (a central difference)."""
    h = 1e-5 * beta
    return (intercept_rate(beta + h, t, warmup) - intercept_rate(beta - h, t, warmup)) / (2 * h)


def before_step(
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict],
    reduce_stats: Callable[[Tensor], Tensor] | None,
) -> list[dict[str, Any]]:
    """Move the group's β by the hypergradient of this gradient and return what
    :func:`after_step` needs of the weights and state before the step."""
    rows, snaps = [], []
    folded_rate = group["estimator"] == "folded" and group["alpha_scaling"] == "normalized"
    for p, g, state in zip(params, grads, states):
        raw = sample(g, p)
        gs = torch.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=0.0)
        if STATE_KEYS[0] not in state:
            state[STATE_KEYS[0]] = _new_tangent(p)
            state[STATE_KEYS[1]] = _new_tangent(p)
        wd = local_view(state[STATE_KEYS[1]]).reshape(-1)
        w = local_view(p).detach().reshape(-1)
        if not folded_rate:
            wsq = gs.new_zeros(())
        else:  # the folded form's rate needs the whole tensor's mean square (a pass over w)
            wsq = torch.dot(w, w).float() if w.dtype == torch.float32 else torch.sum(w.float() ** 2)
        rows.append(torch.stack([torch.dot(gs, wd), torch.dot(gs, gs), torch.dot(wd, wd), wsq]))
        snaps.append({"p": p, "g": raw, "w": sample(p, p), "b": sample(state["b"], p) if "b" in state else None})
    sums = torch.stack(rows).to(torch.float64)
    if reduce_stats is not None:
        sums = reduce_stats(sums)
    num, gg, ww, _ = sums.sum(0).tolist()
    scale = math.sqrt(gg * ww)
    cos = num / scale if scale > 0 and math.isfinite(scale) and math.isfinite(num) else 0.0
    lo, hi = (math.log(x) for x in BETA_RANGE)
    group["beta"] = math.exp(min(hi, max(lo, math.log(group["beta"]) - group["tune_beta"] * cos)))
    for snap, p, mean_sq in zip(snaps, params, sums[:, 3].tolist()):
        snap["w_ms"] = mean_sq / p.numel()
    return snaps


def after_step(group: dict[str, Any], states: list[dict], snaps: list[dict[str, Any]], lookahead: Callable) -> None:
    """Carry the tangents through the step just taken (``lookahead(β_t)`` is its weight λ)."""
    lr = float(group["lr"])
    decay = 1 - lr * group["weight_decay"]
    for state, snap in zip(states, snaps):
        t = float(state["step"])
        beta_t = intercept_rate(group["beta"], t, group["beta_warmup"])
        p = snap["p"]
        gs = snap["g"]  # the step does not change the gradient
        finite = torch.isfinite(gs)
        gs = torch.where(finite, gs, 0.0)
        b_dot, w_dot = (local_view(state[k]).view(-1) for k in STATE_KEYS)
        if snap["b"] is not None:
            rate = torch.full_like(gs, beta_t)
            if group["estimator"] == "folded":
                w = snap["w"]
                if group["alpha_scaling"] == "normalized":
                    rate += group["alpha"] * w * w / (w * w + (snap["w_ms"] + group["norm_floor"] + TINY))
                else:
                    rate += group["alpha"] * w * w
            d_beta = rate_derivative(group["beta"], t, group["beta_warmup"])
            b_dot.copy_(torch.where(finite, b_dot * (1 - rate) - d_beta * (snap["b"] - gs), b_dot))
        push = b_dot * (lr * (1 - lookahead(beta_t)))
        if group["preconditioner"] == "adam":
            v = sample(state["exp_avg_sq"], p) / (1 - group["beta2"] ** t)
            push = push / (v.sqrt() + group["eps"])
        w_dot.copy_(torch.where(finite, w_dot * (DISCOUNT * decay) - push, w_dot))
