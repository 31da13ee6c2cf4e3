"""Would a multi-tensor (torch._foreach_*) step beat the per-tensor path on CPU? A probe.

Times, on the LoRA adapter set of SmolLM2-135M (420 tensors, single thread), the readable
per-tensor TO step, fused and foreach AdamW, and a foreach transcription of the default
diagonal step (the finite check is read but not acted on: a lower bound on a real foreach
path's cost).

    PYTHONPATH=. python scripts/foreach_probe.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from hf_to import TrainableOptimizer
from hf_to.bench import lora_shapes


def median_ms(step: Callable[[], object], n: int = 20) -> float:
    step()
    step()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def foreach_diagonal_step(ws, gs, a, b, v, *, alpha=0.1, beta=0.1, beta2=0.999, eps=1e-8, lr=1e-4, floor=1e-3, t=10):
    """The default diagonal + Adam step as a chain of foreach ops (no skipping)."""
    sentinels = torch._foreach_norm(gs, 1)
    torch.isfinite(torch.stack(sentinels)).tolist()  # the host read a real path needs
    norms = torch._foreach_norm(ws, 2)
    scales = [(x * x / w.numel()).item() + floor for x, w in zip(norms, ws)]
    r = torch._foreach_mul(a, ws)
    torch._foreach_add_(r, b)
    torch._foreach_sub_(r, gs)
    denom = torch._foreach_mul(ws, ws)
    torch._foreach_add_(denom, scales)
    rw = torch._foreach_mul(r, ws)
    torch._foreach_div_(rw, denom)
    torch._foreach_add_(a, rw, alpha=-alpha)
    torch._foreach_add_(b, r, alpha=-beta)
    g_hat = torch._foreach_mul(a, ws)
    torch._foreach_add_(g_hat, b)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, gs, gs, value=1 - beta2)
    den = torch._foreach_div(v, 1 - beta2**t)
    torch._foreach_sqrt_(den)
    torch._foreach_add_(den, eps)
    torch._foreach_div_(g_hat, den)
    torch._foreach_add_(ws, g_hat, alpha=-lr)


def main() -> None:
    torch.set_num_threads(1)
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in lora_shapes()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    for name, opt in (
        ("TO readable (per tensor)", TrainableOptimizer(params, lr=1e-4, fused=False)),
        ("AdamW fused", torch.optim.AdamW(params, lr=1e-4, fused=True)),
        ("AdamW foreach", torch.optim.AdamW(params, lr=1e-4, foreach=True)),
    ):
        print(f"{name:28s} {median_ms(opt.step):7.1f} ms")
    ws = [p.data.view(-1) for p in params]
    gs = [p.grad.view(-1) for p in params]
    a, b, v = [torch.zeros_like(w) for w in ws], [g.clone() for g in gs], [g * g for g in gs]
    print(f"{'TO foreach (prototype)':28s} {median_ms(lambda: foreach_diagonal_step(ws, gs, a, b, v)):7.1f} ms")


if __name__ == "__main__":
    main()
