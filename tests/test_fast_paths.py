"""The fused kernels (hf_to.kernels) against the paper-literal reference, and the bf16 state.

All tests but one run the kernels eagerly (``HF_TO_COMPILE=0``): the kernels are the same
functions, and compiling each variant would cost tens of seconds.  One test compiles.
"""

from __future__ import annotations

import logging

import pytest
import torch

from hf_to import ReferenceTrainableOptimizer, TrainableOptimizer, kernels
from hf_to.kernels import stochastic_round_, use_fused
from hf_to.registry import PAPER_LITERAL

FUSED = list(kernels.FUSED_ESTIMATORS)
FORMS = {
    "default": {},
    "paper": {**PAPER_LITERAL, "alpha": 1e-3},
    "decay_zero_init": {"weight_decay": 0.1, "intercept_init": "zero"},
}
# Tolerance on weights after 50 steps: float32 arithmetic in a different order; for half
# precision parameters the same, plus an occasional one-ulp difference in the rounding of p.
TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-3),
    torch.float16: dict(rtol=2**-10, atol=1e-4),
}
ODD_SHAPES = [(33, 5), (7,), (1,), (3, 1, 2)]


@pytest.fixture(autouse=True)
def _eager_kernels(monkeypatch):
    monkeypatch.setenv("HF_TO_COMPILE", "0")


def _params(dtype: torch.dtype, shapes=ODD_SHAPES, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


def _grads(params, step: int, *, nonfinite_at: int | None = None):
    """Noisy quadratic gradients, the same for every optimizer at a given step."""
    gen = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        g = 0.5 * p.detach().float() + torch.randn(p.shape, generator=gen)
        if step == nonfinite_at and i == 0:
            g.view(-1)[0] = float("inf")
        p.grad = g.to(p.dtype)


def _run_pair(dtype, kwargs, steps=50, *, nonfinite_at=None, shapes=ODD_SHAPES, fast_kwargs=None):
    w0 = _params(dtype, shapes)
    fast = [torch.nn.Parameter(w.clone()) for w in w0]
    ref = [torch.nn.Parameter(w.clone()) for w in w0]
    opt_fast = TrainableOptimizer(fast, lr=0.01, **kwargs, **(fast_kwargs or {"fused": True}))
    opt_ref = ReferenceTrainableOptimizer(ref, lr=0.01, **kwargs)
    for t in range(steps):
        for opt, ps in ((opt_fast, fast), (opt_ref, ref)):
            _grads(ps, t, nonfinite_at=nonfinite_at)
            opt.step()
    return fast, ref, opt_fast, opt_ref


def _assert_states_close(opt_fast, opt_ref, fast, ref, tol):
    for pf, pr in zip(fast, ref):
        sf, sr = opt_fast.state[pf], opt_ref.state[pr]
        assert sf.keys() == sr.keys()
        for key in sf:
            torch.testing.assert_close(sf[key].float(), sr[key].float(), **tol, msg=key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("estimator", FUSED)
def test_fused_kernels_equal_reference_over_50_steps(estimator, form, dtype):
    fast, ref, opt_fast, opt_ref = _run_pair(dtype, {"estimator": estimator, **FORMS[form]})
    for pf, pr in zip(fast, ref):
        assert pf.dtype == dtype
        torch.testing.assert_close(pf.detach().float(), pr.detach().float(), **TOLERANCE[dtype])
    if dtype == torch.float32:
        _assert_states_close(opt_fast, opt_ref, fast, ref, TOLERANCE[dtype])


@pytest.mark.parametrize("estimator", FUSED)
def test_two_phase_fused_path_with_a_stats_reducer_equals_reference(estimator, monkeypatch):
    """The path sharded parameters take: rows reduced together, then the elementwise step."""
    calls = []

    def identity_reducer(self, params):
        def reduce(sums):
            calls.append(tuple(sums.shape))
            return sums

        return reduce

    monkeypatch.setattr(TrainableOptimizer, "_stats_reducer", identity_reducer)
    fast, ref, opt_fast, opt_ref = _run_pair(torch.float32, {"estimator": estimator}, steps=20, nonfinite_at=3)
    assert len(calls) == 20 and calls[0][0] == len(ODD_SHAPES)
    for pf, pr in zip(fast, ref):
        torch.testing.assert_close(pf.detach(), pr.detach(), **TOLERANCE[torch.float32])
    _assert_states_close(opt_fast, opt_ref, fast, ref, TOLERANCE[torch.float32])


@pytest.mark.parametrize("estimator", FUSED)
def test_fused_step_skips_only_the_tensor_with_a_nonfinite_gradient(estimator):
    fast, ref, opt_fast, _ = _run_pair(torch.float32, {"estimator": estimator}, steps=6, nonfinite_at=2)
    assert opt_fast.state[fast[0]]["step"].item() == 5
    assert opt_fast.state[fast[1]]["step"].item() == 6
    for pf, pr in zip(fast, ref):
        assert torch.isfinite(pf).all()
        torch.testing.assert_close(pf.detach(), pr.detach(), **TOLERANCE[torch.float32])


def test_fused_handles_several_groups_a_param_without_grad_and_an_empty_group():
    def build(cls, **fused):
        w = _params(torch.float32, [(6, 4), (5,), (3, 3), (9,)])
        ps = [torch.nn.Parameter(x) for x in w]
        groups = [
            {"params": ps[:2], "estimator": "diagonal"},
            {"params": [], "estimator": "none"},
            {"params": ps[2:], "estimator": "rank_one", "lr": 0.003, "weight_decay": 0.1},
        ]
        return ps, cls(groups, lr=0.01, **fused)

    fast, opt_fast = build(TrainableOptimizer, fused=True)
    ref, opt_ref = build(ReferenceTrainableOptimizer)
    for t in range(50):
        for opt, ps in ((opt_fast, fast), (opt_ref, ref)):
            _grads(ps, t)
            ps[1].grad = None  # never receives a gradient
            opt.step()
    assert not opt_fast.state[fast[1]]
    for pf, pr in zip(fast, ref):
        torch.testing.assert_close(pf.detach(), pr.detach(), **TOLERANCE[torch.float32])


def test_fused_non_contiguous_parameter_is_updated_in_place():
    base = torch.randn(5, 3)
    fast = torch.nn.Parameter(base.clone().t())  # a transposed, non-contiguous parameter
    ref = torch.nn.Parameter(base.clone().t())
    assert not fast.is_contiguous()
    opt_fast = TrainableOptimizer([fast], lr=0.01, fused=True)
    opt_ref = ReferenceTrainableOptimizer([ref], lr=0.01)
    for t in range(10):
        for opt, p in ((opt_fast, fast), (opt_ref, ref)):
            _grads([p], t)
            opt.step()
    torch.testing.assert_close(fast.detach(), ref.detach(), **TOLERANCE[torch.float32])


def test_fused_diagnostics_equal_the_readable_path():
    _, _, opt_fast, _ = _run_pair(
        torch.float32, {"estimator": "diagonal", "diagnostics": True}, steps=20, nonfinite_at=4
    )
    w0 = _params(torch.float32)
    readable = [torch.nn.Parameter(w.clone()) for w in w0]
    opt_readable = TrainableOptimizer(readable, lr=0.01, estimator="diagonal", diagnostics=True, fused=False)
    for t in range(20):
        _grads(readable, t, nonfinite_at=4)
        opt_readable.step()
    got, want = opt_fast.diagnostics()[0], opt_readable.diagnostics()[0]
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    assert got["skipped"] == 1


def test_fallback_runs_eagerly_and_correctly_when_torch_compile_raises(monkeypatch, caplog):
    monkeypatch.delenv("HF_TO_COMPILE")
    monkeypatch.setattr(kernels, "_compile_failed", False)
    monkeypatch.setattr(kernels, "_compiled", {})

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler (simulated)")

    monkeypatch.setattr(torch, "compile", no_compiler)
    eager_calls = []
    original = kernels._ONE_PASS["diagonal"]
    monkeypatch.setitem(kernels._ONE_PASS, "diagonal", lambda *a: eager_calls.append(1) or original(*a))
    with caplog.at_level(logging.WARNING, logger="hf_to.kernels"):
        fast, ref, _, _ = _run_pair(torch.float32, {"estimator": "diagonal"}, steps=10)
    assert not kernels.compile_available()
    assert "running them eagerly" in caplog.text
    assert len(eager_calls) == 10 * len(ODD_SHAPES)
    for pf, pr in zip(fast, ref):
        torch.testing.assert_close(pf.detach(), pr.detach(), **TOLERANCE[torch.float32])


def test_compiled_kernels_equal_reference_and_report_compile_time(monkeypatch):
    """The one test that compiles (tens of seconds on two cores)."""
    monkeypatch.delenv("HF_TO_COMPILE")
    monkeypatch.setattr(kernels, "_compile_failed", False)
    if not kernels.compile_available():
        pytest.skip("torch.compile is not available in this torch build")
    before = kernels.compile_seconds()
    fast, ref, _, _ = _run_pair(torch.float32, {"estimator": "diagonal"}, steps=8, shapes=[(33, 5)])
    assert kernels.compile_available(), "compilation failed and fell back to eager"
    assert kernels.compile_seconds() > before
    torch.testing.assert_close(fast[0].detach(), ref[0].detach(), **TOLERANCE[torch.float32])


def test_auto_dispatch_compiles_only_large_cpu_groups(monkeypatch):
    monkeypatch.delenv("HF_TO_COMPILE")
    monkeypatch.setattr(kernels, "_compile_failed", False)
    small = [torch.zeros(10)]
    state32 = [{"b": torch.zeros(10)}]
    state16 = [{"b": torch.zeros(10, dtype=torch.bfloat16)}]
    assert use_fused(None, "diagonal", small, state32) == (False, False)
    assert use_fused(False, "diagonal", small, state32) == (False, False)
    assert use_fused(True, "diagonal", small, state32) == (True, True)
    assert use_fused(None, "diagonal", small, state16) == (True, False)  # bf16 state: kernels, eager
    assert use_fused(True, "full", small, state32) == (False, False)
    monkeypatch.setattr(kernels, "AUTO_MIN_NUMEL", 10)
    assert use_fused(None, "rank_one", small, state32) == (True, True)
    monkeypatch.setenv("HF_TO_COMPILE", "0")
    assert use_fused(None, "rank_one", small, state32) == (False, False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"state_dtype": torch.float16}, "state_dtype"),
        ({"state_dtype": torch.bfloat16, "estimator": "full"}, "state_dtype"),
        ({"fused": "yes"}, "fused"),
    ],
)
def test_invalid_fast_path_settings_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainableOptimizer([torch.nn.Parameter(torch.zeros(3))], **kwargs)


# -- bfloat16 state ------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", FUSED)
def test_bf16_state_halves_state_bytes(estimator):
    sizes = {}
    for state_dtype in (torch.float32, torch.bfloat16):
        p = torch.nn.Parameter(torch.randn(64, 8))
        opt = TrainableOptimizer([p], estimator=estimator, state_dtype=state_dtype)
        p.grad = torch.randn(64, 8)
        opt.step()
        assert all(v.dtype == state_dtype for k, v in opt.state[p].items() if k != "step")
        sizes[state_dtype] = opt.state_bytes() - 4  # the float32 step counter
    assert sizes[torch.bfloat16] * 2 == sizes[torch.float32]


def test_bf16_state_survives_a_state_dict_round_trip():
    p = torch.nn.Parameter(torch.randn(16))
    opt = TrainableOptimizer([p], state_dtype=torch.bfloat16)
    p.grad = torch.randn(16)
    opt.step()
    sd = opt.state_dict()
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = TrainableOptimizer([q], state_dtype=torch.bfloat16)
    opt2.load_state_dict(sd)
    assert opt2.state[q]["b"].dtype == torch.bfloat16
    torch.testing.assert_close(opt2.state[q]["b"], opt.state[p]["b"], rtol=0, atol=0)


def test_stochastic_rounding_is_unbiased_below_one_bf16_ulp():
    """1 + 2⁻¹⁰ lies between bf16 neighbours 1 and 1 + 2⁻⁷; nearest rounding loses it."""
    x = torch.full((200_000,), 1 + 2**-10)
    dst = torch.empty(x.shape, dtype=torch.bfloat16)
    stochastic_round_(dst, x)
    assert set(dst.unique().tolist()) == {1.0, 1 + 2**-7}
    assert dst.double().mean().item() == pytest.approx(1 + 2**-10, abs=2e-5)
    assert x.to(torch.bfloat16).double().mean().item() == 1.0


def test_stochastic_rounding_keeps_the_sign_and_exact_values():
    x = torch.tensor([-1.5, -3e-5, 0.0, 2.0, 1e30, -float("inf")])
    dst = torch.empty(x.shape, dtype=torch.bfloat16)
    stochastic_round_(dst, x)
    exact = torch.tensor([-1.5, 0.0, 2.0, -float("inf")])
    torch.testing.assert_close(dst[[0, 2, 3, 5]].float(), exact)
    assert dst[1] < 0 and abs(dst[1].item() / -3e-5 - 1) < 2**-7


def noisy_quadratic_loss(state_dtype, *, steps=600, seed=0):
    """Final loss of TO on an ill-conditioned noisy quadratic (lr small so updates are tiny)."""
    gen = torch.Generator().manual_seed(seed)
    d = 256
    scales = torch.logspace(-2, 0, d)
    w = torch.nn.Parameter(torch.ones(d))
    opt = TrainableOptimizer([w], lr=3e-3, state_dtype=state_dtype)
    for _ in range(steps):
        w.grad = scales * w.detach() + 0.1 * torch.randn(d, generator=gen)
        opt.step()
    return 0.5 * (scales * w.detach() ** 2).sum().item()


def test_bf16_state_converges_like_fp32_state_on_a_noisy_quadratic():
    start = 0.5 * torch.logspace(-2, 0, 256).sum().item()
    fp32 = noisy_quadratic_loss(None)
    bf16 = noisy_quadratic_loss(torch.bfloat16)
    assert fp32 < 0.5 * start
    assert bf16 == pytest.approx(fp32, rel=0.1), (start, fp32, bf16)
