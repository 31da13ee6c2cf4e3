"""The form table (hf_to.forms) drives the tests: every form on every path it claims, the one chooser.

A new form is checked here against the paper-literal reference on the readable path and on
each kernel it declares in ``Form.kernels``, without editing a test list; each case also
asserts that the step really took the path it is named after (``step_paths``).  Triton runs
in its interpreter on CPU tensors (as in tests/test_gpu_step.py).
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from hf_to import Form, ReferenceTrainableOptimizer, TrainableOptimizer, native, register_form
from hf_to.forms import FORMS, KERNELS
from hf_to.registry import PAPER_LITERAL

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when hf_to.gpu's kernels are decorated
try:
    import hf_to.gpu as gpu

    if not torch.cuda.is_available() and not gpu.INTERPRETED:
        gpu = importlib.reload(gpu)
except ImportError:  # no triton: its cases skip
    gpu = None

CASES = [(name, path) for name, form in sorted(FORMS.items()) for path in ("readable", *sorted(form.kernels))]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-3}
SHAPES = [(5, 3), (7,), (1,)]


def _on_path(path: str, monkeypatch) -> dict:
    """Environment and keywords that send a CPU group down ``path``."""
    if path == "native":
        monkeypatch.delenv("HF_TO_NATIVE", raising=False)
        if not native.available():
            pytest.skip("no C compiler: hf_to.native cannot be built")
        return {"fused": True}
    if path == "triton":
        if gpu is None:
            pytest.skip("triton is not installed")
        monkeypatch.setenv("HF_TO_NATIVE", "0")
        monkeypatch.setattr(gpu, "INTERPRET_ON_CPU", True)
        monkeypatch.setattr(gpu, "CHUNK", 64)
        monkeypatch.setattr(gpu, "BLOCK", 64)
        return {"fused": True}
    return {"fused": False}


def _grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = (0.5 * p.detach().float() + torch.randn(p.shape, generator=gen)).to(p.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("setting", ["default", "paper"])
@pytest.mark.parametrize(("name", "path"), CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_every_form_equals_the_reference_on_every_path_it_claims(name, path, setting, dtype, monkeypatch):
    kwargs = {"estimator": name, "weight_decay": 0.1, **(PAPER_LITERAL if setting == "paper" else {})}
    if setting == "paper":
        kwargs["alpha"] = 1e-3
    kwargs |= _on_path(path, monkeypatch)
    gen = torch.Generator().manual_seed(0)
    w0 = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    fast = [torch.nn.Parameter(w.clone()) for w in w0]
    ref = [torch.nn.Parameter(w.clone()) for w in w0]
    opt = TrainableOptimizer(fast, lr=0.01, **kwargs)
    opt_ref = ReferenceTrainableOptimizer(ref, lr=0.01, **{**kwargs, "fused": False})
    # Triton's interpreter runs every program in Python: fewer steps there (tests/test_gpu_step.py
    # runs its 50-step grid).
    for t in range(15 if path == "triton" else 50):
        _grads(fast, t)
        _grads(ref, t)
        opt.step()
        opt_ref.step()
        assert opt.step_paths()[0].name == path, opt.step_paths()[0]
    tol = TOLERANCE[dtype]
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        for key, value in opt.state[a].items():
            torch.testing.assert_close(value, opt_ref.state[b][key], rtol=tol, atol=tol)


def _stepped(params, **kwargs) -> TrainableOptimizer:
    opt = TrainableOptimizer(params, lr=0.01, **kwargs)
    _grads(params, 0)
    opt.step()
    return opt


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("cpu", "native"),
        ("cpu_bf16_params", "native"),
        ("cpu_bf16_state", "native"),
        ("cpu_capturable", "native"),
        ("fused_false", "readable"),
        ("float64", "readable"),
        ("full", "readable"),
        ("sharded", "native"),
        ("native_off", "readable"),
        ("strided", "readable"),
        ("triton_interpreter", "triton"),
        ("triton_strided", "readable"),
    ],
)
def test_the_chooser_picks_one_path_per_kind_of_group_and_says_why(kind, expected, monkeypatch):
    """One function decides (``hf_to.functional.choose_path``); ``step_paths`` reports its choice."""
    monkeypatch.delenv("HF_TO_NATIVE", raising=False)
    if expected == "native" and not native.available():
        pytest.skip("no C compiler: hf_to.native cannot be built")
    dtype = {"cpu_bf16_params": torch.bfloat16, "float64": torch.float64}.get(kind, torch.float32)
    params = [torch.nn.Parameter(torch.randn(6, 4, dtype=dtype)), torch.nn.Parameter(torch.randn(4, dtype=dtype))]
    kwargs: dict = {}
    if kind == "cpu_bf16_state":
        kwargs["state_dtype"] = torch.bfloat16
    if kind == "cpu_capturable":
        kwargs["capturable"] = True
    if kind == "fused_false":
        kwargs["fused"] = False
    if kind == "full":
        kwargs["estimator"] = "full"
    if kind == "sharded":  # what a sharded group hands the step: a stats reducer (C kernel: its sums reduced)
        monkeypatch.setattr(TrainableOptimizer, "_stats_reducer", lambda self, ps: lambda sums: sums)
    if kind == "native_off":
        monkeypatch.setenv("HF_TO_NATIVE", "0")
    if kind in ("strided", "triton_strided"):
        params[0] = torch.nn.Parameter(torch.randn(4, 6).t())
    if kind.startswith("triton"):
        _on_path("triton", monkeypatch)
    path = _stepped(params, **kwargs).step_paths()[0]
    assert path.name == expected, path
    assert path.reason, "the choice says why"


def test_a_compiled_function_that_steps_runs_and_equals_the_eager_steps():
    """Dynamo special-cases an optimizer method named ``_init_group`` (it expects torch's return
    convention from it); ours is ``_gather``, so ``torch.compile`` of a training step that calls
    ``opt.step()`` traces (with graph breaks) and steps the same numbers."""

    def run(compiled: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4)
        opt = TrainableOptimizer(model.parameters(), lr=1e-2, fused=False)

        def train_step(x):
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss.detach()

        fn = torch.compile(train_step, backend="eager") if compiled else train_step
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            fn(torch.randn(16, 8, generator=gen))
        return [p.detach().clone() for p in model.parameters()]

    torch._dynamo.reset()
    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def test_a_registered_form_steps_on_the_readable_path_and_claims_no_kernel_it_lacks():
    diagonal = FORMS["diagonal"]
    mine = Form("mine", ("a",), ("ww",), diagonal.slope_times, diagonal.state_numel, step=diagonal.step)
    with pytest.raises(ValueError, match="claims kernels"):
        register_form(
            Form(
                "mine",
                ("a",),
                ("ww",),
                diagonal.slope_times,
                diagonal.state_numel,
                step=diagonal.step,
                kernels=frozenset(KERNELS),
            )
        )
    with pytest.raises(ValueError, match="exists"):
        register_form(Form("diagonal", ("a",), ("ww",), diagonal.slope_times, diagonal.state_numel, step=diagonal.step))
    try:
        register_form(mine)
        w0 = torch.randn(6, 4)
        p, q = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
        opt_mine, opt_diag = (
            TrainableOptimizer([p], estimator="mine"),
            TrainableOptimizer([q], estimator="diagonal", fused=False),
        )
        for t in range(5):
            _grads([p], t)
            _grads([q], t)
            opt_mine.step()
            opt_diag.step()
        assert opt_mine.step_paths()[0].name == "readable"
        assert torch.equal(p, q), "the same step function, the same numbers"
    finally:
        FORMS.pop("mine", None)
