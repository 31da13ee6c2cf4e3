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

*Memory.*  :math:`\dot b` and :math:`\dot w` are kept on every ``stride``-th coordinate of
each tensor (``beta_b_dot``, ``beta_w_dot`` in its state, float32), one stride for the whole group
(:func:`group_stride`: :data:`STRIDE` = 64, denser in a group of fewer than 64 × :data:`SAMPLES`
values so that it keeps about :data:`SAMPLES` of them), so that the group's sums are uniform
subsamples of its whole sums (a per-tensor cap on the samples would weigh small tensors more).
That is 8/64 = 0.125 bytes per parameter in a group of 262,144 values or more (13 MiB for
SmolLM2-135M's full fine-tuning, 106 M values, beside 0.79 GiB of AdamW's state).  With FSDP2 each rank samples its shard with the group's stride (from the
global sizes, the same on every rank), the group's sums are all-reduced, and the tangents are
DTensors of one row per rank, so DCP checkpoints save and load them (resume at the same number
of ranks).

*Cost.*  Batched over the group: the samples of every tensor are gathered into one vector per
quantity, the per-tensor sums come from one segmented reduction (one row per tensor, which the
stats reducer sums over the shards of sharded tensors), and the tangents are written back with
one ``_foreach_copy_``, so the operations per step do not grow with the number of tensors but for
the strided gathers.  The intercept's per-coordinate rate comes from the form's own step
(:func:`hf_to.forms.unit_residual_rate`), so its formula is written once.  The folded form's rate
needs each whole tensor's mean square: one ``_foreach_norm`` pass over the weights.  Every step
reads the group's sums and the tensors' step counts back to the host (two reads), so
``tune_beta`` is refused with ``capturable=True``.

The prototype this equals, its study and the exactness check (the tangent against a finite
difference where the Hessian is zero) are in ``recipes/experiments/tangent_beta.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .distributed import is_sharded, local_view

try:  # torch >= 2.4 exposes DTensor publicly
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - older torch
    DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]
from .forms import get_form, intercept_rate, unit_residual_rate

#: Every this-many-th coordinate of each tensor (of each local shard) carries the tangents ...
STRIDE = 64
#: ... or, in a smaller group, about this many of the group's coordinates.
SAMPLES = 4096
#: μ, the discount of the weights' tangent per step (a horizon of about 100 steps).
DISCOUNT = 0.99
#: Where the tuned β stays.
BETA_RANGE = (0.02, 0.6)
#: The per-parameter state the tuning keeps besides the form's.
STATE_KEYS = ("beta_b_dot", "beta_w_dot")


def group_stride(group: dict[str, Any]) -> int:
    """The group's sampling stride: :data:`STRIDE`, or less where the group (all its parameters,
    global sizes) holds fewer than ``STRIDE`` × :data:`SAMPLES` values.  Fixed by the group's
    parameters, so that the tangents keep their length through the run and a resume."""
    n = sum(p.numel() for p in group["params"])
    return max(1, min(STRIDE, n // SAMPLES))


def _layout(p: Tensor, stride: int) -> tuple[int, int]:
    """(stride, length) of ``p``'s samples: every ``stride``-th local value, ``length`` of them.

    A plain tensor samples every ``stride``-th of its n values.  A sharded one (FSDP2:
    ``Shard(0)``, chunks of ⌈rows / ranks⌉ rows) samples its local shard with that stride and the
    length of the largest shard, the same on every rank, zero-padded (a padded entry stays zero),
    so that its tangents are one row per rank of a DTensor that checkpoints like any state."""
    if not is_sharded(p):
        return stride, -(-p.numel() // stride)
    ranks = math.prod(p.device_mesh.size(i) for i, pl in enumerate(p.placements) if pl.is_shard())
    rows = p.shape[0] if p.dim() else 1
    largest = -(-rows // ranks) * (p.numel() // max(rows, 1))
    return stride, max(1, -(-largest // stride))


def _samples(xs: list[Tensor], layouts: list[tuple[int, int]]) -> Tensor:
    """The values of every ``x`` at its sample positions (``layouts``, of :func:`_layout`),
    concatenated into one new float32 vector (a copy: the step updates the state and the weights
    in place), each zero-padded to its layout's length."""
    parts = []
    for x, (stride, length) in zip(xs, layouts):
        flat = local_view(x).detach().reshape(-1)[::stride]
        parts.append(
            flat if flat.numel() == length else torch.nn.functional.pad(flat.float(), (0, length - flat.numel()))
        )
    return torch.cat(parts).to(torch.float32)


def _new_tangent(p: Tensor, stride: int) -> Tensor:
    """Zeros in ``p``'s sample layout: a plain vector, or for a sharded ``p`` a DTensor of one
    row per shard (``Shard(0)`` where ``p`` is sharded, ``Replicate`` elsewhere)."""
    _, length = _layout(p, stride)
    if not is_sharded(p):
        return torch.zeros(length, device=p.device)
    local = torch.zeros(1, length, device=local_view(p).device)
    placements = [Shard(0) if pl.is_shard() else Replicate() for pl in p.placements]
    return DTensor.from_local(local, p.device_mesh, placements, run_check=False)


def rate_derivative(beta: float, t: float, warmup: bool | str) -> float:
    """:math:`\\partial\\beta_t/\\partial\\beta` of ``intercept_rate`` (a central difference)."""
    h = 1e-5 * beta
    return (intercept_rate(beta + h, t, warmup) - intercept_rate(beta - h, t, warmup)) / (2 * h)


@dataclass
class Snapshot:
    """What :func:`after_step` needs of the group as it was before the step, every vector the
    concatenation of the group's tensors' samples (tensor ``i`` has ``lengths[i]`` of them)."""

    layouts: list[tuple[int, int]]  #: each tensor's (stride, length) of samples
    lengths: list[int]
    segments: Tensor  #: ``lengths`` on the samples' device
    finite: Tensor  #: where the gradient is finite (elsewhere the step left the state)
    g: Tensor  #: the gradient, 0 where it is not finite
    w: Tensor  #: the weights before the step
    b: Tensor  #: the intercept before the step
    b_dot: Tensor  #: the tangents before the step
    w_dot: Tensor
    w_ms: list[float]  #: each tensor's mean square of its weights (the folded rate's normaliser)


def _tangents(states: list[dict], key: str) -> list[Tensor]:
    return [local_view(s[key]).view(-1) for s in states]


def before_step(
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict],
    reduce_stats: Callable[[Tensor], Tensor] | None,
) -> Snapshot:
    """Move the group's β by the hypergradient of this gradient and return what
    :func:`after_step` needs of the weights and state before the step.

    Batched over the group: one concatenated vector per quantity, per-tensor sums by one
    segmented reduction (one row per tensor, as the stats reducer sums sharded tensors' rows over
    ranks), one host read of the sums."""
    stride = group_stride(group)
    layouts = [_layout(p, stride) for p in params]
    lengths = [length for _, length in layouts]
    for p, state, length in zip(params, states, lengths):
        # new tangents start at zero, as do tangents of another layout (a checkpoint written
        # before the stride was the group's): the derivative restarts, β is kept
        if STATE_KEYS[0] not in state or local_view(state[STATE_KEYS[0]]).numel() != length:
            state[STATE_KEYS[0]] = _new_tangent(p, stride)
            state[STATE_KEYS[1]] = _new_tangent(p, stride)
    g = _samples(grads, layouts)
    finite = torch.isfinite(g)
    snap = Snapshot(
        layouts,
        lengths,
        segments=torch.tensor(lengths, device=g.device),
        finite=finite,
        g=torch.where(finite, g, 0.0),
        w=_samples(params, layouts),
        b=_samples([s["b"] for s in states], layouts),
        b_dot=torch.cat(_tangents(states, STATE_KEYS[0])),
        w_dot=torch.cat(_tangents(states, STATE_KEYS[1])),
        w_ms=[],
    )
    gs = snap.g
    sums = [
        torch.segment_reduce(x, "sum", lengths=snap.segments) for x in (gs * snap.w_dot, gs * gs, snap.w_dot.square())
    ]
    if group["estimator"] == "folded" and group["alpha_scaling"] == "normalized":
        # the folded form's rate needs each whole tensor's mean square (a pass over the weights)
        norms = torch._foreach_norm([local_view(p).detach().reshape(-1) for p in params], 2, dtype=torch.float32)
        sums.append(torch.stack(norms).square())
    else:
        sums.append(torch.zeros_like(sums[0]))
    rows = torch.stack(sums, dim=1)
    if reduce_stats is not None:
        rows = reduce_stats(rows)
    host = rows.tolist()
    num, gg, ww = (math.fsum(row[i] for row in host) for i in range(3))
    scale = math.sqrt(gg * ww)
    cos = num / scale if scale > 0 and math.isfinite(scale) and math.isfinite(num) else 0.0
    lo, hi = (math.log(x) for x in BETA_RANGE)
    group["beta"] = math.exp(min(hi, max(lo, math.log(group["beta"]) - group["tune_beta"] * cos)))
    snap.w_ms = [row[3] / max(p.numel(), 1) for row, p in zip(host, params)]
    return snap


def _per_sample(values: list[float], snap: Snapshot) -> float | Tensor:
    """Per-tensor numbers as one number (all equal: the usual case) or as a vector over the samples."""
    if all(v == values[0] for v in values):
        return values[0]
    return torch.tensor(values, dtype=snap.w.dtype, device=snap.w.device).repeat_interleave(snap.segments)


def after_step(group: dict[str, Any], states: list[dict], snap: Snapshot, lookahead: Callable) -> None:
    """Carry the tangents through the step just taken (``lookahead(β_t)`` is its weight λ)."""
    lr = float(group["lr"])
    steps = torch.stack([s["step"] for s in states]).tolist()  # one host read (the Triton step's are on the GPU)
    per_t = {t: intercept_rate(group["beta"], t, group["beta_warmup"]) for t in set(steps)}

    def per_sample(f: Callable[[float], float]) -> float | Tensor:
        """``f`` of each tensor's step count (computed once per distinct count), over the samples."""
        at = {t: f(t) for t in set(steps)}
        return _per_sample([at[t] for t in steps], snap)

    finite, gs = snap.finite, snap.g
    # the intercept's per-coordinate rate k_t: how far the form's step moves b toward g
    rate = unit_residual_rate(
        get_form(group["estimator"]),
        snap.w,
        _per_sample(snap.w_ms, snap),
        alpha=group["alpha"],
        floor=group["norm_floor"],
        beta_t=per_sample(per_t.__getitem__),
        normalize=group["alpha_scaling"] == "normalized",
    )
    d_beta = per_sample(lambda t: rate_derivative(group["beta"], t, group["beta_warmup"]))
    # ḃ_t = (1 - k_t) ḃ_{t-1} - β'_t (b_{t-1} - g_t), where the step moved (finite g)
    b_dot = torch.where(finite, snap.b_dot * (1 - rate) - (snap.b - gs).mul_(d_beta), snap.b_dot)
    push = b_dot * per_sample(lambda t: lr * (1 - lookahead(per_t[t])))
    if group["preconditioner"] == "adam":
        v = _samples([s["exp_avg_sq"] for s in states], snap.layouts)
        push.div_(v.div_(per_sample(lambda t: 1 - group["beta2"] ** t)).sqrt_().add_(group["eps"]))
    # ẇ_{t+1} = μ (1 - γ_t ω) ẇ_t - γ_t (1 - λ) ḃ_t / D_t
    w_dot = torch.where(finite, (snap.w_dot * (DISCOUNT * (1 - lr * group["weight_decay"]))).sub_(push), snap.w_dot)
    torch._foreach_copy_(_tangents(states, STATE_KEYS[0]), list(b_dot.split(snap.lengths)))
    torch._foreach_copy_(_tangents(states, STATE_KEYS[1]), list(w_dot.split(snap.lengths)))
