"""Sharded parameters: local shards for elementwise work, one all-reduce for whole-tensor sums.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) a parameter, its gradient and the
optimizer state created with ``zeros_like`` are DTensors, typically ``Shard(0)`` over a mesh.
The TO step is elementwise except for a few whole-tensor sums (``Estimator.stat_names``):
those are computed per local shard, stacked for all tensors of a param group and summed
across the shard group by a single ``all_reduce``; everything else runs on local shards.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

try:  # torch >= 2.4 exposes DTensor publicly
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - older torch
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["is_dtensor", "is_sharded", "local_view", "make_stats_reducer"]


def is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def is_sharded(t: Tensor) -> bool:
    """True for a DTensor with at least one ``Shard`` placement."""
    return is_dtensor(t) and any(pl.is_shard() for pl in t.placements)


def local_view(t: Tensor) -> Tensor:
    """The local shard of a DTensor (aliasing its storage), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def make_stats_reducer(params: list[Tensor]) -> Callable[[Tensor], Tensor] | None:
    """Return a function that sums the rows of sharded parameters over their shard group.

    Rows of unsharded (plain or replicated) parameters are left as they are.  All sharded
    parameters of one param group must share their mesh and shard mesh dimension (as
    ``fully_shard`` produces), so one collective serves the whole group.
    """
    sharded = [is_sharded(p) for p in params]
    if not any(sharded):
        return None
    groups = set()
    for p, s in zip(params, sharded):
        if s:
            dims = [i for i, pl in enumerate(p.placements) if pl.is_shard()]
            if len(dims) != 1:
                raise NotImplementedError(
                    f"TrainableOptimizer supports parameters sharded over one mesh dimension; got {p.placements}"
                )
            groups.add((p.device_mesh, dims[0]))
    if len(groups) != 1:
        raise NotImplementedError(
            "parameters of one param group are sharded over different device meshes; put them in separate param groups"
        )
    mesh, dim = groups.pop()
    process_group = mesh.get_group(dim)
    mask = torch.tensor(sharded)

    def reduce(sums: Tensor) -> Tensor:
        total = sums.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=process_group)
        return torch.where(mask.to(sums.device)[:, None], total, sums)

    return reduce
