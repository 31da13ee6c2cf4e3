"""A few TO steps of a small model under FSDP2 with ``CPUOffloadPolicy`` on one GPU, against
the same steps without FSDP; part of ``scripts/gpu_check.py`` (which runs it on a GPU).

With the policy, parameters, gradients and optimizer state are CPU DTensors, so the step runs
on the CPU: the C kernel of ``hf_to.native`` on the local shards, with the per-tensor sums
all-reduced over the process group, which on a GPU machine is NCCL-only (what accelerate
creates): ``hf_to.distributed`` sends those few sums through the GPU.  Prints one JSON line:
per estimator, the max relative difference of the parameters from the run without FSDP, the
number of sharded groups that took the C kernel, and where the parameters live.

    python scripts/cpu_offload_check.py            # one GPU, NCCL, CPUOffloadPolicy
    python scripts/cpu_offload_check.py --cpu      # smoke test without a GPU: gloo, no offload
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_to import TrainableOptimizer, native

ESTIMATORS = ("diagonal", "rank_one", "none", "folded")
STEPS = 5


def _model(device: str) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 8)).to(device)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, device: str) -> None:
    for t in range(STEPS):
        gen = torch.Generator().manual_seed(t)
        x, y = torch.randn(16, 64, generator=gen).to(device), torch.randn(16, 8, generator=gen).to(device)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="gloo on the CPU, no offload policy (a smoke test)")
    args = parser.parse_args(argv)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    device = "cpu" if args.cpu else "cuda"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo" if args.cpu else "nccl")
    calls = []
    real = native.native_step

    def counting(params, *a, **kw):
        calls.append(any(isinstance(p, DTensor) for p in params))
        return real(params, *a, **kw)

    native.native_step = counting
    results = {"device": device}
    try:
        mesh = init_device_mesh(device, (1,))
        for estimator in ESTIMATORS:
            ref = _model(device)
            _train(ref, TrainableOptimizer(ref.parameters(), lr=1e-2, estimator=estimator), device)
            model = _model(device)
            policy = {} if args.cpu else {"offload_policy": CPUOffloadPolicy()}
            for layer in (model[0], model[2]):
                fully_shard(layer, mesh=mesh, **policy)
            fully_shard(model, mesh=mesh, **policy)
            calls.clear()
            _train(model, TrainableOptimizer(model.parameters(), lr=1e-2, estimator=estimator), device)
            # One rank: the local shard is the whole tensor (and full_tensor() would all-gather
            # CPU tensors through NCCL).
            full = {k: v.detach().to_local().to(device) for k, v in model.named_parameters()}
            diff = max(
                float((full[k] - v.detach()).abs().max() / v.detach().abs().max().clamp_min(1e-30))
                for k, v in ref.named_parameters()
            )
            results[estimator] = {
                "max_rel_diff_vs_no_fsdp": diff,
                "native_sharded_calls": sum(calls),
                "steps": STEPS,
                "param_devices": sorted({p.to_local().device.type for p in model.parameters()}),
                "ok": diff <= 1e-4 and sum(calls) == STEPS,
            }
    finally:
        dist.destroy_process_group()
    results["ok"] = all(results[e]["ok"] for e in ESTIMATORS)
    print(json.dumps(results))
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
