"""The multi-tensor Triton step (hf_to.gpu) against the paper-literal reference.

Without CUDA the kernels run on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``,
set here before hf_to.gpu is imported); with CUDA they run compiled on the GPU (this file is
what ``scripts/gpu_check.sh`` runs there).  The interpreter executes every program of a
launch in Python (about 5 ms per tensor and step), so the tensors are small and chunks are
64 elements (``CHUNK``/``BLOCK`` are patched) so that a few tensors span several chunks.
"""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch
import torch.utils._python_dispatch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # read when hf_to.gpu's kernels are decorated
triton = pytest.importorskip("triton")

import hf_to.gpu as gpu  # noqa: E402
from hf_to import ReferenceTrainableOptimizer, TrainableOptimizer  # noqa: E402
from hf_to.forms import FORMS  # noqa: E402
from hf_to.registry import PAPER_LITERAL  # noqa: E402

if not CUDA and not gpu.INTERPRETED:  # imported earlier in this process without the interpreter
    gpu = importlib.reload(gpu)

DEVICE = "cuda" if CUDA else "cpu"
ESTIMATORS = [name for name, form in FORMS.items() if "triton" in form.kernels]
PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Weights after 50 steps: float32 arithmetic in another order; half-precision parameters add
# an occasional one-ulp difference in their rounding; bfloat16 state (stochastic rounding)
# against the reference's float32 state moves each state value by up to one bfloat16 ulp.
TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-3),
    torch.float16: dict(rtol=2**-10, atol=1e-4),
}
BF16_STATE_TOLERANCE = dict(rtol=2**-7, atol=2e-3)
ADAM = {"weight_decay": 0.1}
PAPER = {**PAPER_LITERAL, "alpha": 1e-3}


@pytest.fixture(autouse=True)
def _triton_step(monkeypatch):
    """Groups take the Triton step (on CPU tensors: in the interpreter), with 64-element chunks."""
    monkeypatch.setattr(gpu, "INTERPRET_ON_CPU", True)
    monkeypatch.setattr(gpu, "CHUNK", 64)
    monkeypatch.setattr(gpu, "BLOCK", 64)
    monkeypatch.setenv("HF_TO_NATIVE", "0")  # CPU tensors: not the C kernel


def _tensors(shapes, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


def _set_grads(params, step, *, nonfinite=None, in_place=False):
    """Noisy quadratic gradients, the same for every optimizer at a given step.

    ``nonfinite``: ``{tensor index: "some" | "all"}`` makes entries of that gradient inf/nan;
    ``in_place``: written into the existing ``.grad`` tensors (static addresses, as in a graph).
    """
    gen = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        g = 0.5 * p.detach().float().cpu() + torch.randn(p.shape, generator=gen)
        kind = (nonfinite or {}).get(i)
        if kind == "some" and g.numel() > 2:
            g.view(-1)[0] = float("inf")
            g.view(-1)[g.numel() // 2] = float("nan")
        elif kind == "all":
            g.fill_(float("nan"))
        if in_place and p.grad is not None:
            p.grad.copy_(g)
        else:
            p.grad = g.to(device=p.device, dtype=p.dtype)


def _pair(groups, dtype, *, state_dtype=None, estimator="diagonal", **kwargs):
    """(params, optimizer) for the Triton step and for the reference, from ``groups``:
    a list of (shapes, hyperparameters)."""
    out = []
    for cls, extra in ((TrainableOptimizer, {"state_dtype": state_dtype, **kwargs}), (ReferenceTrainableOptimizer, {})):
        params, spec = [], []
        for i, (shapes, hp) in enumerate(groups):
            ps = [torch.nn.Parameter(w.to(DEVICE)) for w in _tensors(shapes, dtype, seed=i)]
            params += ps
            spec.append({"params": ps, **hp})
        out.append((params, cls(spec, lr=0.01, estimator=estimator, **extra)))
    return out


def _run(pairs, steps, nonfinite_at=None, nonfinite=None):
    for t in range(steps):
        for params, opt in pairs:
            _set_grads(params, t, nonfinite=nonfinite if t == nonfinite_at else None)
            opt.step()


def _assert_params_close(fast, ref, tol):
    for pf, pr in zip(fast, ref):
        torch.testing.assert_close(pf.detach().float().cpu(), pr.detach().float().cpu(), **tol)


def _assert_states_close(opt_fast, fast, opt_ref, ref, tol):
    for pf, pr in zip(fast, ref):
        sf, sr = opt_fast.state[pf], opt_ref.state[pr]
        assert sf.keys() == sr.keys()
        for key in sf:
            torch.testing.assert_close(sf[key].float().cpu(), sr[key].float().cpu(), **tol, msg=key)


# Four groups: {Adam preconditioner with weight decay, the paper's form} x {float32, bfloat16
# state}; an empty tensor, odd sizes, one tensor over two chunks of 64.
GROUPS = [
    ([(0,), (9, 11)], {**ADAM, "state_dtype": torch.float32}),
    ([(7,)], {**PAPER, "state_dtype": torch.float32}),
    ([(3, 1, 5)], {**ADAM, "state_dtype": torch.bfloat16}),
    ([(13,)], {**PAPER, "state_dtype": torch.bfloat16}),
]


@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_triton_step_equals_the_reference_over_50_steps(estimator, dtype):
    """Every estimator x parameter dtype x state dtype x preconditioner, 50 steps."""
    (fast, opt_fast), (ref, opt_ref) = _pair(GROUPS, dtype, estimator=estimator)
    for group in opt_ref.param_groups:
        group["state_dtype"] = None  # the oracle keeps float32 state
    launches = gpu.launches
    _run([(fast, opt_fast), (ref, opt_ref)], 50)
    assert gpu.launches - launches == 50 * len(GROUPS) * 2  # two launches per group and step: it ran
    assert all(p.dtype == dtype for p in fast)
    bf16_state = {id(p) for g in opt_fast.param_groups if g["state_dtype"] == torch.bfloat16 for p in g["params"]}
    for pf, pr in zip(fast, ref):
        if id(pf) in bf16_state:
            assert opt_fast.state[pf]["b"].dtype == torch.bfloat16
            tol = {k: max(BF16_STATE_TOLERANCE[k], TOLERANCE[dtype][k]) for k in ("rtol", "atol")}
            _assert_params_close([pf], [pr], tol)
        else:
            _assert_params_close([pf], [pr], TOLERANCE[dtype])
            if dtype == torch.float32:
                _assert_states_close(opt_fast, [pf], opt_ref, [pr], TOLERANCE[dtype])


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_nonfinite_gradients_mask_entries_or_skip_tensors_as_the_reference_does(estimator):
    """diagonal/none: bad entries keep weight and state; rank-one skips the tensor; a gradient
    non-finite everywhere skips the tensor (its step does not advance)."""
    groups = [([(70,), (9,), (5,)], {})]
    (fast, opt_fast), (ref, opt_ref) = _pair(groups, torch.float32, estimator=estimator)
    _run([(fast, opt_fast), (ref, opt_ref)], 6, nonfinite_at=3, nonfinite={0: "some", 1: "all"})
    steps = [opt_fast.state[p]["step"].item() for p in fast]
    assert steps == [5 if estimator == "rank_one" else 6, 5, 6]
    assert all(torch.isfinite(p).all() for p in fast)
    _assert_params_close(fast, ref, TOLERANCE[torch.float32])
    _assert_states_close(opt_fast, fast, opt_ref, ref, TOLERANCE[torch.float32])


def test_diagnostics_equal_the_readable_paths():
    groups = [([(70,), (9,), (5,)], {})]
    results = []
    for fused in (None, False):
        ps = [torch.nn.Parameter(w.to(DEVICE)) for w in _tensors(groups[0][0], torch.float32)]
        opt = TrainableOptimizer(ps, lr=0.01, diagnostics=True, fused=fused)
        _run([(ps, opt)], 4, nonfinite_at=2, nonfinite={0: "some", 1: "all"})
        results.append(opt.diagnostics()[0])
    fast, readable = results
    assert fast.keys() == readable.keys()
    for key in fast:
        assert math.isclose(fast[key], readable[key], rel_tol=1e-5, abs_tol=1e-9), key


@pytest.mark.parametrize("estimator", ["diagonal", "rank_one", "folded"])
def test_sharded_groups_sum_their_rows_through_one_reducer_call_per_step(estimator, monkeypatch):
    """The FSDP2 path: a third launch writes the per-tensor sums, ``reduce_stats`` sums them over
    the shard group (here: the identity, once per group and step), then the update."""
    calls = []

    def identity_reducer(self, params):
        def reduce(sums):
            calls.append(tuple(sums.shape))
            return sums

        return reduce

    monkeypatch.setattr(TrainableOptimizer, "_stats_reducer", identity_reducer)
    groups = [([(70,), (0,), (5,)], {})]
    (fast, opt_fast), (ref, opt_ref) = _pair(groups, torch.float32, estimator=estimator)
    launches = gpu.launches
    _run([(fast, opt_fast), (ref, opt_ref)], 12, nonfinite_at=4, nonfinite={0: "some"})
    assert calls == [(3, 6 if estimator == "rank_one" else 2)] * 12
    assert gpu.launches - launches == 12 * 3
    _assert_params_close(fast, ref, TOLERANCE[torch.float32])
    _assert_states_close(opt_fast, fast, opt_ref, ref, TOLERANCE[torch.float32])


def _fused_adamw_launches(numels: list[int], depth: int = 4) -> int:
    """Kernel launches of ``AdamW(fused=True)`` on CUDA for tensors of these sizes.

    ``multi_tensor_apply`` (aten/src/ATen/native/cuda/MultiTensorApply.cuh) launches when a
    launch holds ``depth_to_max_tensors[depth - 1]`` tensors (36 for the 4 lists of Adam) or
    ``depth_to_max_blocks`` = 320 chunks of 65536 elements.
    """
    max_tensors, max_blocks, chunk = (110, 64, 48, 36, 30)[depth - 1], 320, 65536
    launches, tensors, blocks = 0, 0, 0
    for n in numels:
        if n == 0:
            continue
        tensors += 1
        for _ in range(-(-n // chunk)):
            blocks += 1
            if blocks == max_blocks or tensors == max_tensors:
                launches, blocks = launches + 1, 0
                tensors = 0 if tensors == max_tensors else tensors
        if tensors == max_tensors:
            tensors = 0
    return launches + (1 if blocks or tensors else 0)


def _shapes(count: int) -> list[tuple[int, ...]]:
    """``count`` tensors: empty, one element, odd sizes, some over two or three chunks."""
    return [(0,) if i % 97 == 0 else (1 + (i * 37) % 70,) for i in range(count)]


def test_launches_per_step_do_not_grow_with_the_tensor_count_and_match_the_reference():
    """10 and 600 tensors (empty, odd-sized, multi-chunk): the same two launches per step, while
    fused AdamW's multi_tensor_apply needs ceil(n/36)-style launches; the 600 match the reference."""
    counts = {}
    for count in (10, 600):
        (fast, opt_fast), (ref, opt_ref) = _pair([(_shapes(count), {})], torch.float32)
        per_step = []
        for t in range(1 if count > 100 else 2):  # (the interpreter takes ~10 ms per tensor and step)
            _set_grads(fast, t)
            _set_grads(ref, t)
            before = gpu.launches
            opt_fast.step()
            per_step.append(gpu.launches - before)
            opt_ref.step()
        _assert_params_close(fast, ref, TOLERANCE[torch.float32])
        _assert_states_close(opt_fast, fast, opt_ref, ref, TOLERANCE[torch.float32])
        counts[count] = (per_step, _fused_adamw_launches([math.prod(s) for s in _shapes(count)]))
    assert counts[10][0] == [2, 2] and counts[600][0] == [2]
    assert counts[10][1] == 1 and counts[600][1] == math.ceil(len([s for s in _shapes(600) if s != (0,)]) / 36)
    for count, (ours, adamw) in counts.items():
        assert max(ours) <= 2 * adamw, (count, ours, adamw)


# -- CUDA-graph safety ---------------------------------------------------------------------

# Ops that read a device value on the host (``.item()``, ``bool(t)``, ``.tolist()``), size an
# output by its data (a sync on CUDA), or upload host data (``torch.tensor(...)``).
_HOST_OPS = {
    "aten::_local_scalar_dense",
    "aten::is_nonzero",
    "aten::equal",
    "aten::item",
    "aten::nonzero",
    "aten::masked_select",
    "aten::unique",
    "aten::_unique2",
    "aten::lift_fresh",
    "aten::repeat_interleave",
}


class _HostReadDetector(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every aten op outside kernel launches, and those of :data:`_HOST_OPS`."""

    def __init__(self):
        super().__init__()
        self.ops, self.host = [], []
        self.in_launch = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.in_launch:
            name = func._schema.name
            self.ops.append(name)
            if name in _HOST_OPS:
                self.host.append(name)
        return func(*args, **(kwargs or {}))


def test_capturable_step_reads_no_device_value_on_the_host_and_uploads_nothing(monkeypatch):
    """What this proves: in the steady state (after one warm-up step) the host side of the
    Triton step, i.e. every torch op around the kernel launches, is free of host reads of
    device values (``.item()``, ``bool()``, ``.tolist()``, data-dependent shapes) and of
    host-to-device uploads, with diagnostics on, a tensor lr and non-finite gradients; so it
    neither syncs nor branches in Python on tensor values, which a CUDA graph capture requires.
    The kernels themselves are plain launches with fixed grids; that a captured graph replays
    to the same numbers is checked on a GPU (``test_cuda_graph_replay_equals_eager_steps``)."""
    detector = _HostReadDetector()
    launch = gpu._launch

    def launch_outside_detection(*args, **kwargs):
        detector.in_launch = True
        try:
            return launch(*args, **kwargs)
        finally:
            detector.in_launch = False

    monkeypatch.setattr(gpu, "_launch", launch_outside_detection)
    lr = torch.tensor(0.01, device=DEVICE)
    ps = [torch.nn.Parameter(w.to(DEVICE)) for w in _tensors([(70,), (0,), (5,), (9,)], torch.float32)]
    for estimator in ESTIMATORS:
        opt = TrainableOptimizer(ps, lr=lr, estimator=estimator, capturable=True, diagnostics=True)
        _set_grads(ps, 0)
        opt.step()  # warm-up: creates the state and uploads the tables
        assert all(opt.state[p]["step"].device == ps[0].device for p in ps)
        for t in range(1, 4):
            _set_grads(ps, t, nonfinite={0: "some", 3: "all"} if t == 2 else None, in_place=True)
            with detector:
                opt.step()
        assert detector.ops, "the detector saw nothing"
        assert detector.host == [], f"{estimator}: host reads or uploads in the step: {detector.host}"
        lr.mul_(0.5)  # a schedule writes the tensor lr in place; the next steps read it
    assert opt.state[ps[3]]["step"].item() == 3  # skipped once (all non-finite), no host read needed


def test_capturable_is_accepted_on_cpu_paths_and_steps_the_same_numbers(monkeypatch):
    monkeypatch.setattr(gpu, "INTERPRET_ON_CPU", False)  # the CPU's own paths
    monkeypatch.delenv("HF_TO_NATIVE")
    for fused in (None, False):  # the C kernel, the readable path
        results = []
        for capturable in (False, True):
            ps = [torch.nn.Parameter(w) for w in _tensors([(70,), (5,)], torch.float32)]
            opt = TrainableOptimizer(ps, lr=0.01, capturable=capturable, fused=fused)
            _run([(ps, opt)], 5)
            results.append(torch.cat([p.detach().reshape(-1) for p in ps]))
        assert torch.equal(results[0], results[1]), fused


def test_invalid_capturable_raises_value_error():
    with pytest.raises(ValueError, match="Invalid capturable"):
        TrainableOptimizer([torch.nn.Parameter(torch.zeros(2))], capturable="yes")


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_graph_replay_equals_eager_steps():
    """The step captured once in a CUDA graph and replayed equals the same steps run eagerly."""
    shapes = [(70,), (0,), (4097,), (9, 3)]
    results = []
    for graphed in (False, True):
        ps = [torch.nn.Parameter(w.cuda()) for w in _tensors(shapes, torch.float32)]
        grads = [torch.zeros_like(p) for p in ps]
        for p, g in zip(ps, grads):
            p.grad = g
        opt = TrainableOptimizer(ps, lr=torch.tensor(0.01, device="cuda"), capturable=True)

        def load(t, ps=ps, grads=grads):
            gen = torch.Generator().manual_seed(t)
            for p, g in zip(ps, grads):
                g.copy_(0.5 * p.detach() + torch.randn(p.shape, generator=gen).cuda())

        load(0)
        opt.step()  # warm-up step outside the graph
        if graphed:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(stream), torch.cuda.graph(graph):
                opt.step()
            torch.cuda.current_stream().wait_stream(stream)
            # the capture did not run the step: replay it for steps 1..5
            for t in range(1, 6):
                load(t)
                graph.replay()
        else:
            for t in range(1, 6):
                load(t)
                opt.step()
        torch.cuda.synchronize()
        results.append(([p.detach().clone() for p in ps], [opt.state[p]["step"].item() for p in ps]))
    (eager, steps_eager), (replayed, steps_replayed) = results
    assert steps_eager == steps_replayed == [6.0] * len(shapes)
    for a, b in zip(eager, replayed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_group_the_kernels_cannot_step_takes_the_readable_path_and_strided_gradients_are_copied():
    base = _tensors([(5, 3), (4, 6)], torch.float32)
    fast = [torch.nn.Parameter(base[0].clone().t().to(DEVICE)), torch.nn.Parameter(base[1].clone().to(DEVICE))]
    ref = [torch.nn.Parameter(base[0].clone().t().to(DEVICE)), torch.nn.Parameter(base[1].clone().to(DEVICE))]
    opt_strided = TrainableOptimizer([fast[0]], lr=0.01)  # a non-contiguous parameter
    opt_fast = TrainableOptimizer([fast[1]], lr=0.01)
    opt_ref = ReferenceTrainableOptimizer(ref, lr=0.01)
    launches = gpu.launches
    for t in range(4):
        _set_grads(fast, t)
        _set_grads(ref, t)
        fast[1].grad = fast[1].grad.t().contiguous().t()  # a strided gradient
        assert not fast[1].grad.is_contiguous()
        opt_strided.step()
        opt_fast.step()
        opt_ref.step()
    assert gpu.launches - launches == 4 * 2  # only the contiguous parameter's group
    _assert_params_close(fast, ref, TOLERANCE[torch.float32])


@pytest.mark.parametrize(
    ("dtype", "state_dtype"), [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)], ids=str
)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_entries_not_stepped_keep_every_bit(estimator, dtype, state_dtype):
    """Bad entries (diagonal/none), a skipped tensor (rank-one: any bad entry; all: every entry
    bad) keep weight and state bit for bit, also through bfloat16 rounding; the rest moves."""
    ps = [torch.nn.Parameter(w.to(DEVICE)) for w in _tensors([(70,), (9,)], dtype)]
    opt = TrainableOptimizer(ps, lr=0.01, estimator=estimator, state_dtype=state_dtype, weight_decay=0.1)
    for t in range(2):
        _set_grads(ps, t)
        opt.step()
    before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in ps]
    _set_grads(ps, 2, nonfinite={0: "some", 1: "all"})
    bad = [~torch.isfinite(p.grad) for p in ps]
    opt.step()
    for i, (p, (w0, s0)) in enumerate(zip(ps, before)):
        kept = torch.ones_like(bad[i]) if (i == 1 or estimator == "rank_one") else bad[i]
        assert torch.equal(p.detach()[kept], w0[kept])
        assert not torch.equal(p.detach()[~kept], w0[~kept]) or not (~kept).any()
        for key, value in opt.state[p].items():
            if key == "step":
                assert value.item() == (2.0 if kept.all() else 3.0)
            else:
                assert torch.equal(value[kept], s0[key][kept]), key


FORMS_OF_MAIN = {
    "adam_warmup": {"beta_warmup": "adam", "weight_decay": 0.1},
    "nesterov": {"nesterov": True, "weight_decay": 0.1},
    "nesterov_rank_one": {"nesterov": True, "beta_warmup": "adam"},
    "lookahead": {"nesterov": 0.55, "weight_decay": 0.1},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("form", sorted(FORMS_OF_MAIN))
def test_adam_warmup_nesterov_and_lookahead_forms_equal_the_reference_over_50_steps(form, dtype):
    estimator = "none" if form == "adam_warmup" and dtype == torch.bfloat16 else "diagonal"
    estimator = "rank_one" if form == "nesterov_rank_one" else estimator
    groups = [([(0,), (9, 11), (7,)], FORMS_OF_MAIN[form])]
    (fast, opt_fast), (ref, opt_ref) = _pair(groups, dtype, estimator=estimator)
    launches = gpu.launches
    _run([(fast, opt_fast), (ref, opt_ref)], 50, nonfinite_at=20, nonfinite={1: "some"})
    assert gpu.launches - launches == 50 * 2
    # The tolerances of tests/test_estimator_forms.py (readable path against the reference).
    tol = {torch.float32: 1e-4, torch.bfloat16: 1e-2}[dtype]
    _assert_params_close(fast, ref, dict(rtol=tol, atol=tol))
    if dtype == torch.float32:
        _assert_states_close(opt_fast, fast, opt_ref, ref, dict(rtol=tol, atol=tol))


@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
def test_tuned_beta_on_the_triton_step_equals_its_prototype_over_50_steps(dtype, monkeypatch):
    """``tune_beta`` (hf_to.tuning, around the step whatever its path) with the Triton step equals
    the prototype's hooks (recipes/experiments/tangent_beta.py) on the readable path."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes" / "experiments"))
    import tangent_beta

    from hf_to import tuning

    monkeypatch.setattr(tuning, "group_stride", lambda group: 2)
    runs = []
    for keyword in (True, False):
        params = [torch.nn.Parameter(t.to(DEVICE)) for t in _tensors([(9, 11), (7,)], dtype)]
        opt = TrainableOptimizer(
            params, lr=1e-2, weight_decay=0.1, fused=None if keyword else False, tune_beta=1.0 if keyword else 0.0
        )
        if not keyword:
            tangent_beta.TangentBeta(1.0, mus=(tuning.DISCOUNT,), stride=2).attach(opt)
        gen, betas = torch.Generator().manual_seed(1), []
        launches = gpu.launches
        for t in range(50):
            for p in params:
                noise = 0.3 if t % 40 < 20 else 0.01
                p.grad = (p.detach().float() * 0.5 + noise * torch.randn(p.shape, generator=gen).to(DEVICE)).to(dtype)
            opt.step()
            betas.append(opt.param_groups[0]["beta"])
        assert (gpu.launches - launches == 100) == keyword  # the keyword's run took the Triton step
        runs.append((params, betas))
    (fast, fast_betas), (ref, ref_betas) = runs
    assert max(abs(a - b) for a, b in zip(fast_betas, ref_betas)) <= 1e-5 and len(set(fast_betas)) > 10
    _assert_params_close(fast, ref, TOLERANCE[dtype])
