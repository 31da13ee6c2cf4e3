r"""Prototype: one intercept rate β tuned on the training loss over a long horizon (forward tangent).

The one-step hypergradient of β (``hyper_rates.py``) raised β on every task, the proxy's full
fine-tuning included, because a greedy view rewards moving the estimate toward the fresh gradient
(Wu et al. 2018's short-horizon bias).  Here the derivative of the weights with respect to β is
carried forward through the whole trajectory instead of one step (forward mode, as real-time
recurrent learning and MARTHE, Donini et al. 2020, do for the learning rate), with the
Hessian-free approximation :math:`\partial g/\partial\beta \approx 0` and a discount μ that
stands in for the contraction the Hessian would apply.  For the folded default (per coordinate
rate :math:`k_t = \beta_t + \alpha\rho`, look-ahead weight λ, Adam's denominator
:math:`D_t = \sqrt{\hat v_{t+1}} + \epsilon`):

.. math::
    b_t = b_{t-1} - k_t (b_{t-1} - g_t) &\ \Rightarrow\
        \dot b_t = (1-k_t)\,\dot b_{t-1} - \beta'_t\,(b_{t-1} - g_t), \\
    w_{t+1} = (1-\gamma_t\omega) w_t - \gamma_t\big((1-\lambda) b_t + \lambda g_t\big)/D_t
        &\ \Rightarrow\ \dot w_{t+1} = \mu(1-\gamma_t\omega)\,\dot w_t - \gamma_t (1-\lambda)\,\dot b_t / D_t,

with :math:`\beta'_t = \partial\beta_t/\partial\beta` (Adam's bias correction written as a rate)
and :math:`dL_{t+1}/d\beta \approx g_{t+1}\cdot\dot w_{t+1}`.  Before each step,

.. math::
    \log\beta \leftarrow \mathrm{clip}\big(\log\beta - \kappa\cos(g_{t+1}, \dot w_{t+1}),\
    \log 0.02,\ \log 0.6\big),

one β for the optimizer, the cosine taken over every tensor at once (a shared rate's derivative
is the sum over tensors).  The tangents are kept on every ``stride``-th coordinate only (an
unbiased subsample of the sum: 8/stride bytes per parameter), beside the optimizer, through step
hooks: any path (the C kernel included) steps the weights.  With κ = 0 it only watches: the
cosines of several μ are recorded at the default β, which is the diagnostic phase.

The exactness test (``check``): on a loss linear in w with a fixed gradient sequence (the
Hessian is zero, so the Hessian-free tangent with μ = 1 is the true derivative), the
accumulated :math:`\sum_t g_{t+1}\cdot\dot w_{t+1}` equals the central finite difference of the
loss in β, for ``estimator="none"``.

Phases::

    .venv/bin/python recipes/experiments/tangent_beta.py check
    .venv/bin/python recipes/experiments/tangent_beta.py run --model real --steps 300 --tasks pydoc_lora pydoc_full \
        --seeds 0 --variants watch beta02
    .venv/bin/python recipes/experiments/tangent_beta.py report

The keyword ``tune_beta`` (:mod:`hf_to.tuning`) is this controller with κ = 1, μ = 0.99 and the
group's stride (every 64th coordinate in a group of 262,144 values or more: variant
``tangent_s64``; the keyword's first version kept at most 4,096 per tensor: variant ``tangent``),
one β per param group; tests/test_tuning.py checks that it equals these hooks.  Result
(2026-12-08, SmolLM2-135M, 300 steps, 3 seeds; the exact commands in recipes/README.md,
``recipes/results/tangent-beta-2026-12-08/``): β rises to 0.6 on LoRA (test −0.0013…−0.0027
against the default with either sampling, ahead of NAdamW, AdamW and schedule-free AdamW in every
seed) and falls on full fine-tuning (level with the default on test); at 1,000 steps of LoRA (3 seeds) it
falls back to 0.02–0.05 as the learning rate decays and ends +0.0018 behind AdamW's test loss on
average.  Kept as an opt-in keyword, not the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "recipes"))
sys.path.insert(0, str(ROOT / "recipes/experiments"))
sys.path.insert(0, str(ROOT))

import long_runs  # noqa: E402
import study  # noqa: E402
import study_runner  # noqa: E402

from hf_to.forms import intercept_rate  # noqa: E402

BETA_RANGE = (0.02, 0.6)
#: The discounts whose cosines are recorded in every run (the first one drives β when κ > 0).
MUS = (0.99, 1.0, 0.9, 0.0)
OUT = ROOT / "runs/tangent-beta"


def _dbeta_t(beta: float, t: float, warmup: bool | str) -> float:
    """∂β_t/∂β by a central difference (β_t = ``intercept_rate``; 1 after the first few steps)."""
    h = 1e-5 * beta
    return (intercept_rate(beta + h, t, warmup) - intercept_rate(beta - h, t, warmup)) / (2 * h)


class TangentBeta:
    """The controller: attach it to a :class:`hf_to.TrainableOptimizer` (see the module)."""

    def __init__(
        self, kappa: float = 0.0, mus: tuple[float, ...] = MUS, stride: int = 8, samples: int | None = None
    ) -> None:
        self.kappa, self.mus, self.stride, self.samples = kappa, mus, stride, samples
        self.beta: float | None = None
        self.tan: dict[int, dict[str, Any]] = {}  # id(p) → ḃ, ẇ per μ, and the pre-step b, w
        self.cos_hist: dict[float, list[float]] = {mu: [] for mu in mus}
        self.beta_hist: list[float] = []
        self.hyper_sum: dict[float, float] = dict.fromkeys(mus, 0.0)

    def attach(self, opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
        opt.register_step_pre_hook(self._before)
        opt.register_step_post_hook(self._after)
        return opt

    def _sub(self, x: torch.Tensor) -> torch.Tensor:
        """A float32 copy of every ``stride``-th element (a copy: the step updates b and w in place);
        with ``samples``, the stride is ⌈n / samples⌉ per tensor (at most that many per tensor)."""
        stride = self.stride if self.samples is None else -(-x.numel() // self.samples)
        return x.detach().reshape(-1)[::stride].to(torch.float32, copy=True)

    def _before(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        num = dict.fromkeys(self.mus, 0.0)
        gg = 0.0
        ww = dict.fromkeys(self.mus, 0.0)
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = self._sub(p.grad)
                tan = self.tan.get(id(p))
                if tan is not None:
                    gg += float(torch.dot(g, g))
                    for mu in self.mus:
                        wd = tan["w_dot"][mu]
                        num[mu] += float(torch.dot(g, wd))
                        ww[mu] += float(torch.dot(wd, wd))
                else:
                    tan = self.tan[id(p)] = {
                        "b_dot": torch.zeros_like(g),
                        "w_dot": {mu: torch.zeros_like(g) for mu in self.mus},
                    }
                state = opt.state.get(p) or {}
                tan["b_prev"] = self._sub(state["b"]) if "b" in state else None
                tan["w_prev"] = self._sub(p)
                tan["w_ms"] = float(p.detach().float().pow(2).mean())
        if self.beta is None:
            self.beta = opt.param_groups[0]["beta"]
        for mu in self.mus:
            self.hyper_sum[mu] += num[mu]
            scale = math.sqrt(gg * ww[mu])
            self.cos_hist[mu].append(num[mu] / scale if scale > 0 else 0.0)
        if self.kappa and self.cos_hist[self.mus[0]]:
            lo, hi = (math.log(x) for x in BETA_RANGE)
            c = self.cos_hist[self.mus[0]][-1]
            self.beta = math.exp(min(hi, max(lo, math.log(self.beta) - self.kappa * c)))
        for group in opt.param_groups:
            group["beta"] = self.beta
        self.beta_hist.append(self.beta)

    def _after(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group in opt.param_groups:
            lam = group["nesterov"]
            lam = (0.0 if lam is False else None) if isinstance(lam, bool) else float(lam)
            for p in group["params"]:
                tan, state = self.tan.get(id(p)), opt.state.get(p)
                if tan is None or not state or p.grad is None:
                    continue
                t = float(state["step"])
                beta_t = intercept_rate(group["beta"], t, group["beta_warmup"])
                d_beta_t = _dbeta_t(group["beta"], t, group["beta_warmup"])
                g = self._sub(p.grad)
                w = tan["w_prev"]
                rate = torch.full_like(w, beta_t)
                if group["estimator"] == "folded" and group["alpha_scaling"] == "normalized":
                    rate += group["alpha"] * w * w / (w * w + (tan["w_ms"] + group["norm_floor"] + 1e-30))
                elif group["estimator"] == "folded":
                    rate += group["alpha"] * w * w
                if tan["b_prev"] is not None:
                    tan["b_dot"].mul_(1 - rate).sub_(d_beta_t * (tan["b_prev"] - g))
                weight = 1 - (beta_t if lam is None else lam)
                v = self._sub(state["exp_avg_sq"]) / (1 - group["beta2"] ** t)
                push = tan["b_dot"] * (group["lr"] * weight) / (v.sqrt() + group["eps"])
                decay = 1 - group["lr"] * group["weight_decay"]
                for mu in self.mus:
                    tan["w_dot"][mu].mul_(mu * decay).sub_(push)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"beta_final": self.beta, "beta_hist": [round(b, 4) for b in self.beta_hist[::10]]}
        for mu, hist in self.cos_hist.items():
            n = len(hist)
            thirds = [hist[i * n // 3 : (i + 1) * n // 3] for i in range(3)]
            out[f"cos_mu{mu}"] = [round(statistics.fmean(h), 5) if h else None for h in thirds]
            out[f"cos_mu{mu}_hist"] = [round(statistics.fmean(hist[i : i + 10]), 5) for i in range(0, n, 10)]
            out[f"hyper_sum_mu{mu}"] = self.hyper_sum[mu]
        return out


# -- the exactness check -------------------------------------------------------------------------


def check(steps: int = 60, n: int = 512, beta: float = 0.1, lr: float = 1e-2) -> dict[str, float]:
    """Hessian-free tangent (μ = 1) vs the finite difference of a loss linear in w (``none``)."""
    from hf_to import TrainableOptimizer

    gen = torch.Generator().manual_seed(0)
    c = torch.randn(n, generator=gen)
    grads = [c + 2.0 * torch.randn(n, generator=gen) for _ in range(steps + 1)]

    def final_loss(b: float, watch: TangentBeta | None = None) -> float:
        p = torch.nn.Parameter(torch.zeros(n))
        opt = TrainableOptimizer([p], lr=lr, beta=b, estimator="none", weight_decay=0.1)
        if watch is not None:
            watch.attach(opt)
        for t in range(steps):
            p.grad = grads[t].clone()
            opt.step()
        return float(torch.dot(c, p.detach()))

    watch = TangentBeta(0.0, mus=(1.0,), stride=1)
    final_loss(beta, watch)
    # the tangent of the final weights, paired with the true (mean) gradient c of the linear loss
    tangent = sum(float(torch.dot(c, t["w_dot"][1.0])) for t in watch.tan.values())
    h = 1e-4
    fd = (final_loss(beta + h) - final_loss(beta - h)) / (2 * h)
    print(f"dL/dβ: forward tangent {tangent:.6f}, finite difference {fd:.6f}")
    return {"tangent": tangent, "finite_difference": fd}


#: SmolLM2-135M's trainable shapes: full fine-tuning (30 layers of 7 matrices and 2 norms) and
#: LoRA r = 8 on q/k/v/o (30 layers of 4 pairs of A, B).
COST_SHAPES = {
    "full": [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536), (576,), (576,)],
    "lora": [(8, 576), (576, 8), (8, 576), (192, 8), (8, 576), (192, 8), (8, 576), (576, 8)],
}


def cost(steps: int = 12) -> dict[tuple[str, bool], list[float]]:
    """Step time with and without ``tune_beta`` on SmolLM2-135M's trainable shapes (random
    values, one thread): seconds per step after the first, for full fine-tuning and LoRA."""
    import time

    from hf_to import TrainableOptimizer, tuning

    torch.set_num_threads(1)
    out = {}
    for name, layer in COST_SHAPES.items():
        params = [torch.nn.Parameter(torch.randn(*s) * 0.02) for _ in range(30) for s in layer]
        for tune in (False, True):
            opt = TrainableOptimizer(params, lr=1e-5, tune_beta=1.0 if tune else 0.0)
            for p in params:
                p.grad = torch.randn_like(p) * 1e-3
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - start)
            out[name, tune] = times[1:]
            numel = sum(p.numel() for p in params)
            tangents = sum(opt.state[p][k].numel() * 4 for p in params for k in tuning.STATE_KEYS) if tune else 0
            print(
                f"{name} ({len(params)} tensors, {numel / 1e6:.2f} M values), tune_beta={'1.0' if tune else '0'}: "
                f"step {1e3 * min(times[1:]):.1f}–{1e3 * max(times[1:]):.1f} ms "
                f"(median {1e3 * statistics.median(times[1:]):.1f}); tangents {tangents / numel:.3f} B/param"
            )
    return out


# -- runs ------------------------------------------------------------------------------------------

#: Variants: the controller's κ (None: no controller) and the optimizer's overrides.
VARIANTS: dict[str, tuple[float | None, dict[str, Any]]] = {
    "watch": (0.0, {}),
    "beta02": (None, {"beta": 0.2}),
    "beta005": (None, {"beta": 0.05}),
    "tangent_k1": (1.0, {}),
    "tangent_k3": (3.0, {}),
    "tangent": (1.0, {}),
    "tangent_s64": (1.0, {}),
}
#: How a variant samples the tangents' coordinates (default: every 8th): ``tangent`` as the
#: keyword does (at most 4,096 per tensor, 4 B per parameter on SmolLM2's LoRA tensors),
#: ``tangent_s64`` every 64th coordinate of every tensor (0.125 B per parameter; the group's
#: sums sampled uniformly, where the per-tensor cap weighs small tensors more).
SAMPLING = {"tangent": {"samples": 4096}, "tangent_s64": {"stride": 64}}
BASE = long_runs.EXTRA["to_lookahead_folded"]


def run(args: argparse.Namespace) -> None:
    out = args.out / "runs.jsonl"
    done = long_runs.done_runs(out, "variant")
    torch.set_num_threads(args.threads)
    build = study_runner.build_optimizer
    for name in args.tasks:
        task = dataclasses.replace(study.TASKS[name], steps=args.steps)
        lr = long_runs.dropin_lr(name, args.model)
        for seed in args.seeds:
            for variant in args.variants:
                if (name, seed, variant) in done:
                    continue
                kappa, overrides = VARIANTS[variant]
                watch = TangentBeta(kappa, **SAMPLING.get(variant, {})) if kappa is not None else None
                if watch is not None:
                    study_runner.build_optimizer = lambda *a, _w=watch, **k: _w.attach(build(*a, **k))
                try:
                    with long_runs.CPU_LOCK.open("w") as lock:
                        fcntl.flock(lock, fcntl.LOCK_EX)
                        rec = study.run_one(task, args.model, BASE, lr, seed, overrides, eval_every=args.eval_every)
                finally:
                    study_runner.build_optimizer = build
                rec.pop("train_losses", None)
                rec.update(variant=variant, steps=args.steps, **(watch.summary() if watch else {}))
                with out.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                extra = f" β {watch.beta:.3f} cos(μ) {[rec[f'cos_mu{mu}'] for mu in MUS]}" if watch else ""
                print(
                    f"{name} seed {seed} {variant}: val {rec['final_val']:.4f} test {rec['test']:.4f}{extra}",
                    flush=True,
                )


#: The references each variant is paired with: SmolLM2-135M at 300 steps, seeds 0–2, the same
#: drop-in rates, schedule and data order (the folded default there is ``to_lookahead_folded``).
STORED_REAL = {
    300: ROOT / "recipes/results/long-runs-real-2026-12-06/runs.jsonl",
    1000: ROOT / "recipes/results/long-runs-real-1000-2026-12-07/runs.jsonl",
}
PEERS = {"default": "to_lookahead_folded", "AdamW": "adamw", "NAdamW": "nadamw", "SF-AdamW": "sf_adamw"}


def report(args: argparse.Namespace) -> str:
    runs = [json.loads(line) for line in (args.out / "runs.jsonl").read_text().splitlines()]
    stored = [json.loads(line) for line in STORED_REAL[args.steps].read_text().splitlines()]
    ref = {(r["task"], r["seed"], r["config"]): r for r in stored if r["steps"] == args.steps}
    lines = []
    for task in sorted({r["task"] for r in runs}):
        lines += [f"### {task}, SmolLM2-135M, {args.steps} steps", ""]
        lines += [
            "| variant | seeds | val − "
            + " | val − ".join(PEERS)
            + " | test − "
            + " | test − ".join(PEERS)
            + " | β every 100 steps (per seed) |"
        ]
        lines += ["|---|---|" + "---|" * (2 * len(PEERS) + 1)]
        for variant in VARIANTS:
            mine = sorted((r for r in runs if r["task"] == task and r["variant"] == variant), key=lambda r: r["seed"])
            mine = [r for r in mine if r["steps"] == args.steps]
            if not mine:
                continue
            cells = []
            for key in ("final_val", "test"):
                for config in PEERS.values():
                    if not all((task, r["seed"], config) in ref for r in mine):
                        cells.append("n/a")  # no stored run of this peer for every seed
                        continue
                    diff = [r[key] - ref[task, r["seed"], config][key] for r in mine]
                    mean = f" (mean {statistics.fmean(diff):+.4f})" if len(diff) > 1 else ""
                    cells.append(" ".join(f"{d:+.4f}" for d in diff) + mean)
            betas = " ; ".join(
                "/".join(f"{b:.2f}" for b in r["beta_hist"][::10] + r["beta_hist"][-1:])
                if "beta_hist" in r
                else "fixed"
                for r in mine
            )
            lines.append(
                f"| {variant} | {' '.join(str(r['seed']) for r in mine)} | " + " | ".join(cells) + f" | {betas} |"
            )
        lines.append("")
        for r in runs:
            if r["task"] == task and "cos_mu0.99" in r:
                cos = ", ".join(f"μ {mu}: {'/'.join(f'{c:+.4f}' for c in r[f'cos_mu{mu}'])}" for mu in MUS)
                lines.append(f"- {r['variant']} seed {r['seed']}: mean cos(g_t+1, ẇ_t+1) over the run's thirds, {cos}")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("phase", choices=["check", "run", "report", "cost"])
    ap.add_argument("--model", choices=["proxy", "real"], default="real")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--tasks", nargs="+", default=["pydoc_lora", "pydoc_full"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="+", default=["watch"], choices=list(VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.phase == "check":
        check()
    elif args.phase == "cost":
        cost()
    elif args.phase == "report":
        (args.out / "REPORT.md").write_text(report(args))
    else:
        run(args)


if __name__ == "__main__":
    main()
