"""DDP worker, run by ``torchrun --nproc_per_node 2`` (gloo, CPU) from ``test_ddp.py``.

Each rank seeds its global RNG differently after building the model, so that anything
random in the optimizer would make the replicas drift apart.  After 20 steps rank 0
writes, per estimator, whether every rank holds bit-identical parameters and optimizer
state, and the largest relative difference to the same 20 steps in one process.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from _models import batch, loss_fn, make_model, param_groups
from torch.nn.parallel import DistributedDataParallel

from hf_to import TrainableOptimizer

STEPS, BATCH = 20, 6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    per = BATCH // world
    results = {}
    for estimator in ("diagonal", "rank_one", "full", "none"):
        kw = dict(lr=1e-2, weight_decay=0.1, estimator=estimator)
        ref = make_model(0)
        ref_opt = TrainableOptimizer(param_groups(ref, 0.1), **kw)
        model = DistributedDataParallel(make_model(0))
        opt = TrainableOptimizer(param_groups(model.module, 0.1), **kw)
        torch.manual_seed(1234 + rank)
        for t in range(STEPS):
            x, y = batch(t, BATCH)
            loss_fn(ref, x, y).backward()
            ref_opt.step()
            ref_opt.zero_grad()
            loss_fn(model, x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]).backward()
            opt.step()
            opt.zero_grad()
        mine = [p.detach() for p in model.parameters()] + [
            v for p in model.parameters() for k, v in sorted(opt.state[p].items()) if k != "step"
        ]
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        results[estimator] = {
            "ranks_identical": all(torch.equal(a, b) for other in gathered[1:] for a, b in zip(gathered[0], other)),
            "tensors_compared": len(mine),
            "max_rel_diff_vs_one_process": max(
                float((p - q).abs().max() / q.abs().max()) for p, q in zip(model.parameters(), ref.parameters())
            ),
        }
    if rank == 0:
        (args.out / "ddp.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
