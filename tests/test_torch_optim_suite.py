"""PyTorch's generic optimizer checks, run against an ``OptimizerInfo`` for TrainableOptimizer.

Upstream, ``test/test_optim.py`` (class ``TestOptimRenewed``) runs the same device-generic
checks over every entry of ``torch.testing._internal.common_optimizers.optim_db``.  torch's
wheel ships ``common_optimizers`` but not ``test_optim.py``; these are the generic checks
**rewritten** here as pytest tests (same names, same properties, our own code), driven by
:data:`TO_INFO` through upstream's ``_get_optim_inputs_including_global_cliquey_kwargs``, so
every check runs for every configuration with ``fused=False`` (the readable per-tensor path)
and ``fused=True`` (on a CPU: the C kernel of :mod:`hf_to.native`).

The upstream checks that cannot apply are listed at the end as skipped tests, each with its
reason (CUDA-only, sparse, complex, foreach, differentiable, GradScaler's fused arguments).
Needs ``expecttest`` (a test extra: ``torch.testing._internal`` imports it).
"""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch

pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest (pip install hf-to[test])")

from torch.nn import Parameter
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR
from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
    _get_optim_inputs_including_global_cliquey_kwargs,
)

from hf_to import TrainableOptimizer, native

DEVICE = "cpu"


def optim_inputs_func_trainable_to(device, dtype=None) -> list[OptimizerInput]:
    """The configurations every check runs (no global-cliquey flag: upstream adds ``fused``)."""
    configs = [
        ({}, "default (diagonal, adam preconditioner)"),
        ({"lr": 0.01}, "non-default lr"),
        ({"lr": torch.tensor(0.001)}, "Tensor lr"),
        ({"weight_decay": 0.1}, "weight decay"),
        ({"estimator": "rank_one"}, "rank-one"),
        ({"estimator": "rank_one", "weight_decay": 0.1}, "rank-one, weight decay"),
        ({"estimator": "none"}, "no slope (EMA momentum)"),
        ({"estimator": "none", "weight_decay": 0.1, "lr": 0.01}, "no slope, weight decay"),
        ({"preconditioner": "none", "lr": 0.01}, "paper step (no preconditioner)"),
        ({"estimator": "rank_one", "preconditioner": "none", "lr": 0.01}, "rank-one, no preconditioner"),
        ({"preconditioner": "none", "weight_decay": 0.1, "lr": 0.01}, "no preconditioner, weight decay"),
    ]
    return [OptimizerInput(params=None, kwargs=kwargs, desc=desc) for kwargs, desc in configs]


def optim_error_inputs_func_trainable_to(device, dtype=None) -> list[ErrorOptimizerInput]:
    def bad(kwargs, regex, error=ValueError, on=OptimizerErrorEnum.CONSTRUCTION_ERROR, params=None):
        return ErrorOptimizerInput(
            OptimizerInput(params=params, kwargs=kwargs, desc=regex), error_on=on, error_type=error, error_regex=regex
        )

    return [
        bad({"lr": -1.0}, "Invalid lr"),
        bad({"lr": torch.tensor([0.001, 0.002])}, "Tensor lr must have one element"),
        bad({"beta": 0.0}, "Invalid beta"),
        bad({"beta2": 1.0}, "Invalid beta2"),
        bad({"eps": -1.0}, "Invalid eps"),
        bad({"weight_decay": -0.1}, "Invalid weight_decay"),
        bad({"estimator": "dense"}, "Invalid estimator"),
        bad({"preconditioner": "sgd"}, "Invalid preconditioner"),
        bad({"state_dtype": torch.float16}, "Invalid state_dtype"),
        bad({}, "sparse gradients", RuntimeError, OptimizerErrorEnum.STEP_ERROR, params="sparse"),
        bad({}, "complex parameters", RuntimeError, OptimizerErrorEnum.STEP_ERROR, params="complex"),
    ]


#: TrainableOptimizer's entry, in the form of ``optim_db``'s entries.
TO_INFO = OptimizerInfo(
    TrainableOptimizer,
    optim_inputs_func=optim_inputs_func_trainable_to,
    optim_error_inputs_func=optim_error_inputs_func_trainable_to,
    supported_impls=("fused",),
    supports_fused_on=("cpu",),
    # Group keys added after the first release: a checkpoint without them still loads.
    not_og_supported_flags=("fused", "state_dtype", "max_full_numel", "beta_warmup", "intercept_init", "norm_floor"),
    supports_complex=False,
    supports_multiple_devices=False,
)


@pytest.fixture(autouse=True)
def _plain_environment(monkeypatch):
    monkeypatch.delenv("HF_TO_NATIVE", raising=False)
    # fused=True for what the C kernel does not take (float64) runs hf_to.kernels eagerly.
    monkeypatch.setenv("HF_TO_COMPILE", "0")


def _inputs(dtype=torch.float32) -> list[OptimizerInput]:
    return _get_optim_inputs_including_global_cliquey_kwargs(DEVICE, dtype, TO_INFO)


def _id(optim_input: OptimizerInput) -> str:
    fused = optim_input.kwargs.get("fused")
    return f"{optim_input.desc}, fused={fused}" if fused is not None else optim_input.desc


ALL_INPUTS = pytest.mark.parametrize("optim_input", _inputs(), ids=_id)
BASE_INPUTS = pytest.mark.parametrize("optim_input", TO_INFO.optim_inputs_func(DEVICE), ids=_id)


def _kwargs(optim_input: OptimizerInput) -> dict:
    return copy.deepcopy(optim_input.kwargs)


def _linear(dtype=torch.float32, contiguous=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if contiguous:
        weight = Parameter(torch.randn(10, 5, generator=gen, dtype=dtype))
        bias = Parameter(torch.randn(10, generator=gen, dtype=dtype))
    else:
        weight = Parameter(torch.randn(10, 5, 2, generator=gen, dtype=dtype)[..., 0])
        bias = Parameter(torch.randn(10, 2, generator=gen, dtype=dtype)[..., 0])
    x = torch.randn(5, generator=gen, dtype=dtype)
    return weight, bias, x


def _closure(optimizer, weight, bias, x):
    def closure():
        optimizer.zero_grad()
        loss = (weight.mv(x) + bias).pow(2).sum()
        loss.backward()
        return loss

    return closure


def _equal(a, b, **tol) -> None:
    torch.testing.assert_close(a, b, rtol=tol.get("rtol", 0), atol=tol.get("atol", 0))


def _same(a, b, where="") -> None:
    """Exact equality of nested state dicts (tensors bit for bit, with dtype; other values by ==)."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


# -- the generic checks ---------------------------------------------------------------------


def test_optim_infos_do_not_specify_global_cliquey_kwargs():
    for optim_input in TO_INFO.optim_inputs_func(DEVICE):
        assert not {"foreach", "fused", "differentiable", "capturable"} & set(optim_input.kwargs)


@pytest.mark.parametrize(
    "error_input",
    TO_INFO.optim_error_inputs_func(DEVICE),
    ids=lambda e: e.optimizer_error_input.desc,
)
def test_errors(error_input):
    optim_input = error_input.optimizer_error_input
    if optim_input.params == "sparse":
        p = Parameter(torch.zeros(4))
        p.grad = torch.zeros(4).to_sparse()
    elif optim_input.params == "complex":
        p = Parameter(torch.zeros(4, dtype=torch.complex64))
        p.grad = torch.ones_like(p)
    else:
        p = Parameter(torch.zeros(4))
        p.grad = torch.ones(4)
    with pytest.raises(error_input.error_type, match=re.escape(error_input.error_regex)):
        optimizer = TrainableOptimizer([p], **optim_input.kwargs)
        assert error_input.error_on == OptimizerErrorEnum.STEP_ERROR, "construction should have raised"
        optimizer.step()


@ALL_INPUTS
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "non-contiguous"])
@pytest.mark.parametrize("with_lrsched", [False, True], ids=["", "with-lrsched"])
def test_forloop_goes_right_direction(optim_input, contiguous, with_lrsched):
    weight, bias, x = _linear(contiguous=contiguous)
    optimizer = TrainableOptimizer([weight, bias], **_kwargs(optim_input))
    schedulers = [s(optimizer) for s in TO_INFO.scheduler_inputs[0]] if with_lrsched else []
    closure = _closure(optimizer, weight, bias, x)
    initial = closure().item()
    for _ in range(20):
        loss = closure()
        optimizer.step()
        for scheduler in schedulers:
            scheduler.step(loss.detach()) if isinstance(scheduler, ReduceLROnPlateau) else scheduler.step()
    assert closure().item() < initial


@ALL_INPUTS
def test_param_group_with_lrscheduler_goes_right_direction(optim_input):
    weight, bias, x = _linear()
    kwargs = _kwargs(optim_input)
    optimizer = TrainableOptimizer([{"params": [weight]}, {"params": [bias], "lr": 0.01}], **kwargs)
    scheduler = StepLR(optimizer, gamma=0.9, step_size=5)
    closure = _closure(optimizer, weight, bias, x)
    initial = closure().item()
    for _ in range(20):
        closure()
        optimizer.step()
        scheduler.step()
    assert closure().item() < initial


@ALL_INPUTS
def test_param_groups_weight_decay(optim_input):
    weight, bias, x = _linear()
    kwargs = _kwargs(optim_input)
    weight_kwargs, bias_kwargs = dict(kwargs), dict(kwargs)
    bias_kwargs["weight_decay"] = 0.0
    weight_kwargs.setdefault("weight_decay", 0.01)
    optimizer = TrainableOptimizer([{"params": [weight], **weight_kwargs}, {"params": [bias], **bias_kwargs}])
    closure = _closure(optimizer, weight, bias, x)
    initial = closure().item()
    for _ in range(20):
        closure()
        optimizer.step()
    assert closure().item() < initial


@ALL_INPUTS
def test_param_groups_lr(optim_input):
    weight, bias, x = _linear()
    kwargs = _kwargs(optim_input)
    kwargs.setdefault("lr", 0.01)
    optimizer = TrainableOptimizer([{"params": [weight]}, {"params": [bias], "lr": 0.02}], **kwargs)
    closure = _closure(optimizer, weight, bias, x)
    initial = closure().item()
    for _ in range(20):
        closure()
        optimizer.step()
    assert closure().item() < initial


@ALL_INPUTS
def test_tensor_lr(optim_input):
    """A Tensor lr steps exactly as the same float lr."""
    kwargs = _kwargs(optim_input)
    lr = float(kwargs.pop("lr", 1e-3))
    runs = []
    for as_tensor in (False, True):
        weight, bias, x = _linear()
        optimizer = TrainableOptimizer([weight, bias], lr=torch.tensor(lr) if as_tensor else lr, **kwargs)
        closure = _closure(optimizer, weight, bias, x)
        for _ in range(5):
            closure()
            optimizer.step()
        runs.append((weight.detach(), bias.detach()))
    for a, b in zip(*runs):
        _equal(a, b)


FUSED_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
FUSED_TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float64: dict(rtol=1e-7, atol=1e-7),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-3),
    torch.float16: dict(rtol=2**-10, atol=1e-4),
}


@pytest.mark.parametrize("dtype", FUSED_DTYPES, ids=str)
@BASE_INPUTS
def test_fused_matches_forloop(optim_input, dtype):
    """fused=True (the C kernel on a CPU; float64: the fused torch kernels) steps as fused=False,
    over tensors of many sizes (empty, one element, odd, across the kernel's 2048 blocks) and a
    tensor whose gradient comes and goes."""
    shapes = [(2, 3), (3,), (1,), (0,), (17, 5), (2049,), (5000,)]
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    runs = []
    for fused in (False, True):
        params = [Parameter(w.clone()) for w in init]
        optimizer = TrainableOptimizer(params, fused=fused, **_kwargs(optim_input))
        gen = torch.Generator().manual_seed(1)
        for step in range(8):
            for i, p in enumerate(params):
                g = torch.randn(p.shape, generator=gen).to(dtype)
                p.grad = None if (i == 1 and step % 3 == 2) else g
            optimizer.step()
        runs.append((params, optimizer))
    (slow, opt_slow), (fast, opt_fast) = runs
    for ps, pf in zip(slow, fast):
        torch.testing.assert_close(pf.detach().float(), ps.detach().float(), **FUSED_TOLERANCE[dtype])
        assert opt_fast.state[pf]["step"] == opt_slow.state[ps]["step"]
        if dtype in (torch.float32, torch.float64):
            for key, value in opt_slow.state[ps].items():
                torch.testing.assert_close(opt_fast.state[pf][key], value, rtol=1e-4, atol=1e-5, msg=key)


@ALL_INPUTS
def test_step_is_noop_when_params_have_no_grad(optim_input):
    params = [torch.randn(2, 3, requires_grad=False) for _ in range(2)]
    old = [p.clone() for p in params]
    optimizer = TrainableOptimizer(params, **_kwargs(optim_input))
    optimizer.step(lambda: torch.tensor([1.0]))
    for p, q in zip(params, old):
        _equal(p, q)


@ALL_INPUTS
def test_step_is_noop_for_zero_grads(optim_input):
    kwargs = _kwargs(optim_input)
    if kwargs.get("weight_decay", 0) != 0:
        pytest.skip("weights decay whatever the gradient (upstream skips these configurations too)")
    param = Parameter(torch.randn(5, 1))
    old = param.detach().clone()
    optimizer = TrainableOptimizer([param], **kwargs)
    for _ in range(3):
        param.grad = torch.zeros_like(param)
        optimizer.step(lambda: torch.tensor([1.0]))
    _equal(param.detach(), old)


@BASE_INPUTS
def test_optimizer_can_be_printed(optim_input):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    optimizer = TrainableOptimizer(params, **optim_input.kwargs)
    text = repr(optimizer)
    assert text.startswith("TrainableOptimizer (")
    for key in optimizer.defaults:
        assert key in text


@ALL_INPUTS
def test_state_dict_deterministic(optim_input):
    weight, bias, x = _linear()
    optimizer = TrainableOptimizer([weight, bias], **_kwargs(optim_input))
    closure = _closure(optimizer, weight, bias, x)
    for _ in range(10):
        optimizer.step(closure)
    weight_c, bias_c = Parameter(weight.detach().clone()), Parameter(bias.detach().clone())
    optimizer_c = TrainableOptimizer([weight_c, bias_c], **_kwargs(optim_input))
    closure_c = _closure(optimizer_c, weight_c, bias_c, x)
    state_dict = copy.deepcopy(optimizer.state_dict())
    state_dict_c = copy.deepcopy(optimizer.state_dict())
    optimizer_c.load_state_dict(state_dict_c)
    for _ in range(10):
        optimizer.step(closure)
        optimizer_c.step(closure_c)
        _equal(weight, weight_c)
        _equal(bias, bias_c)
    # Loading did not modify the dict, and equal (not identical) parameters give equal dicts.
    _same(state_dict, state_dict_c)
    _same(optimizer.state_dict(), optimizer_c.state_dict())
    # Repeated parameter groups have identical representations.
    optimizer_c.param_groups.extend(optimizer_c.param_groups)
    assert repr(optimizer.state_dict()["param_groups"][-1]) == repr(optimizer_c.state_dict()["param_groups"][-1])


@ALL_INPUTS
def test_can_load_older_state_dict(optim_input):
    """A checkpoint written before the group keys of ``not_og_supported_flags`` existed."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    x = torch.randn(6, 4)
    optimizer = TrainableOptimizer(model.parameters(), **_kwargs(optim_input))
    for _ in range(3):
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()
    state_dict = copy.deepcopy(optimizer.state_dict())
    for group in state_dict["param_groups"]:
        for flag in TO_INFO.not_og_supported_flags:
            group.pop(flag, None)
    old = TrainableOptimizer(model.parameters(), **_kwargs(optim_input))
    old.load_state_dict(state_dict)
    old.zero_grad()
    model(x).sum().backward()
    old.step()
    for group in old.param_groups:
        assert set(TO_INFO.not_og_supported_flags) <= set(group)


@ALL_INPUTS
def test_save_load_equality_with_weights_only(optim_input):
    weight, bias, x = _linear()
    optimizer = TrainableOptimizer([weight, bias], **_kwargs(optim_input))
    closure = _closure(optimizer, weight, bias, x)
    for _ in range(3):
        optimizer.step(closure)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    _same(loaded, optimizer.state_dict())
    weight_c, bias_c = Parameter(weight.detach().clone()), Parameter(bias.detach().clone())
    optimizer_c = TrainableOptimizer([weight_c, bias_c], **_kwargs(optim_input))
    optimizer_c.load_state_dict(loaded)
    closure_c = _closure(optimizer_c, weight_c, bias_c, x)
    for _ in range(3):
        optimizer.step(closure)
        optimizer_c.step(closure_c)
    _equal(weight, weight_c)
    _equal(bias, bias_c)


@ALL_INPUTS
def test_load_nontensor_step(optim_input):
    """A state dict whose ``step`` is a Python number (older or converted checkpoints)."""
    weight, bias, x = _linear()
    optimizer = TrainableOptimizer([weight, bias], **_kwargs(optim_input))
    closure = _closure(optimizer, weight, bias, x)
    for _ in range(3):
        optimizer.step(closure)
    state_dict = copy.deepcopy(optimizer.state_dict())
    for state in state_dict["state"].values():
        state["step"] = state["step"].item()
    optimizer.load_state_dict(state_dict)
    optimizer.step(closure)
    for state in optimizer.state.values():
        assert torch.is_tensor(state["step"]) and state["step"] == 4


@BASE_INPUTS
def test_deepcopy_copies_all_public_attrs(optim_input):
    weight, bias, x = _linear()
    optimizer = TrainableOptimizer([weight, bias], diagnostics=True, **optim_input.kwargs)
    optimizer.step(_closure(optimizer, weight, bias, x))

    def public(obj):
        return {k for k in obj.__dict__ if not k.startswith("_")}

    clone = copy.deepcopy(optimizer)
    assert public(optimizer) == public(clone)
    assert clone.track_diagnostics  # and the switch keeps its value (issue 14, defect 6)


@BASE_INPUTS
def test_non_empty_state(optim_input):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    model(torch.randn(3, 2)).sum().backward()
    optimizer = TrainableOptimizer(model.parameters(), **optim_input.kwargs)
    optimizer.step()
    assert len(optimizer.state) == 2
    for state in optimizer.state.values():
        assert len(state) > 0


# -- hooks (the base class's machinery, through TrainableOptimizer) -------------------------


def _hooked_optimizer():
    p = Parameter(torch.randn(3))
    optimizer = TrainableOptimizer([p], lr=0.01)
    p.grad = torch.ones(3)
    return optimizer


def test_step_pre_hook():
    optimizer, seen = _hooked_optimizer(), []
    handle = optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(len(opt.state)))
    optimizer.step()
    optimizer.step()
    handle.remove()
    optimizer.step()
    assert seen == [0, 1]  # before the first step there was no state


def test_step_post_hook():
    optimizer, seen = _hooked_optimizer(), []
    handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: seen.append(len(opt.state)))
    optimizer.step()
    optimizer.step()
    handle.remove()
    optimizer.step()
    assert seen == [1, 1]


def test_step_all_hooks():
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    optimizer, order = _hooked_optimizer(), []
    handles = [
        register_optimizer_step_pre_hook(lambda *a: order.append("global pre")),
        optimizer.register_step_pre_hook(lambda *a: order.append("pre")),
        optimizer.register_step_post_hook(lambda *a: order.append("post")),
        register_optimizer_step_post_hook(lambda *a: order.append("global post")),
    ]
    try:
        optimizer.step()
    finally:
        for handle in handles:
            handle.remove()
    assert order == ["global pre", "pre", "post", "global post"]


def test_state_dict_pre_hook():
    optimizer = _hooked_optimizer()
    optimizer.step()
    optimizer.register_state_dict_pre_hook(lambda opt: opt.param_groups[0].__setitem__("lr", 0.5))
    assert optimizer.state_dict()["param_groups"][0]["lr"] == 0.5


def test_state_dict_post_hook():
    optimizer = _hooked_optimizer()
    optimizer.step()

    def post(opt, state_dict):
        state_dict["note"] = "seen"
        return state_dict

    optimizer.register_state_dict_post_hook(post)
    assert optimizer.state_dict()["note"] == "seen"


def test_load_state_dict_pre_hook_and_prepend():
    optimizer = _hooked_optimizer()
    optimizer.step()
    state_dict, order = copy.deepcopy(optimizer.state_dict()), []

    def first(opt, sd):
        order.append("prepended")

    def second(opt, sd):
        order.append("appended")
        sd["param_groups"][0]["lr"] = 0.25
        return sd

    optimizer.register_load_state_dict_pre_hook(second)
    optimizer.register_load_state_dict_pre_hook(first, prepend=True)
    optimizer.load_state_dict(state_dict)
    assert order == ["prepended", "appended"]
    assert optimizer.param_groups[0]["lr"] == 0.25


def test_load_state_dict_post_hook():
    optimizer = _hooked_optimizer()
    optimizer.step()
    seen = []
    optimizer.register_load_state_dict_post_hook(lambda opt: seen.append(float(opt.state_dict()["state"][0]["step"])))
    optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert seen == [1.0]


# -- upstream checks that do not apply here, each with its reason ----------------------------

_CUDA = "CUDA-only upstream (this suite runs on the CPU)"
_NOT_APPLICABLE = {
    "test_complex": "complex parameters are refused (view them as real): supports_complex=False",
    "test_complex_2d": "complex parameters are refused (view them as real): supports_complex=False",
    "test_rosenbrock_sparse": "sparse gradients are refused: supports_sparse=False",
    "test_foreach_matches_forloop": "no foreach implementation (supported_impls=('fused',))",
    "test_set_default_dtype_works_with_foreach": "no foreach implementation",
    "test_peak_memory_foreach": f"no foreach implementation; {_CUDA}",
    "test_defaults_changed_to_foreach": f"no foreach implementation; {_CUDA}",
    "test_differentiable": "no differentiable implementation",
    "test_fused_does_not_step_if_foundinf": "no grad_scale/found_inf step arguments (GradScaler unscales first)",
    "test_grad_scaling_autocast_fused_optimizers": f"no grad_scale/found_inf step arguments; {_CUDA}",
    "test_foreach_large_tensor": _CUDA,
    "test_fused_large_tensor": _CUDA,
    "test_fused_cpu_matches_cuda": _CUDA,
    "test_forloop_goes_right_direction_multigpu": f"{_CUDA}, two GPUs",
    "test_state_dict_with_cuda_params": _CUDA,
    "test_mixed_device_dtype": _CUDA,
    "test_cpu_load_state_dict": _CUDA,
}


@pytest.mark.parametrize("name", sorted(_NOT_APPLICABLE))
def test_upstream_check_not_applicable(name):
    pytest.skip(f"{name}: {_NOT_APPLICABLE[name]}")


def test_fused_runs_the_native_kernel_on_this_cpu(monkeypatch):
    """The fused=True half of this suite exercises the C kernel where it can be built."""
    if not native.available():
        pytest.skip("no C compiler: fused=True runs the torch kernels here")
    calls = []
    real = native.native_step
    monkeypatch.setattr(native, "native_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    weight, bias, x = _linear()
    optimizer = TrainableOptimizer([weight, bias], fused=True)
    for _ in range(3):
        optimizer.step(_closure(optimizer, weight, bias, x))
    assert len(calls) == 3  # every step, the first included
