"""Flat partitions (DeepSpeed ZeRO, FSDP1): detected at the first step, in one process.

``zero_flatten`` reproduces what ``DeepSpeedZeroOptimizer.__init__`` (deepspeed
``runtime/zero/stage_1_and_2.py``) does to the client optimizer: it concatenates each param
group's parameters, keeps this rank's slice as an fp32 tensor with ``requires_grad=True`` and
sets ``param_group["params"] = [that partition]``.  ``test_deepspeed.py`` runs the real thing.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from hf_to import TrainableOptimizer


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def zero_flatten(opt: torch.optim.Optimizer, rank: int = 0, world: int = 2) -> list[torch.Tensor]:
    """Replace every param group's parameters by this rank's flat fp32 partition."""
    partitions = []
    for group in opt.param_groups:
        flat = torch.cat([p.detach().reshape(-1) for p in group["params"]]).float()
        size = -(-flat.numel() // world)
        part = flat[rank * size : (rank + 1) * size].clone()
        part.requires_grad = True
        group["params"] = [part]
        partitions.append(part)
    return partitions


def flat_grads(net: nn.Module, partition_size: int, rank: int = 0) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()])[
        rank * partition_size : (rank + 1) * partition_size
    ]


def backward(net: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    net.zero_grad()
    net(torch.randn(5, 4, generator=g)).square().mean().backward()


@pytest.mark.parametrize("estimator", ["rank_one", "full"])
def test_whole_tensor_estimators_refuse_a_zero_flat_partition(estimator):
    net = model()
    opt = TrainableOptimizer(net.parameters(), estimator=estimator)
    (part,) = zero_flatten(opt)
    part.grad = torch.ones_like(part)
    with pytest.raises(ValueError) as err:
        opt.step()
    message = str(err.value)
    assert f"estimator={estimator!r}" in message
    assert "DeepSpeed" in message and "not passed to the optimizer" in message
    assert "estimator='diagonal'" in message and "estimator='none'" in message


@pytest.mark.parametrize("estimator", ["rank_one", "full"])
def test_whole_tensor_estimators_refuse_fsdp1_flat_parameters(estimator):
    flat = nn.Parameter(torch.randn(12))
    flat._fsdp_flattened = True  # what FSDP1 marks its FlatParameter and its shards with
    opt = TrainableOptimizer([flat], estimator=estimator)
    flat.grad = torch.ones_like(flat)
    with pytest.raises(ValueError, match="FSDP1"):
        opt.step()


@pytest.mark.parametrize("kw", [dict(estimator="none"), dict(estimator="diagonal", alpha_scaling="none")])
def test_elementwise_estimators_on_flat_partitions_equal_per_parameter_steps(kw):
    """Without whole-tensor sums the step is elementwise, so flattening cannot change it."""
    net, flat_net = model(), model()
    opt = TrainableOptimizer(net.parameters(), lr=1e-2, **kw)
    # One optimizer per rank, each holding its rank's partition, as under ZeRO.
    rank_opts = [TrainableOptimizer(flat_net.parameters(), lr=1e-2, **kw) for _ in range(2)]
    parts = [zero_flatten(o, rank)[0] for rank, o in enumerate(rank_opts)]
    for t in range(5):
        backward(net, t)
        opt.step()
        backward(flat_net, t)  # the gradient DeepSpeed would hand each rank's partition
        for rank, (o, part) in enumerate(zip(rank_opts, parts)):
            part.grad = flat_grads(flat_net, parts[0].numel(), rank)
            o.step()
        # ZeRO's all-gather: the updated partitions become the model's weights.
        merged = torch.cat([part.detach() for part in parts])
        torch.nn.utils.vector_to_parameters(
            merged[: sum(p.numel() for p in flat_net.parameters())], flat_net.parameters()
        )
    expected = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    torch.testing.assert_close(merged[: expected.numel()], expected)


def test_normalized_diagonal_on_flat_partitions_runs_and_warns(caplog):
    net = model()
    opt = TrainableOptimizer(net.parameters(), estimator="diagonal")
    (part,) = zero_flatten(opt)
    before = part.detach().clone()
    with caplog.at_level(logging.WARNING, logger="hf_to.distributed"):
        for t in range(3):
            part.grad = torch.randn(part.shape, generator=torch.Generator().manual_seed(t))
            opt.step()
    assert not torch.equal(part.detach(), before)
    assert sum("flat partitions" in r.getMessage() for r in caplog.records) == 1


def test_parameters_added_with_add_param_group_are_not_flat_partitions():
    net = model()
    first, *rest = net.parameters()
    opt = TrainableOptimizer([first], estimator="rank_one")
    opt.add_param_group({"params": rest})
    backward(net, 0)
    opt.step()
    assert all(opt.state[p] for p in net.parameters())


def test_a_deep_copied_optimizer_knows_its_parameters():
    net = model()
    opt = copy.deepcopy(TrainableOptimizer(net.parameters(), estimator="rank_one"))
    for p in (p for g in opt.param_groups for p in g["params"]):
        p.grad = torch.ones_like(p)
    opt.step()


def test_tune_beta_refuses_flat_partitions():
    """Each rank would tune its own β on its slice: refused at the first step, naming the keyword."""
    net = model()
    opt = TrainableOptimizer(net.parameters(), lr=1e-2, tune_beta=1.0)
    (part,) = zero_flatten(opt)
    backward(net, 0)
    part.grad = flat_grads(net, part.numel())
    with pytest.raises(ValueError, match="tune_beta cannot run on"):
        opt.step()
