"""Regression tests of the defects of issue 14, one property per test.

Each test failed on the code before the fix (commit 2f9ae47); the issue gives the
reproductions.  The native kernel's own properties are pinned in test_native.py and fuzzed in
test_native_fuzz.py; these are the ones a user reaches through the optimizer's public API.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from hf_to import TrainableOptimizer, native

needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler: hf_to.native cannot be built")
PATHS = [pytest.param(None, id="native", marks=needs_native), pytest.param(False, id="readable")]


@pytest.fixture(autouse=True)
def _native_on(monkeypatch):
    monkeypatch.delenv("HF_TO_NATIVE", raising=False)


def _stepped(params, steps=3, seed=0, **kwargs) -> TrainableOptimizer:
    opt = TrainableOptimizer(params, lr=1e-2, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()
    return opt


# -- 1. the native kernel never reaches past a tensor ---------------------------------------


@needs_native
def test_parameter_shrunk_through_data_is_refused_not_read_past_its_end():
    """``p.data = p.data[:10]`` keeps the data pointer and version counter: the kernel used to
    read 4096 gradient entries (and could write 4096 weights) of a 10-element tensor."""
    p = torch.nn.Parameter(torch.randn(4096))
    opt = _stepped([p], estimator="rank_one")
    p.data = p.data[:10]
    p.grad = torch.randn(10)
    with pytest.raises(RuntimeError, match="does not fit its parameter"):
        opt.step()


@needs_native
@pytest.mark.parametrize("key", ["b", "a", "exp_avg_sq"])
def test_state_shrunk_through_data_is_refused(key):
    p = torch.nn.Parameter(torch.randn(3000))
    opt = _stepped([p], estimator="diagonal")  # a slope tensor "a" beside b and exp_avg_sq
    state = opt.state[p][key]
    state.data = state.data[:7]
    p.grad = torch.randn(3000)
    with pytest.raises(RuntimeError, match=f"'{key}'.*does not fit"):
        opt.step()


@needs_native
def test_step_count_emptied_through_data_is_refused():
    p = torch.nn.Parameter(torch.randn(100))
    opt = _stepped([p])
    opt.state[p]["step"].data = torch.empty(0)
    p.grad = torch.randn(100)
    with pytest.raises(RuntimeError, match="step count"):
        opt.step()


@needs_native
def test_parameter_whose_storage_was_freed_is_refused():
    """FSDP-style ``untyped_storage().resize_(0)``: same shape, no memory behind it."""
    p = torch.nn.Parameter(torch.randn(5000))
    opt = _stepped([p])
    p.grad = torch.randn(5000)
    p.data.untyped_storage().resize_(0)
    with pytest.raises(RuntimeError, match="reaches past its storage"):
        opt.step()


@needs_native
def test_state_of_another_dtype_is_refused():
    """Only ``b``'s dtype was checked: a bfloat16 ``exp_avg_sq`` beside float32 ``b`` was read as
    float32, twice its length."""
    p = torch.nn.Parameter(torch.randn(4096))
    opt = _stepped([p])
    opt.state[p]["exp_avg_sq"] = opt.state[p]["exp_avg_sq"].to(torch.bfloat16)
    p.grad = torch.randn(4096)
    with pytest.raises(RuntimeError, match="exp_avg_sq"):
        opt.step()


@needs_native
def test_state_made_non_contiguous_through_data_is_refused():
    p = torch.nn.Parameter(torch.randn(64, 64))
    opt = _stepped([p])
    b = opt.state[p]["b"]
    b.data = b.data.t()  # same pointer, same byte size, other layout
    p.grad = torch.randn(64, 64)
    with pytest.raises(RuntimeError, match="not contiguous"):
        opt.step()


# -- 2. the second moment of a huge gradient ------------------------------------------------


@pytest.mark.parametrize("fused", PATHS)
def test_one_huge_gradient_leaves_the_second_moment_finite(fused):
    """(1-β₂)·g first, then ·g: g·g alone overflows float32 for |g| ≳ 1.8e19."""
    p = torch.nn.Parameter(torch.ones(8))
    opt = _stepped([p], fused=fused)
    p.grad = torch.ones(8)
    p.grad[0] = 1e20
    opt.step()
    before = p.detach().clone()
    for _ in range(100):
        p.grad = torch.ones(8)
        opt.step()
    v = opt.state[p]["exp_avg_sq"]
    assert torch.isfinite(v).all(), v
    assert p[0] != before[0]


@needs_native
def test_the_second_moment_of_a_spike_matches_the_readable_path():
    """Same order and the same rounded 1 - β₂ as the readable path (1 - 0.999f in float32 is
    1.3e-5 away), so both reach the overflow of v / (1 - β₂ᵗ) on the same entries."""
    w = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    runs = []
    for fused in (None, False):
        p = torch.nn.Parameter(w.clone())
        opt = _stepped([p], fused=fused)
        p.grad = torch.randn(5000, generator=torch.Generator().manual_seed(1)) * 3e19
        opt.step()
        runs.append((p.detach(), opt.state[p]["exp_avg_sq"]))
    (p_fast, v_fast), (p_slow, v_slow) = runs
    torch.testing.assert_close(v_fast, v_slow, rtol=1e-6, atol=0)
    torch.testing.assert_close(p_fast, p_slow, rtol=1e-5, atol=1e-5)


# -- 3. float64 parameters with a narrower state_dtype -------------------------------------


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_float64_parameters_refuse_a_narrower_state_dtype(state_dtype):
    p = torch.nn.Parameter(torch.tensor([1 + 1e-10, 0.1], dtype=torch.float64))
    with pytest.raises(ValueError, match="Invalid state_dtype"):
        TrainableOptimizer([p], lr=0.0, state_dtype=state_dtype)


def test_parameters_made_float64_after_construction_refuse_a_float32_state():
    model = torch.nn.Linear(3, 1)
    opt = TrainableOptimizer(model.parameters(), lr=0.0, state_dtype=torch.float32)
    model.double()
    model(torch.randn(2, 3, dtype=torch.float64)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="Invalid state_dtype"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_float32_state_loaded_into_float64_parameters_is_widened_and_keeps_the_weights_exact():
    w32 = torch.nn.Parameter(torch.tensor([1.0, 0.1]))
    saved = _stepped([w32], steps=2).state_dict()
    p = torch.nn.Parameter(torch.tensor([1 + 1e-10, 0.1], dtype=torch.float64))
    opt = TrainableOptimizer([p], lr=0.0)
    opt.load_state_dict(saved)
    opt.param_groups[0]["lr"] = 0.0  # the loaded groups carry the saved lr
    assert opt.state[p]["b"].dtype == torch.float64
    w0 = p.detach().clone()
    for _ in range(2):
        p.grad = torch.ones(2, dtype=torch.float64)
        opt.step()
    assert torch.equal(p.detach(), w0)


# -- 4. gradient_estimate of a foreign tensor -----------------------------------------------


def test_gradient_estimate_of_a_foreign_tensor_raises_and_leaves_the_state_alone():
    p = torch.nn.Parameter(torch.randn(5))
    opt = _stepped([p])
    with pytest.raises(ValueError, match="not a parameter of this optimizer"):
        opt.gradient_estimate(torch.nn.Parameter(torch.randn(5)))
    assert len(opt.state) == 1
    opt.state_dict()  # raised KeyError after the empty entry was inserted


# -- 5. loading a live state dict -----------------------------------------------------------


@pytest.mark.parametrize("fused", PATHS)
def test_loaded_state_dict_shares_no_tensor_with_its_source(fused):
    p1, p2 = torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(6))
    opt1 = _stepped([p1], fused=fused)
    opt2 = TrainableOptimizer([p2], lr=1e-2, fused=fused)
    opt2.load_state_dict(opt1.state_dict())
    for _ in range(2):
        p1.grad = torch.randn(6)
        opt1.step()
    assert opt1.state[p1]["step"] == 5
    assert opt2.state[p2]["step"] == 3
    for key, value in opt2.state[p2].items():
        assert value.untyped_storage().data_ptr() != opt1.state[p1][key].untyped_storage().data_ptr(), key


# -- 6. diagnostics through copy, pickle and add_param_group ---------------------------------


def test_deepcopy_and_pickle_keep_the_diagnostics():
    p = torch.nn.Parameter(torch.randn(4))
    opt = _stepped([p], diagnostics=True)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.track_diagnostics
        assert clone.diagnostics()[0]["steps"] == 3


def test_add_param_group_keeps_the_accumulated_diagnostics():
    p, q = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    opt = _stepped([p], diagnostics=True)
    opt.add_param_group({"params": [q]})
    for _ in range(1):
        p.grad, q.grad = torch.randn(4), torch.randn(4)
        opt.step()
    first, second = opt.diagnostics()
    assert first["steps"] == 4
    assert second["steps"] == 1


# -- 7. estimator or preconditioner changed under existing state -----------------------------


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize(
    ("key", "value", "named"),
    [("estimator", "rank_one", "'u'"), ("estimator", "none", "'a'"), ("preconditioner", "none", "exp_avg_sq")],
)
def test_changing_the_form_under_existing_state_raises_a_value_error_naming_it(fused, key, value, named):
    p = torch.nn.Parameter(torch.randn(10))
    opt = _stepped([p], fused=fused, estimator="diagonal")
    opt.param_groups[0][key] = value
    p.grad = torch.randn(10)
    w0 = p.detach().clone()
    with pytest.raises(ValueError, match=f"{key}={value!r}.*{named}"):
        opt.step()
    assert torch.equal(p.detach(), w0)
    assert opt.state[p]["step"] == 3


def test_a_new_parameter_group_may_use_another_form():
    p, q = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    opt = _stepped([p])
    opt.add_param_group({"params": [q], "estimator": "rank_one"})
    p.grad, q.grad = torch.randn(4), torch.randn(4)
    opt.step()
    assert set(opt.state[q]) == {"step", "b", "u", "v", "exp_avg_sq"}


# -- 8. a step count saved as a Python number ------------------------------------------------


@pytest.mark.parametrize("fused", PATHS)
def test_a_float_step_in_a_state_dict_is_loaded_as_a_tensor(fused):
    p = torch.nn.Parameter(torch.randn(6))
    opt = _stepped([p], fused=fused)
    saved = copy.deepcopy(opt.state_dict())
    for s in saved["state"].values():
        s["step"] = s["step"].item()
    opt.load_state_dict(saved)
    p.grad = torch.randn(6)
    opt.step()
    step = opt.state[p]["step"]
    assert isinstance(step, torch.Tensor) and step.dtype == torch.float32 and step.device.type == "cpu"
    assert step == 4
