"""Fuzz test of the native C kernel against the readable path (``fused=False``).

Each case draws, from its own seed, an optimizer configuration (estimator, preconditioner,
weight decay, slope-rate scaling, warm-up, parameter and state dtypes) and a handful of
tensors (empty, one element, odd sizes, sizes across the kernel's 2048-element blocks, now
and then one across rank-one's 2**17-element chunk; some 2-D, some non-contiguous), then steps two
optimizers side by side for a few steps with the same gradients: gradients that come and go
(``None``), non-contiguous gradients, non-finite entries, and between steps the writes a
training loop makes: in place on the parameter under ``no_grad``, a new storage through
``p.data = ...`` (both must match the readable path), a write through ``p.data`` (not
supported by the native path: its carried sums may go stale, so the case only checks that
nothing breaks from there on), and shrinking or swapping a parameter or a state tensor
through ``.data``, which the native step must refuse before its kernel runs.  Each step of
the native side runs with a drawn thread count (1 to 3), a third optimizer always with one
thread: the two must agree bit for bit.

``HF_TO_FUZZ_CASES`` (default 200, a few seconds) sets the number of cases, and
``HF_TO_FUZZ_SEED`` (default 0) the first seed: ``HF_TO_FUZZ_CASES=20000 pytest
tests/test_native_fuzz.py`` for a long run.  A failing case names its seed.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from hf_to import TrainableOptimizer, native

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: hf_to.native cannot be built")

CASES = int(os.environ.get("HF_TO_FUZZ_CASES", "200"))
FIRST_SEED = int(os.environ.get("HF_TO_FUZZ_SEED", "0"))

SIZES = [0, 1, 2, 3, 7, 31, 100, 257, 2047, 2048, 2049, 4095, 4097, 6145]
CHUNK_SIZES = [(1 << 17) + 3, (1 << 20) + 3]  # across rank-one's chunk (2**17 elements), and a larger one
TOLERANCE = {
    torch.float32: dict(rtol=1e-3, atol=1e-4),  # rtol: unnormalised rank-one after a 1e20 spike
    torch.bfloat16: dict(rtol=2**-6, atol=2e-2),
    torch.float16: dict(rtol=2**-9, atol=2e-3),
}
# bfloat16 state is rounded stochastically by both paths from the same hash; float32
# arithmetic in another order can flip a rounding, one bfloat16 ulp.
BF16_STATE_TOLERANCE = dict(rtol=2**-6, atol=2e-3)


@pytest.fixture(autouse=True)
def _plain_environment(monkeypatch):
    monkeypatch.delenv("HF_TO_NATIVE", raising=False)
    monkeypatch.setenv("HF_TO_COMPILE", "0")  # bfloat16 state on the readable side: eager kernels


def _config(rng: random.Random) -> dict:
    pdtypes = [torch.float32, torch.float32, torch.bfloat16]
    if native._load() is not None and native._load().to_has_float16():
        pdtypes.append(torch.float16)
    return dict(
        estimator=rng.choice(["diagonal", "diagonal", "rank_one", "none"]),
        preconditioner=rng.choice(["adam", "adam", "none"]),
        weight_decay=rng.choice([0.0, 0.1]),
        alpha_scaling=rng.choice(["normalized", "normalized", "none"]),
        beta_warmup=rng.choice([True, True, "adam", "adam", False]),
        pdtype=rng.choice(pdtypes),
        state_dtype=rng.choice([None, None, torch.bfloat16]),
        nesterov=rng.random() < 0.3,
    )


def _tensors(rng: random.Random, gen: torch.Generator, dtype: torch.dtype) -> list[torch.Tensor]:
    out = []
    for _ in range(rng.randint(1, 5)):
        n = rng.choice(CHUNK_SIZES) if rng.random() < 0.02 else rng.choice(SIZES)
        if n > 1 and rng.random() < 0.3:  # 2-D, sometimes a non-contiguous view
            rows = rng.choice([d for d in (2, 3, 7) if n % d == 0] or [1])
            shape = (rows, n // rows)
        else:
            shape = (n,)
        w = torch.randn(shape, generator=gen)
        if len(shape) == 2 and rng.random() < 0.1:
            w = torch.randn(shape[1], shape[0], generator=gen).t()  # non-contiguous parameter
        out.append(w.to(dtype))
    return out


def _grad(rng: random.Random, gen: torch.Generator, p: torch.Tensor, spikes: bool) -> torch.Tensor | None:
    if rng.random() < 0.2:
        return None
    g = (0.5 * p.detach().float() + torch.randn(p.shape, generator=gen)).contiguous()
    if p.numel() and rng.random() < 0.1:  # non-finite entries, now and then all of them
        if rng.random() < 0.2:
            g.fill_(float("nan"))
        else:
            for _ in range(rng.randint(1, 3)):
                g.view(-1)[rng.randrange(p.numel())] = rng.choice([float("inf"), -float("inf"), float("nan")])
    if spikes and rng.random() < 0.05:
        g = g * 1e20  # a spike: the second moment must stay finite
    if p.dim() == 2 and rng.random() < 0.1:
        g = g.t().contiguous().t()  # the same values, non-contiguous
    return g.to(p.dtype)


def _close(fast, slow, tol, where) -> None:
    torch.testing.assert_close(
        fast.detach().float(), slow.detach().float(), **tol, equal_nan=True, msg=lambda m: f"{m}\n{where}"
    )


@pytest.mark.parametrize("seed", range(FIRST_SEED, FIRST_SEED + CASES))
def test_native_kernel_matches_the_readable_path(seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = _config(rng)
    dtype = cfg.pop("pdtype")
    init = _tensors(rng, gen, dtype)
    if cfg["estimator"] == "rank_one" and cfg["alpha_scaling"] == "none":
        # The raw slope step of rank-one scales with |w|^2 ~ n: keep it stable, else both paths
        # overflow, at float32 rounding's whim, on different steps.
        cfg["alpha"] = 0.1 / max(1, *(w.numel() for w in init))
    fast = [torch.nn.Parameter(w.clone()) for w in init]  # clone keeps a transposed layout
    single = [torch.nn.Parameter(w.clone()) for w in init]  # the native side on one thread
    slow = [torch.nn.Parameter(w.clone()) for w in init]
    opt_fast = TrainableOptimizer(fast, lr=0.01, **cfg)
    opt_single = TrainableOptimizer(single, lr=0.01, **cfg)
    opt_slow = TrainableOptimizer(slow, lr=0.01, fused=False, **cfg)
    tol = TOLERANCE[dtype] if cfg["state_dtype"] is None else {**TOLERANCE[dtype], **BF16_STATE_TOLERANCE}
    exact = True  # False after a write through p.data: the native sums may be stale from there
    story = [f"seed {seed}: {cfg}, {dtype}, shapes {[tuple(w.shape) for w in init]}"]
    for step in range(rng.randint(2, 6)):
        for pf, ps in zip(fast, slow):
            # Spikes only where both paths handle them alike: with Adam's preconditioner (else a
            # 1e20 gradient is a 1e18 step), the normalised rate (the raw one takes a 1e20
            # residual into A) and not rank-one (an overflowing u'g skips the tensor in C and
            # turns it to NaN in the readable path).
            spikes = cfg["preconditioner"] == "adam" and cfg["alpha_scaling"] == "normalized"
            g = _grad(rng, gen, pf, spikes=spikes and cfg["estimator"] != "rank_one")
            pf.grad, ps.grad = g, (None if g is None else g.clone())
        for pf, p1 in zip(fast, single):
            p1.grad = None if pf.grad is None else pf.grad.clone()
        threads = rng.choice([1, 2, 3])
        story.append(
            f"step {step}: {threads} threads, grads {[None if p.grad is None else tuple(p.grad.stride()) for p in fast]}"
        )
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            opt_fast.step()
            torch.set_num_threads(1)
            opt_single.step()
        finally:
            torch.set_num_threads(before)
        for i, (pf, p1) in enumerate(zip(fast, single)):
            where = f"{'; '.join(story)}; tensor {i}: {threads} threads against one"
            bitwise = dict(rtol=0, atol=0, equal_nan=True, msg=lambda m, where=where: f"{m}\n{where}")
            torch.testing.assert_close(pf, p1, **bitwise)
            for key, value in opt_fast.state.get(pf, {}).items():
                torch.testing.assert_close(value, opt_single.state[p1][key], **bitwise)
        opt_slow.step()
        for i, (pf, ps) in enumerate(zip(fast, slow)):
            where = f"{'; '.join(story)}; tensor {i}"
            if exact:
                _close(pf, ps, tol, where)
                if opt_slow.state.get(ps):
                    assert opt_fast.state[pf]["step"] == opt_slow.state[ps]["step"], where
            else:  # stale sums at worst: still finite wherever the readable path is
                assert torch.isfinite(pf.detach()).eq(torch.isfinite(ps.detach())).all(), where
        event = rng.choice(["none"] * 6 + ["inplace", "reassign", "data_write", "shrink", "state_shrink", "swap"])
        i = rng.randrange(len(fast))
        story.append(f"event {event} on tensor {i}")
        if event == "inplace":  # supported: PyTorch bumps the version counter
            with torch.no_grad():
                fast[i].mul_(0.9)
                single[i].mul_(0.9)
                slow[i].mul_(0.9)
        elif event == "reassign":  # a new storage of the same size: the kernel follows it
            fast[i].data = fast[i].data.clone()
            single[i].data = single[i].data.clone()
            slow[i].data = slow[i].data.clone()
        elif event == "data_write":  # documented as unsupported on the native path
            fast[i].data.mul_(0.9)
            single[i].data.mul_(0.9)
            slow[i].data.mul_(0.9)
            exact = False
        elif event in ("shrink", "state_shrink", "swap") and opt_fast.state.get(fast[i]) and fast[i].numel() > 1:
            touched = [i]
            if event == "shrink":  # same pointer and version, fewer elements
                fast[i].data = fast[i].data.reshape(-1)[: fast[i].numel() // 2]
            elif event == "state_shrink":
                b = opt_fast.state[fast[i]]["b"]
                b.data = b.data.reshape(-1)[: b.numel() - 1]
            else:  # another tensor's state: sizes differ unless by chance
                j = rng.randrange(len(fast))
                if fast[j].numel() == fast[i].numel() or not opt_fast.state.get(fast[j]):
                    continue
                opt_fast.state[fast[i]], opt_fast.state[fast[j]] = opt_fast.state[fast[j]], opt_fast.state[fast[i]]
                touched.append(j)
            for p in fast:
                p.grad = torch.ones_like(p)
            # Tensor i has stepped, so it takes the native step unless its group cannot.
            native_path = (
                all(p.is_contiguous() for p in fast)
                and (dtype != torch.float16 or native._load().to_has_float16())
                and all(opt_fast.state[fast[t]]["step"] > 0 for t in touched)  # else the readable path
            )
            # The native step refuses before its kernel runs; the torch paths fail on the sizes.
            with pytest.raises(RuntimeError, match="does not fit" if native_path else None):
                opt_fast.step()
            return
