"""The one-pass CPU kernel (hf_to.native) against the reference and the readable path.

These tests build the kernel with the system C compiler (once; it is cached).  Where no
compiler exists they are skipped with that reason; the optimizer then takes its other paths.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from test_fast_paths import FORM_TABLE, FORMS, ODD_SHAPES, TOLERANCE, _grads, _run_pair

from hf_to import StepConfig, TrainableOptimizer, native
from hf_to.settings import env_switch

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: hf_to.native cannot be built")

ESTIMATORS = [name for name, form in FORM_TABLE.items() if "native" in form.kernels]
# Sizes around the kernel's block (2048 elements) and rank-one chunk (2**17) boundaries.
BLOCK_SHAPES = [(2048,), (2048 * 3 + 5,), (4099, 3), (1, 2049), ((1 << 20) + 3,), ((1 << 17) + 1,), (1 << 16,)]


@pytest.fixture(autouse=True)
def _native_on(monkeypatch):
    monkeypatch.delenv("HF_TO_NATIVE", raising=False)


def _calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = native.native_step

    def counting(params, *args, **kwargs):
        calls.append(len(params))
        return real(params, *args, **kwargs)

    monkeypatch.setattr(native, "native_step", counting)
    return calls


def _train(params, steps, *, start=0, **kwargs) -> TrainableOptimizer:
    opt = TrainableOptimizer(params, lr=0.01, **kwargs)
    _steps(opt, params, start, steps)
    return opt


def _steps(opt, params, start, stop) -> None:
    for t in range(start, stop):
        _grads(params, t)
        opt.step()


def _clone(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def _params(shapes, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_native_kernel_equals_reference_over_50_steps(estimator, form, dtype, monkeypatch):
    calls = _calls(monkeypatch)
    fast, ref, opt_fast, opt_ref = _run_pair(
        dtype, {"estimator": estimator, **FORMS[form]}, fast_kwargs={"fused": None}
    )
    assert len(calls) == 50  # every step, the first (which seeds the intercept) included
    for pf, pr in zip(fast, ref):
        assert pf.dtype == dtype
        torch.testing.assert_close(pf.detach().float(), pr.detach().float(), **TOLERANCE[dtype])
    if dtype == torch.float32:
        for pf, pr in zip(fast, ref):
            for key, value in opt_fast.state[pf].items():
                torch.testing.assert_close(value.float(), opt_ref.state[pr][key].float(), **TOLERANCE[dtype], msg=key)


@pytest.mark.parametrize("preconditioner", ["adam", "none"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_native_kernel_equals_readable_path_across_block_boundaries(estimator, preconditioner):
    """Elementwise to a tolerance scaled by each state's largest entry, and no further from
    the float64 run of the readable path than the float32 readable path is.

    Rank-one's states move by sums over up to 2**20 elements (u'w, u'g, ...), which the kernel
    adds in blocks and torch in its own order: on an element near zero the two float32 results
    differ by more than a fixed ``atol`` while both are within float32 rounding of float64."""
    kwargs = dict(estimator=estimator, preconditioner=preconditioner, weight_decay=0.01, diagnostics=True)
    fast, slow, exact = _params(BLOCK_SHAPES), _params(BLOCK_SHAPES), _params(BLOCK_SHAPES, torch.float64)
    opt_fast = _train(fast, 30, **kwargs)
    opt_slow = _train(slow, 30, fused=False, **kwargs)
    opt_exact = _train(exact, 30, fused=False, **kwargs)
    for pf, ps, pe in zip(fast, slow, exact):
        torch.testing.assert_close(pf, ps, **TOLERANCE[torch.float32])
        for key, value in opt_fast.state[pf].items():
            want, best = opt_slow.state[ps][key], opt_exact.state[pe][key].double()
            scale = max(1.0, want.abs().max().item()) if want.is_floating_point() else 1.0
            torch.testing.assert_close(value, want, rtol=1e-4, atol=1e-6 * scale, msg=key)
            if value.is_floating_point() and value.numel() > 1:
                err_fast, err_slow = (value.double() - best).norm(), (want.double() - best).norm()
                assert err_fast <= 2 * err_slow + 1e-9 * best.norm(), (key, err_fast.item(), err_slow.item())
    (got,), (want,) = opt_fast.diagnostics(), opt_slow.diagnostics()
    for key in ("steps", "skipped"):
        assert got[key] == want[key]
    for key in ("residual_sq", "grad_sq", "estimate_sq", "relative_residual"):
        assert got[key] == pytest.approx(want[key], rel=1e-4), key


def test_native_path_is_the_cpu_default_and_can_be_switched_off(monkeypatch):
    calls = _calls(monkeypatch)
    _train(_params(ODD_SHAPES), 3)
    assert calls == [len(ODD_SHAPES)] * 3
    _train(_params(ODD_SHAPES), 3, fused=False)
    monkeypatch.setenv("HF_TO_NATIVE", "0")
    _train(_params(ODD_SHAPES), 3)
    assert calls == [len(ODD_SHAPES)] * 3
    # Not eligible: float64 parameters, the full estimator.
    monkeypatch.delenv("HF_TO_NATIVE")
    _train(_params(ODD_SHAPES, torch.float64), 3)
    _train(_params(ODD_SHAPES), 3, estimator="full")
    assert calls == [len(ODD_SHAPES)] * 3


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_carried_sums_equal_recomputed_sums_bit_for_bit(estimator, monkeypatch):
    """Forgetting the carried sums (as a resumed process does) changes no bit."""
    recomputed = []
    real = native._lib.to_sums
    monkeypatch.setattr(native._lib, "to_sums", lambda ts, k, *rest: recomputed.append(k) or real(ts, k, *rest))
    carried, fresh = _params(BLOCK_SHAPES[:3]), _params(BLOCK_SHAPES[:3])
    opt_c = _train(carried, 8, estimator=estimator)
    opt_f = _train(fresh, 4, estimator=estimator)
    sums_used = estimator != "none"  # none needs no whole-tensor sum
    assert recomputed == [3, 3] if sums_used else recomputed == []  # each optimizer's first native step
    for t in range(4, 8):
        opt_f._native_plans.clear()  # what a resumed process starts from
        _steps(opt_f, fresh, t, t + 1)
    assert len(recomputed) == (6 if sums_used else 0)
    for a, b in zip(carried, fresh):
        assert torch.equal(a, b)
        assert all(torch.equal(opt_c.state[a][k], opt_f.state[b][k]) for k in opt_c.state[a])


def _train_with_threads(threads: int, estimator: str, pdtype: torch.dtype, state_dtype, steps: int = 50, **kwargs):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        params = _params([*BLOCK_SHAPES[:3], (37,)], pdtype)
        opt = _train(params, steps, estimator=estimator, state_dtype=state_dtype, **kwargs)
    finally:
        torch.set_num_threads(before)
    return params, opt


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16], ids=["fp32_state", "bf16_state"])
@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_weights_and_state_do_not_depend_on_the_thread_count(estimator, pdtype, state_dtype, monkeypatch):
    """50 steps, first steps included (no sum whose order depends on the thread count), with 1, 2 and 3 threads."""
    calls = _calls(monkeypatch)
    if pdtype == torch.float16 and not native._lib.to_has_float16():
        pytest.skip("the kernel was built without float16")
    (params, opt), *others = [_train_with_threads(n, estimator, pdtype, state_dtype) for n in (1, 2, 3)]
    assert len(calls) == 150  # every step of every run on the native path
    for other, other_opt in others:
        for p, q in zip(params, other):
            assert torch.equal(p, q)
            assert opt.state[p].keys() == other_opt.state[q].keys()
            assert all(torch.equal(opt.state[p][k], other_opt.state[q][k]) for k in opt.state[p]), estimator


@pytest.mark.parametrize("intercept_init", ["gradient", "zero"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_the_first_step_in_the_kernel_equals_the_readable_first_step(estimator, intercept_init, monkeypatch):
    """The kernel's first step (b_0 = g_0; rank-one's v_0 = w_0/‖w_0‖; with intercept_init='zero'
    and the paper's constant rate a full step from A_0 = 0, b_0 = 0) against fused=False."""
    calls = _calls(monkeypatch)
    kwargs = dict(estimator=estimator, intercept_init=intercept_init, diagnostics=True, weight_decay=0.1)
    if intercept_init == "zero":
        kwargs["beta_warmup"] = False
    fast, slow = _params(BLOCK_SHAPES[:3]), _params(BLOCK_SHAPES[:3])
    opt_fast, opt_slow = _train(fast, 1, **kwargs), _train(slow, 1, fused=False, **kwargs)
    assert calls == [3]
    for pf, ps in zip(fast, slow):
        torch.testing.assert_close(pf, ps, rtol=1e-6, atol=1e-7)
        for key, value in opt_fast.state[pf].items():
            torch.testing.assert_close(value, opt_slow.state[ps][key], rtol=1e-6, atol=1e-7, msg=key)
    (got,), (want,) = opt_fast.diagnostics(), opt_slow.diagnostics()
    for key in ("steps", "skipped", "residual_sq", "grad_sq", "estimate_sq"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-12), key


def test_state_dict_round_trip_continues_bit_for_bit():
    params = _params(BLOCK_SHAPES[:3])
    opt = _train(params, 5)
    saved_params, saved_state = _clone(params), copy.deepcopy(opt.state_dict())
    _steps(opt, params, 5, 10)
    resumed = saved_params
    opt2 = TrainableOptimizer(resumed, lr=0.01)
    opt2.load_state_dict(saved_state)
    _steps(opt2, resumed, 5, 10)
    assert all(torch.equal(a, b) for a, b in zip(params, resumed))


@pytest.mark.parametrize("estimator", ["diagonal", "rank_one", "folded"])
def test_in_place_change_of_the_weights_between_steps_is_noticed(estimator):
    """Carried sums are dropped when PyTorch writes a parameter (its version counter moves)."""
    fast, slow = _params(BLOCK_SHAPES[:3]), _params(BLOCK_SHAPES[:3])
    opt_fast = _train(fast, 4, estimator=estimator)
    opt_slow = _train(slow, 4, estimator=estimator, fused=False)
    with torch.no_grad():
        for p in (*fast, *slow):
            p.mul_(10.0)
    _steps(opt_fast, fast, 4, 8)
    _steps(opt_slow, slow, 4, 8)
    for pf, ps in zip(fast, slow):
        torch.testing.assert_close(pf, ps, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("param_dtype", "state_dtype"),
    [(torch.float32, None), (torch.bfloat16, None), (torch.float16, None), (torch.float32, torch.bfloat16)],
    ids=["fp32", "bf16_params", "fp16_params", "bf16_state"],
)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_nonfinite_entries(estimator, param_dtype, state_dtype, monkeypatch):
    """diagonal/none keep the bits of the entries whose gradient is inf/nan; rank-one skips the tensor."""
    calls = _calls(monkeypatch)
    params = _params([(3000,), (50,)], param_dtype)
    opt = _train(params, 3, estimator=estimator, diagnostics=True, state_dtype=state_dtype)
    assert len(calls) == 3
    opt.diagnostics(reset=True)
    before = [p.detach().clone() for p in params]
    state_before = {k: v.clone() for k, v in opt.state[params[0]].items()}
    _grads(params, 3)
    params[0].grad[[0, 2047, 2999]] = torch.tensor([float("inf"), float("nan"), -float("inf")], dtype=param_dtype)
    opt.step()
    p0, s0 = params[0].detach(), opt.state[params[0]]
    assert not torch.equal(params[1], before[1])  # the other tensor stepped
    assert opt.diagnostics()[0]["skipped"] == 1
    if estimator == "rank_one":
        assert torch.equal(p0, before[0])
        assert all(torch.equal(s0[k], state_before[k]) for k in s0)
        return
    bad = torch.zeros(3000, dtype=torch.bool)
    bad[[0, 2047, 2999]] = True
    assert torch.equal(p0[bad], before[0][bad]) and not torch.equal(p0[~bad], before[0][~bad])
    for k in s0:
        if k != "step":
            assert torch.equal(s0[k][bad], state_before[k][bad]), k
    assert s0["step"] == state_before["step"] + 1
    # Every entry non-finite: nothing moves, not even the step count.
    params[0].grad.fill_(float("nan"))
    params[1].grad = None
    opt.step()
    assert torch.equal(params[0].detach(), p0) and s0["step"] == state_before["step"] + 1


def test_bf16_state_matches_the_readable_path(monkeypatch):
    """Both paths draw the same stochastic-rounding noise: most stored values are the same bits
    (with other noise about half would differ), and all agree to bf16 precision; float32
    arithmetic in another order flips a rare rounding, which the next steps carry on."""
    fast, slow = _params(BLOCK_SHAPES[:3]), _params(BLOCK_SHAPES[:3])
    opt_fast = _train(fast, 20, state_dtype=torch.bfloat16, estimator="diagonal")
    monkeypatch.setenv("HF_TO_NATIVE", "0")
    opt_slow = _train(slow, 20, state_dtype=torch.bfloat16, estimator="diagonal")
    for pf, ps in zip(fast, slow):
        assert opt_fast.state[pf]["b"].dtype == torch.bfloat16
        torch.testing.assert_close(pf, ps, rtol=1e-3, atol=1e-4)
        for key in ("b", "a", "exp_avg_sq"):
            got, want = opt_fast.state[pf][key], opt_slow.state[ps][key]
            assert (got == want).float().mean() > 0.95, key
            torch.testing.assert_close(got.float(), want.float(), rtol=2**-6, atol=1e-3)


def test_a_failed_build_falls_back_to_the_readable_path_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_failed", False)

    def no_compiler():
        raise RuntimeError("no C compiler found (set $CC)")

    monkeypatch.setattr(native, "_build", no_compiler)
    fast, slow = _params(ODD_SHAPES), _params(ODD_SHAPES)
    with caplog.at_level(logging.WARNING, logger="hf_to.native"):
        _train(fast, 5)
    assert sum("native CPU kernel is unavailable" in r.getMessage() for r in caplog.records) == 1
    _train(slow, 5, fused=False)
    assert all(torch.equal(a, b) for a, b in zip(fast, slow))


def test_a_tensor_joining_late_takes_its_first_step_beside_the_kernel(monkeypatch):
    """A parameter without a gradient for two steps: its first step and the others' later
    steps run in one kernel call, and the diagnostics add up."""
    calls = _calls(monkeypatch)
    results = []
    for fused in (None, False):
        params = _params(BLOCK_SHAPES[:3])
        opt = TrainableOptimizer(params, lr=0.01, diagnostics=True, fused=fused)
        for t in range(5):
            _grads(params, t)
            if t < 2:
                params[1].grad = None
            opt.step()
        results.append((params, opt.diagnostics()[0]))
    assert calls == [2, 2, 3, 3, 3]  # from step 2 the late one joins the call
    (fast, got), (slow, want) = results
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, **TOLERANCE[torch.float32])
    assert got["steps"] == want["steps"] == 5 and got["skipped"] == want["skipped"] == 0
    for key in ("residual_sq", "grad_sq", "estimate_sq"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key


def test_float16_groups_take_the_pytorch_paths_when_the_compiler_lacks_float16(monkeypatch):
    calls = _calls(monkeypatch)
    monkeypatch.setattr(native._lib, "to_has_float16", lambda: 0)
    fast, slow = _params(ODD_SHAPES, torch.float16), _params(ODD_SHAPES, torch.float16)
    _train(fast, 3)
    _train(slow, 3, fused=False)
    assert calls == []
    assert all(torch.equal(a, b) for a, b in zip(fast, slow))
    _train(_params(ODD_SHAPES, torch.bfloat16), 3)  # bfloat16 needs no compiler support
    assert calls == [len(ODD_SHAPES)] * 3


def test_the_c_harness_builds_and_times_a_step(tmp_path):
    """scripts/native_harness.c (docs/speed.md quotes it) still compiles against native.c."""
    import shutil
    import subprocess
    from pathlib import Path

    cc = native._compiler()
    if cc is None or not shutil.which(cc.split()[0]):
        pytest.skip("no C compiler")
    root = Path(__file__).resolve().parents[1]
    exe = tmp_path / "harness"
    flags = ["-O2", "-fopenmp", "-DHF_TO_CONSTANT_ROUNDING_NOISE"]
    subprocess.run([*cc.split(), *flags, str(root / "scripts" / "native_harness.c"), "-o", str(exe), "-lm"], check=True)
    out = subprocess.run([str(exe), "0", "1", "1"], check=True, capture_output=True, text=True).stdout
    assert out.startswith("estimator 0 adam 1 bf16 state 1: ") and out.strip().endswith(" ms")


def test_the_kernel_cache_goes_with_the_optimizer():
    """Deleting the optimizer frees its state: the native cache holds nothing beyond it."""
    import gc
    import weakref

    params = _params(ODD_SHAPES)
    opt = _train(params, 3)
    assert opt._native_plans
    ref = weakref.ref(opt.state[params[0]]["b"])
    del opt
    gc.collect()
    assert ref() is None


def test_empty_tensors_step_like_the_readable_path():
    shapes = [(0,), (5,), (0, 3)]
    fast, slow = _params(shapes), _params(shapes)
    opt_fast, opt_slow = _train(fast, 3), _train(slow, 3, fused=False)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, **TOLERANCE[torch.float32])
        assert opt_fast.state[a]["step"] == opt_slow.state[b]["step"] == 3


def test_state_that_does_not_fit_its_parameter_raises_instead_of_writing_out_of_bounds():
    """E.g. a state dict loaded into the parameters in another order."""
    params = _params([(50, 100), (10,)])
    opt = _train(params, 3)
    opt.state[params[0]], opt.state[params[1]] = opt.state[params[1]], opt.state[params[0]]
    _grads(params, 3)
    with pytest.raises(RuntimeError, match="does not fit its parameter"):
        opt.step()


def test_state_replaced_through_data_is_noticed():
    """``state[k].data = ...`` keeps the tensor and its version counter: the storage is stamped too."""
    fast, slow = _params(BLOCK_SHAPES[:2]), _params(BLOCK_SHAPES[:2])
    opt_fast, opt_slow = _train(fast, 3, estimator="diagonal"), _train(slow, 3, estimator="diagonal", fused=False)
    for opt, ps in ((opt_fast, fast), (opt_slow, slow)):
        for p in ps:
            for key in ("b", "a", "exp_avg_sq"):
                opt.state[p][key].data = opt.state[p][key].clone()  # e.g. state moved off and back
        _steps(opt, ps, 3, 6)
    for pf, ps_ in zip(fast, slow):
        torch.testing.assert_close(pf, ps_, **TOLERANCE[torch.float32])
        torch.testing.assert_close(opt_fast.state[pf]["b"], opt_slow.state[ps_]["b"], **TOLERANCE[torch.float32])


@pytest.mark.parametrize("estimator", ["diagonal", "rank_one", "folded"])
def test_gradients_that_come_and_go_keep_the_carried_sums_current(estimator):
    """Each set of tensors with gradients has its own cached plan; a step of one set bumps the
    version counters, so another set's carried sums for the same tensors are recomputed."""
    fast, slow = _params(BLOCK_SHAPES[:3]), _params(BLOCK_SHAPES[:3])
    opts = [TrainableOptimizer(ps, lr=0.01, estimator=estimator, fused=f) for ps, f in ((fast, None), (slow, False))]
    for t in range(12):
        for opt, ps in zip(opts, (fast, slow)):
            _grads(ps, t)
            if 2 <= t < 6 or t >= 9:
                ps[1].grad = None
            opt.step()
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, **TOLERANCE[torch.float32])


def test_kernel_writes_bump_the_version_counters():
    """As PyTorch's in-place ops do: autograd sees that step() changed the weights."""
    params = _params(ODD_SHAPES)
    opt = _train(params, 2)
    before = [p._version for p in params]
    _steps(opt, params, 2, 3)
    assert all(p._version > v for p, v in zip(params, before))
    y = (params[0] * params[0]).sum()  # saves the weight for backward
    _grads(params, 3)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_float16_groups_build_the_kernel_when_nothing_else_did(monkeypatch):
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_failed", False)
    params = _params(ODD_SHAPES, torch.float16)
    for p in params:
        p.grad = torch.ones_like(p)
    states = [{"b": torch.zeros(p.shape), "step": torch.tensor(1.0)} for p in params]
    assert native.eligible("none", params, [p.grad for p in params], states)
    assert native._lib is not None


@pytest.mark.parametrize("name", ["HF_TO_NATIVE", "HF_TO_TRITON"])
def test_a_switch_that_is_neither_on_nor_off_raises_naming_it(name, monkeypatch):
    monkeypatch.setenv(name, "maybe")
    if name == "HF_TO_TRITON":
        monkeypatch.setenv("HF_TO_NATIVE", "0")  # so that the step asks whether to take the Triton step
    with pytest.raises(ValueError, match=rf"{name}='maybe': expected one of"):
        _train(_params(ODD_SHAPES), 3, fused=True)
    for off in ("0", "off", "False"):
        monkeypatch.setenv(name, off)
        assert not env_switch(name)
    monkeypatch.setenv(name, "1")
    assert env_switch(name)


def test_a_compiler_asked_for_that_does_not_exist_is_not_replaced(monkeypatch, caplog):
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_failed", False)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with caplog.at_level(logging.WARNING, logger="hf_to.native"):
        assert not native.available()
    assert any("CC='/nonexistent/cc' is not an executable" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_sums_through_reduce_stats_step_like_the_unsharded_kernel(estimator, monkeypatch):
    """The sharded path on one process (an identity ``reduce_stats``): one call per group and
    step with the rows of the readable layout, and weights, state and diagnostics bit for bit
    those of the unsharded kernel, through a non-finite gradient (rank-one's skipped tensor
    carries its local sums on)."""
    calls = _calls(monkeypatch)
    rows: list[torch.Size] = []
    runs = []
    for reduce in (False, True):
        params = _params([*BLOCK_SHAPES[:3], (0,)])
        opt = TrainableOptimizer(params, lr=0.01, estimator=estimator, diagnostics=True)
        if reduce:
            opt._stats_reducer = lambda params: lambda sums: rows.append(sums.shape) or sums.clone()
        for t in range(12):
            _grads(params, t)
            if t == 5:
                params[0].grad[3] = float("nan")
            opt.step()
        runs.append((params, opt))
    assert len(calls) == 24
    columns = 1 + len(FORM_TABLE[estimator].stat_names)  # the count, then the form's stat_names
    assert columns == {"diagonal": 2, "rank_one": 6, "none": 1, "folded": 2}[estimator]
    assert rows == [torch.Size([4, columns])] * 12
    (plain, opt_plain), (reduced, opt_reduced) = runs
    for p, q in zip(plain, reduced):
        assert torch.equal(p, q)
        assert all(torch.equal(opt_plain.state[p][k], opt_reduced.state[q][k]) for k in opt_plain.state[p])
    assert opt_plain.diagnostics() == opt_reduced.diagnostics()


def test_sharded_parameters_without_reduce_stats_are_refused(monkeypatch):
    """Their sums span the shards: a step on the local shard alone would be wrong."""
    params = _params([(10,)])
    states = [{"b": torch.zeros(10), "a": torch.zeros(10), "step": torch.tensor(1.0)}]
    cfg = StepConfig(lr=0.1, preconditioner="none", beta_warmup=False)
    monkeypatch.setattr(native, "is_sharded", lambda p: True)
    with pytest.raises(RuntimeError, match="needs reduce_stats"):
        native.native_step(params, [torch.ones(10)], states, cfg, diagnostics=False)


def test_the_prefetching_build_steps_exactly_as_the_plain_one(monkeypatch, tmp_path):
    """The software prefetch (compiled in on Zen 5 only, HF_TO_PREFETCH) is a hint, and its
    chunked loop does the same element-wise math: 30 steps of every kernel form, float32,
    bfloat16 (bf16 state) and float16 parameters, across block boundaries, give the same
    weights and state, bit for bit, as the build this host takes; the health sums agree to
    rounding (added per chunk there)."""
    runs = []
    for prefetch in (False, True):
        tuning = ["-DHF_TO_PREFETCH=1"] if prefetch else []
        monkeypatch.setattr(native, "_tuning_flags", lambda info, tuning=tuning: tuning)
        monkeypatch.setattr(native, "_lib", None)
        monkeypatch.setattr(native, "_failed", False)
        monkeypatch.setenv("HF_TO_CACHE", str(tmp_path / str(prefetch)))
        assert native.available() and tmp_path / str(prefetch) in native.library_path().parents
        runs.append([])
        for estimator in ESTIMATORS:
            for pdtype, state_dtype in ((torch.float32, None), (torch.bfloat16, torch.bfloat16), (torch.float16, None)):
                if pdtype == torch.float16 and not native._lib.to_has_float16():
                    continue
                params = _params([*BLOCK_SHAPES[:4], (37,)], pdtype)
                opt = _train(params, 30, estimator=estimator, state_dtype=state_dtype, diagnostics=True)
                runs[-1].append((params, [opt.state[p] for p in params], opt.diagnostics()[0]))
    plain, prefetching = runs
    assert len(plain) == len(prefetching) >= 2 * len(ESTIMATORS)
    for (ps, states, diag), (qs, other_states, other_diag) in zip(plain, prefetching):
        for p, q, s, o in zip(ps, qs, states, other_states):
            assert torch.equal(p, q)
            assert all(torch.equal(s[k], o[k]) for k in s)
        for key in ("residual_sq", "grad_sq", "estimate_sq"):
            assert float(diag[key]) == pytest.approx(float(other_diag[key]), rel=1e-5), key
