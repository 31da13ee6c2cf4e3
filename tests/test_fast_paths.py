"""The PyTorch paths against the paper-literal reference: the readable path (the path of sharded
CPU parameters and of CPUs without the C kernel), non-finite gradients, and bfloat16 state.

``HF_TO_NATIVE=0`` keeps the CPU's C kernel (tests/test_native.py) out of the way; the GPU's
Triton step has its own tests (tests/test_gpu_step.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from hf_to import ReferenceTrainableOptimizer, TrainableOptimizer
from hf_to.forms import FORMS as FORM_TABLE
from hf_to.registry import PAPER_LITERAL
from hf_to.rounding import stochastic_round_

FUSED = [name for name, form in FORM_TABLE.items() if form.kernels]
FORMS = {
    "default": {},
    "paper": {**PAPER_LITERAL, "alpha": 1e-3},
    "decay_zero_init": {"weight_decay": 0.1, "intercept_init": "zero"},
    "adam_warmup": {"beta_warmup": "adam", "weight_decay": 0.1},
    "nesterov": {"beta_warmup": "adam", "nesterov": True},
    "lookahead": {"nesterov": 0.55, "weight_decay": 0.1},
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
def _no_native_kernel(monkeypatch):
    # On a CPU ``fused=True`` takes the C kernel of hf_to.native (tests/test_native.py);
    # without it a CPU group takes the readable path, the path of sharded CPU parameters.
    monkeypatch.setenv("HF_TO_NATIVE", "0")


def _params(dtype: torch.dtype, shapes=ODD_SHAPES, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


def _grads(params, step: int, *, nonfinite_at: int | None = None):
    """Noisy quadratic gradients, the same for every optimizer at a given step.

    At step ``nonfinite_at`` two entries of the first tensor's gradient are inf and nan.
    """
    gen = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        g = 0.5 * p.detach().float() + torch.randn(p.shape, generator=gen)
        if step == nonfinite_at and i == 0:
            g.view(-1)[0] = float("inf")
            g.view(-1)[g.numel() // 2] = float("nan")
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
def test_fused_true_without_the_c_kernel_equals_reference_over_50_steps(estimator, form, dtype):
    fast, ref, opt_fast, opt_ref = _run_pair(dtype, {"estimator": estimator, **FORMS[form]})
    for pf, pr in zip(fast, ref):
        assert pf.dtype == dtype
        torch.testing.assert_close(pf.detach().float(), pr.detach().float(), **TOLERANCE[dtype])
    if dtype == torch.float32:
        _assert_states_close(opt_fast, opt_ref, fast, ref, TOLERANCE[dtype])


@pytest.mark.parametrize("estimator", FUSED)
def test_readable_path_with_a_stats_reducer_equals_reference(estimator, monkeypatch):
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
def test_fused_step_masks_or_skips_only_the_tensor_with_a_nonfinite_gradient(estimator):
    fast, ref, opt_fast, _ = _run_pair(torch.float32, {"estimator": estimator}, steps=6, nonfinite_at=2)
    # diagonal/none step the finite entries (the step advances); rank_one skips the tensor.
    assert opt_fast.state[fast[0]]["step"].item() == (5 if estimator == "rank_one" else 6)
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


# -- non-finite gradient entries -------------------------------------------------------------

MASKED = [name for name, form in FORM_TABLE.items() if form.kernels and form.coordinatewise]
PATHS = ["readable", "readable_reduced"]


def _identity_reducer(self, params):
    return lambda sums: sums


def _optimizer(params, path, monkeypatch, **kwargs):
    """TrainableOptimizer on the readable path; ``readable_reduced`` passes the rows through a
    stats reducer (the identity), as for sharded parameters."""
    if path == "readable_reduced":
        monkeypatch.setattr(TrainableOptimizer, "_stats_reducer", _identity_reducer)
    return TrainableOptimizer(params, lr=0.01, fused=False, **kwargs)


def _snapshot(opt, p):
    return p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}


def _bad_gradient(p, gen, positions):
    """A finite gradient with inf, nan and -inf at ``positions`` (flat indices)."""
    g = (0.5 * p.detach().float() + torch.randn(p.shape, generator=gen)).reshape(-1)
    for i, pos in enumerate(positions):
        g[pos] = (float("inf"), float("nan"), -float("inf"))[i % 3]
    return g.reshape(p.shape).to(p.dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("estimator", MASKED)
def test_nonfinite_entries_keep_weight_and_state_bitwise_and_the_rest_steps_like_the_reference(
    estimator, form, path, monkeypatch
):
    _check_masked_steps_against_reference(estimator, form, path, monkeypatch)


def _check_masked_steps_against_reference(estimator, form, path, monkeypatch):
    shapes = [(33, 5), (7,)]
    w0 = _params(torch.float32, shapes)
    fast = [torch.nn.Parameter(w.clone()) for w in w0]
    ref = [torch.nn.Parameter(w.clone()) for w in w0]
    kwargs = {"estimator": estimator, **FORMS[form]}
    opt_fast = _optimizer(fast, path, monkeypatch, **kwargs, diagnostics=True)
    opt_ref = ReferenceTrainableOptimizer(ref, lr=0.01, **kwargs)
    bad_steps = {0: [3, 40, 100], 3: [0, 1, 2, 164]}  # the first step (b_0 = g_0) and a later one
    for t in range(8):
        gen = torch.Generator().manual_seed(t)
        grads = [_bad_gradient(p, gen, bad_steps.get(t, []) if i == 0 else []) for i, p in enumerate(fast)]
        w_before = fast[0].detach().clone()
        state_before = {k: v.clone() for k, v in opt_fast.state[fast[0]].items()}  # empty before step 0
        for opt, ps in ((opt_fast, fast), (opt_ref, ref)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
        assert opt_fast.state[fast[0]]["step"].item() == t + 1
        if t in bad_steps:
            bad = ~torch.isfinite(grads[0])
            assert torch.equal(fast[0].detach()[bad], w_before[bad])
            assert (fast[0].detach()[~bad] != w_before[~bad]).all()
            for key, value in opt_fast.state[fast[0]].items():
                if key != "step":
                    old = state_before.get(key, torch.zeros_like(value))  # the state starts at 0
                    assert torch.equal(value[bad], old[bad]), key
        for pf, pr in zip(fast, ref):
            assert torch.isfinite(pf).all()
            torch.testing.assert_close(pf.detach(), pr.detach(), **TOLERANCE[torch.float32])
        _assert_states_close(opt_fast, opt_ref, fast, ref, TOLERANCE[torch.float32])
    diag = opt_fast.diagnostics()[0]
    assert diag["skipped"] == len(bad_steps) and diag["steps"] == 8
    assert all(math.isfinite(v) for v in diag.values()), diag


_LOW_PRECISION = {
    "bf16_params": (torch.bfloat16, None),
    "fp16_params": (torch.float16, None),
    "bf16_state": (torch.float32, torch.bfloat16),
    "bf16_both": (torch.bfloat16, torch.bfloat16),
}


@pytest.mark.parametrize(
    ("path", "param_dtype", "state_dtype"),
    [pytest.param(path, *dtypes, id=f"{path}-{name}") for path in PATHS for name, dtypes in _LOW_PRECISION.items()],
)
@pytest.mark.parametrize("estimator", MASKED)
def test_nonfinite_entries_stay_bitwise_with_low_precision_params_and_state(
    estimator, path, param_dtype, state_dtype, monkeypatch
):
    p = torch.nn.Parameter(_params(param_dtype, [(16, 9)])[0])
    opt = _optimizer([p], path, monkeypatch, estimator=estimator, state_dtype=state_dtype, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    for t in range(4):
        positions = [5, 77, 143] if t == 2 else []
        p.grad = _bad_gradient(p, gen, positions)
        bad = ~torch.isfinite(p.grad)
        w_before, state_before = _snapshot(opt, p)
        opt.step()
        assert opt.state[p]["step"].item() == t + 1
        assert torch.isfinite(p).all()
        if positions:
            assert torch.equal(p.detach()[bad], w_before[bad])
            assert not torch.equal(p.detach()[~bad], w_before[~bad])
            for key, value in opt.state[p].items():
                if key != "step":
                    assert value.dtype == (state_dtype or torch.float32)
                    assert torch.equal(value[bad], state_before[key][bad]), key
                    assert torch.isfinite(value).all(), key


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("estimator", FUSED)
def test_gradient_non_finite_everywhere_changes_nothing(estimator, path, monkeypatch):
    a, b = _params(torch.float32, [(6, 5), (4,)])
    a, b = torch.nn.Parameter(a), torch.nn.Parameter(b)
    opt = _optimizer([a, b], path, monkeypatch, estimator=estimator, diagnostics=True, weight_decay=0.1)
    _grads([a, b], 0)
    opt.step()
    before = _snapshot(opt, a)
    a.grad = torch.full_like(a, float("nan"))
    a.grad[::2] = float("inf")
    _grads([b], 1)
    opt.step()
    assert torch.equal(a.detach(), before[0])
    for key, value in opt.state[a].items():
        assert torch.equal(value, before[1][key]), key
    assert opt.state[a]["step"].item() == 1 and opt.state[b]["step"].item() == 2
    diag = opt.diagnostics()[0]
    assert diag["skipped"] == 1 and diag["steps"] == 2


@pytest.mark.parametrize("path", PATHS)
def test_rank_one_skips_the_whole_tensor_for_one_nonfinite_entry(path, monkeypatch):
    a = torch.nn.Parameter(_params(torch.float32, [(6, 5)])[0])
    opt = _optimizer([a], path, monkeypatch, estimator="rank_one", diagnostics=True)
    for t in range(2):
        _grads([a], t)
        opt.step()
    before = _snapshot(opt, a)
    _grads([a], 2)
    a.grad[4, 2] = float("inf")
    opt.step()
    assert torch.equal(a.detach(), before[0])
    for key, value in opt.state[a].items():
        assert torch.equal(value, before[1][key]), key
    diag = opt.diagnostics()[0]
    assert diag["skipped"] == 1 and diag["steps"] == 2


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("estimator", FUSED)
def test_finite_gradient_whose_sum_overflows_takes_the_step(estimator, path, monkeypatch):
    """The sentinel counts non-finite entries; an overflowing Σg of finite entries is no reason to skip."""
    a = torch.nn.Parameter(torch.zeros(6))
    opt = _optimizer([a], path, monkeypatch, estimator=estimator, preconditioner="none", diagnostics=True)
    a.grad = torch.full((6,), 3e38)
    assert not torch.isfinite(a.grad.sum())
    opt.step()
    assert opt.state[a]["step"].item() == 1
    torch.testing.assert_close(a.detach(), torch.full((6,), -0.01 * 3e38))
    assert opt.diagnostics()[0]["skipped"] == 0


@pytest.mark.parametrize("path", PATHS)
def test_diagnostics_count_masked_tensors_and_sum_finite_entries_only(path, monkeypatch):
    """estimator='none', plain step, running-mean warm-up: after b_1 = g_0 the second step has
    r = g_0 - g_1 and Ĝ = (g_0 + g_1)/2 (β_2 = 1/2), so the sums are known in closed form."""
    params = [torch.nn.Parameter(w) for w in _params(torch.float32, [(8, 3), (5,), (6,)])]
    opt = _optimizer(
        params, path, monkeypatch, estimator="none", preconditioner="none", beta_warmup=True, diagnostics=True
    )
    gen = torch.Generator().manual_seed(0)
    g0 = [torch.randn(p.shape, generator=gen) for p in params]
    g1 = [torch.randn(p.shape, generator=gen) for p in params]
    g1[0].view(-1)[[2, 7, 20]] = torch.tensor([float("inf"), float("nan"), -float("inf")])
    g1[1].fill_(float("nan"))  # every entry: skipped
    for p, g in zip(params, g0):
        p.grad = g.clone()
    opt.step()
    opt.diagnostics()  # reset
    for p, g in zip(params, g1):
        p.grad = g.clone()
    opt.step()
    diag = opt.diagnostics()[0]
    finite = [torch.isfinite(g) for g in g1]
    pairs = [(a[m].double(), b[m].double()) for a, b, m in zip(g0, g1, finite)]
    assert diag["steps"] == 1 and diag["skipped"] == 2
    assert diag["grad_sq"] == pytest.approx(sum((b * b).sum().item() for _, b in pairs), rel=1e-6)
    assert diag["residual_sq"] == pytest.approx(sum(((a - b) ** 2).sum().item() for a, b in pairs), rel=1e-6)
    assert diag["estimate_sq"] == pytest.approx(sum((0.25 * (a + b) ** 2).sum().item() for a, b in pairs), rel=1e-6)


def test_cpu_groups_never_import_the_triton_step(monkeypatch):
    """fused=True without the C kernel is the readable path on a CPU; triton is not needed."""
    import sys

    monkeypatch.delitem(sys.modules, "hf_to.gpu", raising=False)
    fast, ref, _, _ = _run_pair(torch.float32, {"estimator": "rank_one"}, steps=3)
    assert "hf_to.gpu" not in sys.modules
    for pf, pr in zip(fast, ref):
        torch.testing.assert_close(pf.detach(), pr.detach(), **TOLERANCE[torch.float32])


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
