"""DeepSpeed worker, run by ``torchrun --nproc_per_node 2`` (gloo on CPU) from ``test_deepspeed.py``.

For each estimator: ``deepspeed.initialize`` with a ZeRO config and a client
``TrainableOptimizer``, then 5 steps.  Rank 0 writes per estimator the wrapper's class, the
shapes the client optimizer was handed, the losses and the error raised (if any).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from _models import batch, loss_fn, make_model

from hf_to import TrainableOptimizer

STEPS, BATCH = 5, 6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stage", type=int, default=2)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    per = BATCH // world
    config = {
        "train_micro_batch_size_per_gpu": per,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": args.stage},
        "bf16": {"enabled": True},
        "zero_allow_untested_optimizer": True,
    }
    results = {}
    for estimator in ("diagonal", "none", "folded", "rank_one", "full"):
        model = make_model(0)
        # (the engine casts the model to bf16: compare in bf16)
        before = torch.nn.utils.parameters_to_vector(model.parameters()).detach().bfloat16().float()
        opt = TrainableOptimizer(model.parameters(), lr=1e-2, estimator=estimator)
        engine, wrapper, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        res = {"wrapper": type(wrapper).__name__, "losses": [], "error": None}
        try:
            for t in range(STEPS):
                x, y = batch(t, BATCH)
                sl = slice(rank * per, (rank + 1) * per)
                loss = loss_fn(engine, x[sl].bfloat16(), y[sl].bfloat16())
                engine.backward(loss)
                engine.step()
                res["losses"].append(float(loss))
        except ValueError as e:
            res["error"] = str(e)
        res["client_param_shapes"] = [list(p.shape) for g in opt.param_groups for p in g["params"]]
        res["state_keys"] = sorted({k for s in opt.state.values() for k in s})
        after = torch.nn.utils.parameters_to_vector(model.parameters()).detach().float()
        res["weights_changed"] = bool((after - before).abs().max() > 0)
        results[estimator] = res
    if rank == 0:
        (args.out / "deepspeed.json").write_text(json.dumps(results, indent=1))
    dist.barrier()


if __name__ == "__main__":
    main()
