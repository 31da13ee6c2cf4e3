"""Trainer worker, run by ``accelerate launch --cpu --num_processes 2`` from ``test_accelerate_trainer.py``.

``--optim trainable_to`` with the rank-one estimator under DDP (gloo), 6 steps, a checkpoint
every 3 steps; with ``--resume`` it restarts from a checkpoint of an earlier run instead.
Rank 0 writes ``result.json`` (losses, whether all ranks hold identical parameters and
optimizer state) and ``params.pt``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for hf_utils

from hf_utils import TokenDataset, snapshot, tiny_llama, trainer, training_args

import hf_to  # noqa: F401  (registers --optim trainable_to)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", type=str, default=None)
    args = parser.parse_args()
    targs = training_args(
        args.out,
        optim_args="estimator=rank_one",
        max_steps=6,
        save_strategy="steps",
        save_steps=3,
        per_device_train_batch_size=2,
    )
    t = trainer(tiny_llama(seed=0 if args.resume is None else 123), targs, TokenDataset(n=32))
    initial = snapshot(t.model)
    t.train(resume_from_checkpoint=args.resume)
    rank, world = dist.get_rank(), dist.get_world_size()
    opt = t.optimizer.optimizer if hasattr(t.optimizer, "optimizer") else t.optimizer
    mine = list(snapshot(t.model).values()) + [
        v for group in opt.param_groups for p in group["params"] for k, v in sorted(opt.state[p].items())
    ]
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        result = {
            "world": world,
            "optimizer": type(opt).__name__,
            "estimator": opt.param_groups[0]["estimator"],
            "global_step": t.state.global_step,
            "losses": [h["loss"] for h in t.state.log_history if "loss" in h],
            "ranks_identical": all(torch.equal(a, b) for other in gathered[1:] for a, b in zip(gathered[0], other)),
            "tensors_compared": len(mine),
            "max_abs_change": max(float((p - initial[n]).abs().max()) for n, p in snapshot(t.model).items()),
        }
        (args.out / "result.json").write_text(json.dumps(result, indent=1))
        torch.save(snapshot(t.model), args.out / "params.pt")


if __name__ == "__main__":
    main()
