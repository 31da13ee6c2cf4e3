"""TrainableOptimizer behaves like every torch.optim optimizer in the corners users hit."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from hf_to import ESTIMATORS, TrainableOptimizer
from hf_to.registry import PAPER_LITERAL


def tiny_model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).to(dtype)


def train_steps(model, opt, steps, seed=0, dtype=None):
    gen = torch.Generator().manual_seed(seed)
    dtype = dtype or next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(8, 6, generator=gen).to(dtype)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


@pytest.fixture(params=sorted(ESTIMATORS))
def estimator(request):
    return request.param


def test_is_a_torch_optimizer():
    assert issubclass(TrainableOptimizer, torch.optim.Optimizer)


def test_param_groups_with_different_lr_and_weight_decay(estimator):
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = TrainableOptimizer(
        [{"params": [a], "lr": 0.1, "weight_decay": 0.5}, {"params": [b], "lr": 0.0}], estimator=estimator
    )
    a.grad, b.grad = torch.zeros(3), torch.zeros(3)
    opt.step()
    torch.testing.assert_close(a.detach(), torch.full((3,), 1 - 0.1 * 0.5))
    torch.testing.assert_close(b.detach(), torch.ones(3), rtol=0, atol=0)


def test_step_with_closure_returns_the_loss(estimator):
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = TrainableOptimizer([p], estimator=estimator)

    def closure():
        opt.zero_grad()
        loss = p.pow(2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert float(loss.detach()) == 5.0
    assert not torch.equal(p.detach(), torch.tensor([1.0, 2.0]))


def test_parameter_without_gradient_is_skipped_and_untouched(estimator):
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    before = b.detach().clone()
    opt = TrainableOptimizer([a, b], estimator=estimator, weight_decay=0.1)
    a.grad = torch.randn(4)
    opt.step()
    assert torch.equal(b.detach(), before)
    assert b not in opt.state or not opt.state[b]


def test_add_param_group_trains_the_new_group(estimator):
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    opt = TrainableOptimizer([a], estimator=estimator)
    opt.add_param_group({"params": [b], "lr": 0.5})
    assert opt.param_groups[1]["estimator"] == estimator and opt.param_groups[1]["lr"] == 0.5
    before = b.detach().clone()
    a.grad, b.grad = torch.randn(4), torch.randn(4)
    opt.step()
    assert not torch.equal(b.detach(), before)


def test_deepcopy_gives_an_independent_optimizer_on_the_same_trajectory(estimator):
    model = tiny_model()
    opt = TrainableOptimizer(model.parameters(), estimator=estimator, lr=0.01)
    train_steps(model, opt, 3)
    model2 = copy.deepcopy(model)
    opt2 = TrainableOptimizer(model2.parameters(), estimator=estimator, lr=0.01)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt_copy = copy.deepcopy(opt)
    assert opt_copy.state is not opt.state
    train_steps(model, opt, 3, seed=1)
    train_steps(model2, opt2, 3, seed=1)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_lr_set_in_param_groups_takes_effect(estimator):
    p = torch.nn.Parameter(torch.ones(3))
    opt = TrainableOptimizer([p], estimator=estimator, lr=1.0, preconditioner="none")
    opt.param_groups[0]["lr"] = 0.0
    p.grad = torch.ones(3)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3))


def test_lambda_lr_scheduler_scales_the_step(estimator):
    def run(factor):
        p = torch.nn.Parameter(torch.ones(3))
        opt = TrainableOptimizer([p], estimator=estimator, lr=0.1, preconditioner="none")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: factor)
        p.grad = torch.ones(3)
        opt.step()
        sched.step()
        return 1 - p.detach()

    torch.testing.assert_close(run(0.5), 0.5 * run(1.0))


def _roundtrip(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_roundtrip_continues_bit_identically(estimator, dtype):
    model = tiny_model(dtype)
    opt = TrainableOptimizer(model.parameters(), estimator=estimator, lr=0.01, weight_decay=0.01)
    train_steps(model, opt, 4)
    model2 = copy.deepcopy(model)
    opt2 = TrainableOptimizer(model2.parameters(), estimator=estimator, lr=0.01, weight_decay=0.01)
    opt2.load_state_dict(_roundtrip(opt.state_dict()))
    for p in model2.parameters():
        for key, value in opt2.state[p].items():
            if key == "step":
                assert value.dtype == torch.float32 and value.dim() == 0
            else:
                assert value.dtype == torch.float32, (key, value.dtype)
    train_steps(model, opt, 4, seed=1)
    train_steps(model2, opt2, 4, seed=1)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_loading_another_estimators_checkpoint_raises():
    p = torch.nn.Parameter(torch.randn(3))
    opt = TrainableOptimizer([p], estimator="rank_one")
    p.grad = torch.randn(3)
    opt.step()
    other = TrainableOptimizer([p], estimator="none")  # chosen, not the default: must match
    with pytest.raises(ValueError, match="estimator='rank_one'"):
        other.load_state_dict(opt.state_dict())


def test_loading_another_optimizers_checkpoint_raises():
    p = torch.nn.Parameter(torch.randn(3))
    adam = torch.optim.AdamW([p])
    p.grad = torch.randn(3)
    adam.step()
    with pytest.raises(ValueError, match="not written by TrainableOptimizer"):
        TrainableOptimizer([p]).load_state_dict(adam.state_dict())


def test_step_is_a_0d_float32_tensor_and_every_state_key_exists_after_the_first_step(estimator):
    for form in ({}, PAPER_LITERAL):
        p = torch.nn.Parameter(torch.randn(3, 2))
        opt = TrainableOptimizer([p], estimator=estimator, **form)
        p.grad = torch.randn(3, 2)
        opt.step()
        state = opt.state[p]
        assert state["step"].dtype == torch.float32 and state["step"].dim() == 0 and float(state["step"]) == 1
        expected = {"step", "b", *ESTIMATORS[estimator].slope_keys}
        if form.get("preconditioner", "adam") == "adam":
            expected.add("exp_avg_sq")
        assert set(state) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_zero_gradient_and_zero_lr_leave_parameters_bit_unchanged(estimator, dtype):
    model = tiny_model(dtype)
    opt = TrainableOptimizer(model.parameters(), estimator=estimator, lr=0.01, weight_decay=0.1)
    train_steps(model, opt, 2)
    before = [p.detach().clone() for p in model.parameters()]
    for group in opt.param_groups:
        group["lr"] = 0.0
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)


@pytest.mark.parametrize(
    ("dtype", "state_dtype"),
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_state_dtype_is_float32_for_low_precision_and_float64_for_double(estimator, dtype, state_dtype):
    model = tiny_model(dtype)
    opt = TrainableOptimizer(model.parameters(), estimator=estimator, lr=0.01)
    first = model(torch.randn(4, 6).to(dtype)).pow(2).mean().item()
    train_steps(model, opt, 10)
    assert math.isfinite(model(torch.randn(4, 6).to(dtype)).pow(2).mean().item())
    assert first >= 0
    for p in model.parameters():
        for key, value in opt.state[p].items():
            if key != "step":
                assert value.dtype == state_dtype


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(6, 4).t(),  # non-contiguous
        lambda: torch.tensor(0.7),  # 0-d
        lambda: torch.randn(1),
        lambda: torch.randn(10007),  # large and odd
    ],
    ids=["non_contiguous", "zero_dim", "shape_1", "odd_10007"],
)
def test_unusual_shapes_match_a_contiguous_copy(estimator, make):
    if estimator == "full" and make().numel() > 4096:
        pytest.skip("the full estimator refuses tensors above max_full_numel (tested separately)")
    data = make()
    p = torch.nn.Parameter(data)
    q = torch.nn.Parameter(data.contiguous().clone())
    opt_p = TrainableOptimizer([p], estimator=estimator, lr=0.01)
    opt_q = TrainableOptimizer([q], estimator=estimator, lr=0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        g = torch.randn(data.shape, generator=gen)
        p.grad = g.clone() if data.is_contiguous() else g.t().contiguous().t()
        q.grad = g.clone()
        opt_p.step()
        opt_q.step()
    assert p.shape == data.shape
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


def test_complex_parameters_raise_a_clear_error():
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    p.grad = torch.randn(3, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="complex"):
        TrainableOptimizer([p]).step()


def test_sparse_gradients_raise_a_clear_error():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        TrainableOptimizer(emb.parameters()).step()


BAD_HYPERPARAMETERS = [
    ({"lr": -1.0}, "Invalid lr: -1.0"),
    ({"lr": float("nan")}, "Invalid lr: nan"),
    ({"alpha": -0.1}, "Invalid alpha: -0.1"),
    ({"beta": 0.0}, "Invalid beta: 0.0"),
    ({"beta": 1.5}, "Invalid beta: 1.5"),
    ({"beta2": 1.0}, "Invalid beta2: 1.0"),
    ({"eps": -1e-8}, "Invalid eps: -1e-08"),
    ({"eps": 0.0}, "Invalid eps: 0"),
    ({"weight_decay": -0.01}, "Invalid weight_decay: -0.01"),
    ({"estimator": "dense"}, "Invalid estimator: 'dense'"),
    ({"preconditioner": "rmsprop"}, "Invalid preconditioner: 'rmsprop'"),
    ({"alpha_scaling": "max"}, "Invalid alpha_scaling: 'max'"),
    ({"norm_floor": -1.0}, "Invalid norm_floor: -1.0"),
    ({"intercept_init": "random"}, "Invalid intercept_init: 'random'"),
    ({"max_full_numel": 0}, "Invalid max_full_numel: 0"),
    ({"max_full_numel": 1.5}, "Invalid max_full_numel: 1.5"),
    ({"nesterov": 1.5}, "Invalid nesterov: 1.5"),
    ({"nesterov": -0.1}, "Invalid nesterov: -0.1"),
    ({"nesterov": "yes"}, "Invalid nesterov: 'yes'"),
]


@pytest.mark.parametrize(
    ("kwargs", "message"), BAD_HYPERPARAMETERS, ids=[next(iter(k)) for k, _ in BAD_HYPERPARAMETERS]
)
def test_invalid_hyperparameter_raises_value_error_naming_it(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainableOptimizer([torch.nn.Parameter(torch.randn(2))], **kwargs)


def test_invalid_hyperparameter_in_a_later_group_is_refused_and_not_added():
    opt = TrainableOptimizer([torch.nn.Parameter(torch.randn(2))])
    with pytest.raises(ValueError, match="Invalid beta: 2"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "beta": 2})
    assert len(opt.param_groups) == 1


def test_full_estimator_refuses_a_large_tensor_naming_shape_and_memory():
    big = torch.nn.Parameter(torch.randn(128, 64))
    with pytest.raises(ValueError, match=r"shape \(128, 64\).*8192x8192.*0.25 GiB.*max_full_numel=4096"):
        TrainableOptimizer([big], estimator="full")
    TrainableOptimizer([big], estimator="full", max_full_numel=8192)  # allowed when raised


def test_non_finite_gradient_entries_are_masked_or_skip_the_tensor_and_are_counted(estimator):
    """The coordinate-wise forms (diagonal, folded, none) keep only the bad entries; rank_one/full
    skip the whole tensor."""
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    opt = TrainableOptimizer([a, b], estimator=estimator, diagnostics=True, weight_decay=0.1)
    a.grad, b.grad = torch.randn(4), torch.randn(4)
    opt.step()
    state_before = {k: v.clone() for k, v in opt.state[a].items()}
    a_before, b_before = a.detach().clone(), b.detach().clone()
    a.grad = torch.tensor([1.0, float("nan"), 0.0, float("inf")])
    b.grad = torch.randn(4)
    opt.step()
    assert not torch.equal(b.detach(), b_before)
    bad = torch.tensor([False, True, False, True])
    if estimator in ("diagonal", "folded", "none"):
        assert torch.equal(a.detach()[bad], a_before[bad])
        assert (a.detach()[~bad] != a_before[~bad]).all()
        assert opt.state[a]["step"].item() == 2
        for key, value in opt.state[a].items():
            if key != "step":
                assert torch.equal(value[bad], state_before[key][bad]), key
                assert not torch.equal(value, state_before[key]), key
    else:
        assert torch.equal(a.detach(), a_before)
        for key, value in opt.state[a].items():
            assert torch.equal(value, state_before[key]), key
    diag = opt.diagnostics()[0]
    assert diag["skipped"] == 1 and diag["steps"] == 2
    assert math.isfinite(diag["residual_sq"]) and math.isfinite(diag["estimate_sq"])


def test_gradient_non_finite_in_every_entry_skips_the_tensor(estimator):
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    opt = TrainableOptimizer([a, b], estimator=estimator, diagnostics=True, weight_decay=0.1)
    a.grad, b.grad = torch.randn(4), torch.randn(4)
    opt.step()
    state_before = {k: v.clone() for k, v in opt.state[a].items()}
    a_before = a.detach().clone()
    a.grad = torch.tensor([float("nan"), float("inf"), -float("inf"), float("nan")])
    b.grad = torch.randn(4)
    opt.step()
    assert torch.equal(a.detach(), a_before)
    for key, value in opt.state[a].items():
        assert torch.equal(value, state_before[key]), key
    assert opt.state[a]["step"].item() == 1 and opt.state[b]["step"].item() == 2
    diag = opt.diagnostics()[0]
    assert diag["skipped"] == 1 and diag["steps"] == 2


@pytest.mark.parametrize("form", ["paper", "default"])
def test_state_size_per_parameter_is_as_documented(estimator, form):
    n = 12
    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = TrainableOptimizer([p], estimator=estimator, **(PAPER_LITERAL if form == "paper" else {}))
    p.grad = torch.randn(3, 4)
    opt.step()
    slope = {"full": n * n, "diagonal": n, "rank_one": 2 * n, "none": 0, "folded": 0}[estimator]
    expected = slope + n + (n if form == "default" else 0) + 1  # + b, + exp_avg_sq, + step
    saved = opt.state_dict()["state"][0]
    assert sum(v.numel() for v in saved.values()) == expected
    assert opt.state_bytes() == 4 * expected


def test_diagnostics_are_empty_when_off_and_report_health_when_on(estimator):
    p = torch.nn.Parameter(torch.randn(8))
    opt = TrainableOptimizer([p], estimator=estimator)
    p.grad = torch.randn(8)
    opt.step()
    assert opt.diagnostics() == [] and opt._diag == []
    opt.track_diagnostics = True
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        p.grad = p.detach() + 0.1 * torch.randn(8, generator=gen)
        opt.step()
    (d,) = opt.diagnostics()
    assert d["steps"] == 30 and d["skipped"] == 0
    assert set(d) == {"steps", "residual_sq", "grad_sq", "estimate_sq", "skipped", "relative_residual"}
    assert 0 < d["relative_residual"] < 1
    assert opt.diagnostics()[0]["steps"] == 0, "reading resets the counters"
