"""FSDP2 worker, run by ``torchrun --nproc_per_node N`` (gloo, CPU) from ``test_fsdp.py``.

For each estimator it runs, on every rank:

* the reference: the unsharded model on the full batch, in this process alone;
* the same 20 steps under ``fully_shard`` (each rank its slice of the batch), recording
  the reduced per-tensor sums of every step, the collectives issued inside
  ``optimizer.step()`` and the placements of the optimizer state;
* checkpoints at step 10 (DCP sharded, and full state dicts) loaded into a fresh sharded
  model and optimizer, continued to step 20.

Each rank writes ``rank<r>.json`` (and rank 0 ``scalars.pt``) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _models import FSDP_ESTIMATORS, FSDP_NONFINITE, batch, loss_fn, make_model, param_groups
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode

from hf_to import TrainableOptimizer, native

STEPS, SAVE_AT, BATCH = 20, 10, 6
OPT_KW = dict(lr=1e-2, weight_decay=0.1)
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "all_to_all_single",
    "barrier",
)


def record_sums(opt: TrainableOptimizer, out: list) -> None:
    """Record the phase-1 sums after reduction (what every tensor's step uses)."""
    make = opt._stats_reducer

    def recording(params):
        reduce = make(params)

        def f(sums):
            sums = reduce(sums) if reduce is not None else sums
            out.append(sums.detach().clone())
            return sums

        return f

    opt._stats_reducer = recording


class CollectiveCounter:
    """Count the c10d collectives called through ``torch.distributed`` while active."""

    def __init__(self) -> None:
        self.count = 0
        self.active = False
        for name in COLLECTIVES:
            fn = getattr(dist, name)

            def wrapped(*args, _fn=fn, **kwargs):
                if self.active:
                    self.count += 1
                return _fn(*args, **kwargs)

            setattr(dist, name, wrapped)


class NativeCounter:
    """Count the param groups of sharded parameters that took the C kernel (hf_to.native) while active."""

    def __init__(self) -> None:
        self.count = 0
        self.active = False
        real = native.native_step

        def counting(params, *args, **kwargs):
            if self.active and any(isinstance(p, DTensor) for p in params):
                self.count += 1
            return real(params, *args, **kwargs)

        native.native_step = counting


NATIVE = NativeCounter()


def shard(model, mesh):
    fully_shard(model.block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train(model, opt, steps, rank, world, comm=None):
    per = BATCH // world
    for t in steps:
        x, y = batch(t, BATCH)
        loss_fn(model, x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]).backward()
        if comm is None:
            opt.step()
        else:
            counter, counts = comm
            counter.count = 0
            counter.active = True
            with CommDebugMode() as mode:
                opt.step()
            counter.active = False
            counts.append([counter.count, mode.get_total_counts()])
        opt.zero_grad(set_to_none=True)


def full_params(model) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in model.named_parameters()}


def max_rel_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)) for k in b)


def optimizer_kwargs(form: str) -> dict:
    """``"<estimator>[+fused]"``."""
    name, _, variant = form.partition("+")
    return dict(OPT_KW, estimator=name, fused=variant == "fused")


def run_estimator(estimator: str, mesh, rank: int, world: int, out: Path, counter: CollectiveCounter) -> dict:
    res: dict = {}
    # "<estimator>+fused": fused=True on local shards (on a CPU the C kernel of hf_to.native, on
    # CUDA the Triton step of hf_to.gpu; either way the sums through the group's one all-reduce).
    kw = optimizer_kwargs(estimator)

    # Reference: one process, full batch.
    ref = make_model(0)
    ref_opt = TrainableOptimizer(param_groups(ref, kw["weight_decay"]), **kw)
    ref_sums: list = []
    record_sums(ref_opt, ref_sums)
    train(ref, ref_opt, range(STEPS), rank=0, world=1)
    ref_params = {k: v.detach().clone() for k, v in ref.named_parameters()}

    # Sharded run, checkpointing at SAVE_AT.
    model = shard(make_model(0), mesh)
    opt = TrainableOptimizer(param_groups(model, kw["weight_decay"]), **kw)
    sums: list = []
    record_sums(opt, sums)
    counts: list = []
    NATIVE.count, NATIVE.active = 0, True
    train(model, opt, range(SAVE_AT), rank, world, comm=(counter, counts))
    NATIVE.active = False
    res["native_sharded_group_steps"] = NATIVE.count
    ckpt = out / f"ckpt_{estimator}"
    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
        checkpoint_id=str(ckpt / "sharded"),
    )
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full_sd = {
        "model": get_model_state_dict(model, options=full),
        "optim": get_optimizer_state_dict(model, opt, options=full),
    }
    if rank == 0:
        torch.save(full_sd, ckpt / "full.pt")
    dist.barrier()
    train(model, opt, range(SAVE_AT, STEPS), rank, world, comm=(counter, counts))
    sharded_params = full_params(model)

    res["max_rel_diff_vs_one_process"] = max_rel_diff(sharded_params, ref_params)
    res["collectives_per_step"] = counts
    res["param_groups_with_grads"] = len(opt.param_groups)
    res["sums_shape"] = [list(s.shape) for s in sums[:2]]
    res["max_rel_diff_sums_vs_one_process"] = max(
        float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(sums, ref_sums)
    )
    torch.save(sums, out / f"sums_{estimator}_rank{rank}.pt")

    # Optimizer state of sharded parameters is sharded like the parameter.
    state_ok = []
    for p in model.parameters():
        for key, value in opt.state[p].items():
            if key == "step":
                state_ok.append(not isinstance(value, DTensor) and value.numel() == 1)
            else:
                state_ok.append(
                    isinstance(value, DTensor)
                    and value.placements == p.placements
                    and value.to_local().shape == p.to_local().shape
                )
    res["state_is_dtensor_like_param"] = all(state_ok) and len(state_ok) > 0
    res["local_numels"] = [p.to_local().numel() for p in model.parameters()]

    # Resume from step SAVE_AT into a fresh sharded model and optimizer (other init).
    for mode in ("sharded", "full"):
        fresh = shard(make_model(1), mesh)
        fresh_opt = TrainableOptimizer(param_groups(fresh, kw["weight_decay"]), **kw)
        if mode == "sharded":
            sd = {"model": get_model_state_dict(fresh), "optim": get_optimizer_state_dict(fresh, fresh_opt)}
            dcp.load(sd, checkpoint_id=str(ckpt / "sharded"))
            set_model_state_dict(fresh, sd["model"])
            set_optimizer_state_dict(fresh, fresh_opt, sd["optim"])
        else:
            sd = torch.load(ckpt / "full.pt", weights_only=False)
            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(fresh, sd["model"], options=opts)
            set_optimizer_state_dict(fresh, fresh_opt, sd["optim"], options=opts)
        train(fresh, fresh_opt, range(SAVE_AT, STEPS), rank, world)
        resumed = full_params(fresh)
        res[f"resume_{mode}_max_abs_diff"] = max(float((resumed[k] - sharded_params[k]).abs().max()) for k in resumed)
    return res


# Non-finite gradient entries at step NONFINITE_STEP (global indices): two in the last rows
# of fc1.weight, held by the last rank's shard alone; every entry of the (1, d) start token,
# held by rank 0 alone; every entry of the head bias, split over ranks.
NONFINITE_STEP, NONFINITE_STEPS = 2, 5
FC1_BAD = ((30, 1, float("inf")), (31, 2, float("nan")))


def _local_rows(p: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, int]:
    """The local gradient of ``p`` and the global row of its first row (``Shard(0)``, chunked)."""
    g = p.grad
    if isinstance(g, DTensor):
        return g.to_local(), rank * math.ceil(p.shape[0] / world)
    return g, 0


def inject_nonfinite(model, rank: int, world: int) -> None:
    fc1, offset = _local_rows(model.block.fc1.weight, rank, world)
    for i, j, value in FC1_BAD:
        if offset <= i < offset + fc1.shape[0]:
            fc1[i - offset, j] = value
    _local_rows(model.start, rank, world)[0].fill_(float("inf"))
    _local_rows(model.head.bias, rank, world)[0].fill_(float("nan"))


def run_nonfinite(estimator: str, mesh, rank: int, world: int) -> dict:
    """A gradient non-finite in a few entries of one rank's shard, or in every entry of a tensor.

    The global count decides: diagonal and none keep the bad entries of fc1.weight and step
    the rest on every rank; rank_one skips fc1.weight on every rank, also where the local
    shard is finite; the all-non-finite tensors are skipped everywhere (no rank sees them whole).
    """
    kw = optimizer_kwargs(estimator)
    ref = make_model(0)
    ref_opt = TrainableOptimizer(param_groups(ref, kw["weight_decay"]), **kw)
    model = shard(make_model(0), mesh)
    opt = TrainableOptimizer(param_groups(model, kw["weight_decay"]), **kw)
    per = BATCH // world
    kept = True
    for t in range(NONFINITE_STEPS):
        x, y = batch(t, BATCH)
        loss_fn(ref, x, y).backward()
        loss_fn(model, x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]).backward()
        if t == NONFINITE_STEP:
            inject_nonfinite(ref, 0, 1)
            inject_nonfinite(model, rank, world)
            before = model.block.fc1.weight.full_tensor().clone()
        ref_opt.step()
        opt.step()
        if t == NONFINITE_STEP:
            after = model.block.fc1.weight.full_tensor()
            kept = all(bool(after[i, j] == before[i, j]) for i, j, _ in FC1_BAD)
            changed = bool((after != before).any())
        ref_opt.zero_grad(set_to_none=True)
        opt.zero_grad(set_to_none=True)
    ref_steps = {k: ref_opt.state[p]["step"].item() for k, p in ref.named_parameters()}
    steps = {k: opt.state[p]["step"].item() for k, p in model.named_parameters()}
    return {
        "max_rel_diff_vs_one_process": max_rel_diff(full_params(model), dict(ref.named_parameters())),
        "steps": steps,
        "steps_equal_one_process": steps == ref_steps,
        "bad_entries_kept": kept,
        "fc1_changed_at_the_bad_step": changed,
    }


def run_tuned(fused: bool, mesh, rank: int, world: int, out: Path) -> dict:
    """``tune_beta`` (hf_to.tuning) on the folded form: the sharded run against one process (β
    per step and the weights), and a DCP checkpoint at step 10 resumed into a fresh model."""
    # every coordinate sampled, so that the shards' samples are the one process's
    from hf_to import tuning

    tuning.group_stride = lambda group: 1
    kw = dict(OPT_KW, estimator="folded", fused=fused, tune_beta=1.0)
    ref = make_model(0)
    ref_opt = TrainableOptimizer(param_groups(ref, kw["weight_decay"]), **kw)
    ref_betas: list = []
    for t in range(STEPS):
        train(ref, ref_opt, range(t, t + 1), rank=0, world=1)
        ref_betas.append([g["beta"] for g in ref_opt.param_groups])
    model = shard(make_model(0), mesh)
    opt = TrainableOptimizer(param_groups(model, kw["weight_decay"]), **kw)
    betas: list = []
    ckpt = out / f"ckpt_tuned_{fused}"
    for t in range(STEPS):
        if t == SAVE_AT:
            dcp.save(
                {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                checkpoint_id=str(ckpt),
            )
        train(model, opt, range(t, t + 1), rank, world)
        betas.append([g["beta"] for g in opt.param_groups])
    sharded = full_params(model)
    res = {
        "max_rel_diff_vs_one_process": max_rel_diff(sharded, {k: v.detach() for k, v in ref.named_parameters()}),
        "max_beta_diff_vs_one_process": max(abs(a - b) for x, y in zip(betas, ref_betas) for a, b in zip(x, y)),
        "betas": betas,
        "beta_moved": len({b for x in betas for b in x}) > 2,
    }
    fresh = shard(make_model(1), mesh)
    fresh_opt = TrainableOptimizer(param_groups(fresh, kw["weight_decay"]), **kw)
    sd = {"model": get_model_state_dict(fresh), "optim": get_optimizer_state_dict(fresh, fresh_opt)}
    dcp.load(sd, checkpoint_id=str(ckpt))
    set_model_state_dict(fresh, sd["model"])
    set_optimizer_state_dict(fresh, fresh_opt, sd["optim"])
    train(fresh, fresh_opt, range(SAVE_AT, STEPS), rank, world)
    resumed = full_params(fresh)
    res["resume_max_abs_diff"] = max(float((resumed[k] - sharded[k]).abs().max()) for k in resumed)
    return res


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--estimators",
        nargs="+",
        default=list(FSDP_ESTIMATORS),
    )
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.use_deterministic_algorithms(True)
    mesh = init_device_mesh("cpu", (world,))
    counter = CollectiveCounter()
    results = {"world": world}
    for estimator in args.estimators:
        results[estimator] = run_estimator(estimator, mesh, rank, world, args.out, counter)
    results["nonfinite"] = {est: run_nonfinite(est, mesh, rank, world) for est in FSDP_NONFINITE}
    results["tuned"] = {str(fused): run_tuned(fused, mesh, rank, world, args.out) for fused in (False, True)}

    # Diagnostics: local shard sums, summed over the shard group on request.
    ref = make_model(0)
    ref_opt = TrainableOptimizer(param_groups(ref, 0.1), **OPT_KW, estimator="rank_one", diagnostics=True)
    model = shard(make_model(0), mesh)
    opt = TrainableOptimizer(param_groups(model, 0.1), **OPT_KW, estimator="rank_one", diagnostics=True)
    train(ref, ref_opt, range(3), rank=0, world=1)
    train(model, opt, range(3), rank, world)
    expected = ref_opt.diagnostics()
    local = opt.diagnostics(reset=False)
    summed = opt.diagnostics(all_reduce=True)
    results["diagnostics_max_rel_diff"] = max(
        abs(s[k] - e[k]) / max(abs(e[k]), 1e-30) for s, e in zip(summed, expected) for k in e
    )
    results["diagnostics_local_grad_sq"] = [d["grad_sq"] for d in local]
    results["diagnostics_summed_grad_sq"] = [d["grad_sq"] for d in summed]

    # accelerate's FSDP2 preparation builds the optimizer first, shards the model, then swaps
    # the DTensors into the optimizer's groups: these are not flat partitions.
    from accelerate.utils.fsdp_utils import fsdp2_switch_optimizer_parameters

    model = make_model(0)
    opt = TrainableOptimizer(param_groups(model, 0.1), **OPT_KW, estimator="rank_one")
    old = dict(model.named_parameters())
    shard(model, mesh)
    fsdp2_switch_optimizer_parameters(opt, {old[n].data_ptr: p for n, p in model.named_parameters()})
    direct = shard(make_model(0), mesh)
    direct_opt = TrainableOptimizer(param_groups(direct, 0.1), **OPT_KW, estimator="rank_one")
    try:
        train(model, opt, range(3), rank, world)
        train(direct, direct_opt, range(3), rank, world)
        a, b = full_params(model), full_params(direct)
        results["accelerate_swap_max_abs_diff"] = max(float((a[k] - b[k]).abs().max()) for k in a)
    except ValueError as e:
        results["accelerate_swap_max_abs_diff"] = str(e)

    # The full estimator refuses sharded parameters with a clear error.
    model = shard(make_model(0), mesh)
    opt = TrainableOptimizer(model.parameters(), estimator="full")
    x, y = batch(0, BATCH)
    loss_fn(model, x, y).backward()
    try:
        opt.step()
        results["full_error"] = None
    except ValueError as e:
        results["full_error"] = str(e)
    (args.out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
