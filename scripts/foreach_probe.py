"""Would a multi-tensor (torch._foreach_*) step beat the per-tensor path on CPU? A probe.

Times, on the LoRA adapter set of SmolLM2-135M (420 tensors, single thread), the readable
per-tensor TO step, fused and foreach AdamW, and a foreach transcription of the default
diagonal step (no skip handling: a lower bound on a real foreach path's cost).

    PYTHONPATH=. python scripts/foreach_probe.py
"""

import statistics
import time

import torch

torch.set_num_threads(1)
from hf_to import TrainableOptimizer
from hf_to.bench import lora_shapes

shapes = lora_shapes()
ps = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
for p in ps:
    p.grad = torch.randn_like(p) * 1e-3


def bench(opt, n=20):
    opt.step()
    opt.step()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        opt.step()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


print("readable", bench(TrainableOptimizer(ps, lr=1e-4, fused=False)))
print("adamw fused", bench(torch.optim.AdamW(ps, lr=1e-4, fused=True)))
print("adamw foreach", bench(torch.optim.AdamW(ps, lr=1e-4, foreach=True)))
# foreach prototype of the diagonal + adam step (no skip handling)
ws = [p.data.view(-1) for p in ps]
gs = [p.grad.view(-1) for p in ps]
a = [torch.zeros_like(w) for w in ws]
b = [g.clone() for g in gs]
v = [g * g for g in gs]
ns = [w.numel() for w in ws]


def fe_step(alpha=0.1, beta=0.1, beta2=0.999, eps=1e-8, lr=1e-4, floor=1e-3, t=10):
    sent = torch._foreach_norm(gs, 1)
    ww = torch._foreach_norm(ws, 2)
    flags = torch.isfinite(torch.stack(sent)).tolist()
    wwl = [(x * x / n).item() + floor for x, n in zip(ww, ns)]
    r = torch._foreach_mul(a, ws)
    torch._foreach_add_(r, b)
    torch._foreach_sub_(r, gs)
    d = torch._foreach_mul(ws, ws)
    torch._foreach_add_(d, wwl)
    rw = torch._foreach_mul(r, ws)
    torch._foreach_div_(rw, d)
    torch._foreach_add_(a, rw, alpha=-alpha)
    torch._foreach_add_(b, r, alpha=-beta)
    gh = torch._foreach_mul(a, ws)
    torch._foreach_add_(gh, b)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, gs, gs, value=1 - beta2)
    den = torch._foreach_div(v, 1 - beta2**t)
    torch._foreach_sqrt_(den)
    torch._foreach_add_(den, eps)
    torch._foreach_div_(gh, den)
    torch._foreach_add_(ws, gh, alpha=-lr)


for _ in range(2):
    fe_step()
ts = []
for _ in range(20):
    t = time.perf_counter()
    fe_step()
    ts.append(time.perf_counter() - t)
print("foreach proto", statistics.median(ts) * 1e3)
