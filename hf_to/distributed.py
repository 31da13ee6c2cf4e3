"""Sharded parameters: local shards for elementwise work, one all-reduce for whole-tensor sums.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) a parameter, its gradient and the
optimizer state created with ``zeros_like`` are DTensors, typically ``Shard(0)`` over a mesh.
The TO step is elementwise except for a few whole-tensor sums (``Estimator.stat_names``):
those are computed per local shard, stacked for all tensors of a param group and summed
across the shard group by a single ``all_reduce``; everything else runs on local shards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Container

import torch
import torch.distributed as dist
from torch import Tensor

try:  # torch >= 2.4 exposes DTensor publicly
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - older torch
    DTensor = None  # type: ignore[assignment,misc]

__all__ = [
    "ELEMENT_SUMS",
    "all_reduce_diagnostics",
    "all_reduce_sum",
    "check_unflattened",
    "flattened_reason",
    "is_dtensor",
    "is_sharded",
    "local_view",
    "make_stats_reducer",
    "shard_process_group",
]

logger = logging.getLogger(__name__)


def is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def is_sharded(t: Tensor) -> bool:
    """True for a DTensor with at least one ``Shard`` placement."""
    return is_dtensor(t) and any(pl.is_shard() for pl in t.placements)


def local_view(t: Tensor) -> Tensor:
    """The local shard of a DTensor (aliasing its storage), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def shard_process_group(params: list[Tensor]) -> dist.ProcessGroup | None:
    """The process group over which the sharded tensors among ``params`` are split.

    ``None`` when none is sharded.  All sharded tensors must share their mesh and shard mesh
    dimension (as ``fully_shard`` produces), so that one collective serves them all.
    """
    groups = set()
    for p in params:
        if is_sharded(p):
            dims = [i for i, pl in enumerate(p.placements) if pl.is_shard()]
            if len(dims) != 1:
                raise NotImplementedError(
                    f"TrainableOptimizer supports parameters sharded over one mesh dimension; got {p.placements}"
                )
            groups.add((p.device_mesh, dims[0]))
    if not groups:
        return None
    if len(groups) != 1:
        raise NotImplementedError(
            "parameters of one param group are sharded over different device meshes; put them in separate param groups"
        )
    mesh, dim = groups.pop()
    return mesh.get_group(dim)


def make_stats_reducer(params: list[Tensor]) -> Callable[[Tensor], Tensor] | None:
    """Return a function that sums the rows of sharded parameters over their shard group.

    Rows of unsharded (plain or replicated) parameters are left as they are.  All sharded
    parameters of one param group must share their mesh and shard mesh dimension (as
    ``fully_shard`` produces), so one collective serves the whole group.
    """
    process_group = shard_process_group(params)
    if process_group is None:
        return None
    mask = torch.tensor([is_sharded(p) for p in params])

    def reduce(sums: Tensor) -> Tensor:
        total = all_reduce_sum(sums.clone(), process_group)
        return torch.where(mask.to(sums.device)[:, None], total, sums)

    return reduce


def all_reduce_sum(t: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Sum ``t`` over ``group`` in place and return it.

    A CPU tensor on a group without a CPU backend goes through the current CUDA device: with
    FSDP2's ``CPUOffloadPolicy`` the gradients and optimizer state, hence the step's sums, are
    on the CPU, while the process group of a GPU job is NCCL alone (accelerate's).  Not yet
    run on a GPU (this project has had none, 2026-12-06): ``scripts/gpu_check.py`` runs it.
    """
    backend = str(dist.get_backend(group)).lower()
    if t.device.type == "cpu" and torch.cuda.is_available() and not any(b in backend for b in ("gloo", "mpi", "cpu:")):
        on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM, group=group)
        return t.copy_(on_gpu)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


#: Diagnostic sums that are sums over elements (and so partial on a shard).
ELEMENT_SUMS = ("residual_sq", "grad_sq", "estimate_sq")


def all_reduce_diagnostics(accs: list[dict[str, Tensor]], param_groups: list[dict]) -> list[dict[str, Tensor]]:
    """Sum the element sums of each param group's diagnostics over its shard group.

    One all-reduce per param group with sharded parameters; counts (``steps``, ``skipped``)
    are the same on every rank and stay as they are.  A replicated tensor in a group with
    sharded ones is counted once per rank.
    """
    out = []
    for acc, group in zip(accs, param_groups):
        process_group = shard_process_group(group["params"])
        if process_group is not None:
            sums = all_reduce_sum(torch.stack([acc[k] for k in ELEMENT_SUMS]), process_group)
            acc = {**acc, **dict(zip(ELEMENT_SUMS, sums.unbind()))}
        out.append(acc)
    return out


def flattened_reason(p: Tensor, given: Container[Tensor]) -> str | None:
    """Why ``p`` is a flat piece of several parameters rather than one parameter, or ``None``.

    ``given`` holds the tensors handed to the optimizer (constructor and ``add_param_group``).
    DeepSpeed's ZeRO optimizer (stages 1-3) and its bf16 optimizer wrap the client optimizer
    and overwrite each ``param_group["params"]`` with one flat fp32 partition per rank, a
    slice of the concatenation of the group's parameters; such a tensor was never given to
    the optimizer.  FSDP1 (``FullyShardedDataParallel``) marks its ``FlatParameter`` and, with
    ``use_orig_params=True``, the flat shards it exposes as parameters.
    """
    if getattr(p, "_is_flat_param", False) or getattr(p, "_fsdp_flattened", False):
        return (
            "FSDP1 (FullyShardedDataParallel) flattened the parameters into FlatParameter shards, "
            "pieces of several parameters split across ranks"
        )
    if p.dim() == 1 and not is_dtensor(p) and p not in given:
        # (accelerate's FSDP2 preparation swaps in DTensors for the given parameters: not flat.)
        return (
            f"a tensor of shape {tuple(p.shape)} in its param group was not passed to the optimizer: a wrapper "
            "replaced the group's parameters, as DeepSpeed (ZeRO stages 1-3 and its bf16 optimizer) does "
            "with one flat fp32 partition per param group and rank, a slice of the concatenation of "
            "the group's parameters"
        )
    return None


_warned: set[tuple[int, int]] = set()


def check_unflattened(p: Tensor, given: Container[Tensor], *, estimator: str, alpha_scaling: str, index: int) -> None:
    """Refuse a flat partition (see :func:`flattened_reason`) for the whole-tensor estimators.

    The rank-one and full estimators need each parameter whole: their sums and matrix span
    one tensor, and a flat partition holds pieces of several tensors, each summed on its own
    rank.  ``folded``, ``diagonal`` and ``none`` are elementwise and run; the normalised rate
    of the first two then uses the partition's mean square of the weights instead of each
    tensor's (a warning says so).
    """
    reason = flattened_reason(p, given)
    if reason is None:
        return
    from .forms import get_form

    if not get_form(estimator).coordinatewise:  # its slope couples all elements of a tensor
        raise ValueError(
            f"estimator={estimator!r} cannot run on param group {index}: {reason}. The {estimator} "
            "estimator couples all elements of one parameter tensor (whole-tensor sums such as v^T w, "
            "or an n x n matrix), which a flat partition no longer holds. Use estimator='folded' (the "
            "default), estimator='diagonal' or estimator='none' (elementwise) with DeepSpeed ZeRO or FSDP1; with FSDP2 (fully_shard; "
            "accelerate's fsdp_version: 2) estimator='rank_one' runs on sharded parameters"
        )
    if "ww" in get_form(estimator).stat_names and alpha_scaling == "normalized" and (id(given), index) not in _warned:
        _warned.add((id(given), index))
        logger.warning(
            "hf_to: param group %d holds flat partitions (%s); the %s estimator runs elementwise "
            "on them, its normalised slope rate using each partition's mean square of the weights "
            "instead of each parameter's",
            index,
            reason,
            estimator,
        )
