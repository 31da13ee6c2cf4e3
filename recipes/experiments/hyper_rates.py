r"""Prototype: the slope rate α (and the intercept rate β) tuned per tensor on the training loss.

Issue 18.  The default diagonal form steps, per tensor (flat :math:`w`, gradient :math:`g`),

.. math::
    r = a\odot w + b - g,\quad q = r\odot w / (w^2 + \overline{w^2} + \delta^2),\quad
    a' = a - \alpha q,\quad b' = b - \beta_t r,\quad \hat G = a'\odot w + b', \\
    \tilde d = \hat G + \beta_t (g - \hat G),\quad
    w_{t+1} = w_t - \mathrm{lr}\,\tilde d / (\sqrt{\hat v_t} + \epsilon),

so the step's own quantities give (Baydin et al. 2018, one-step hypergradient)

.. math::
    \partial w_{t+1}/\partial\alpha = \mathrm{lr}\,(1-\beta_t)\, q\odot w / (\sqrt{\hat v_t}+\epsilon), \qquad
    \partial w_{t+1}/\partial\beta_t = -\mathrm{lr}\,\big((g - \hat G) - (1-\beta_t) r\big) / (\sqrt{\hat v_t}+\epsilon),

and :math:`dL_{t+1}/d\alpha = g_{t+1}\cdot\partial w_{t+1}/\partial\alpha`.  At step :math:`t+1`,
before its estimator step, each tensor moves

.. math::
    \log\alpha \leftarrow \mathrm{clip}\big(\log\alpha - \kappa_\alpha \cos(g_{t+1}, c^\alpha_t),\
    \log 0.01,\ \log 1.25\big)

(and :math:`\log\beta` alike with :math:`\kappa_\beta`, clipped to [0.02, 0.6]).  The cosine is
scale-free, so lr, :math:`1-\beta_t` and :math:`\partial\beta_t/\partial\beta > 0` drop out;
:math:`c_t` keeps only the direction :math:`q\odot w/(\sqrt{\hat v_t}+\epsilon)` (one float32
buffer per parameter and per tuned rate: +4 bytes/param each on top of the default's 12).
:math:`\hat v_t` is computed here from ``exp_avg_sq`` (which the optimizer updates after the
estimator step) with the TO defaults β2 = 0.999, ε = 1e-8 — the values the study runs with.

Upper bound on α: one joint (a, b) step on the same sample scales each coordinate's residual
by :math:`1 - \alpha\rho_i - \beta_t` with :math:`\rho_i = w_i^2/(w_i^2+\overline{w^2}+\delta^2) < 1`;
it contracts for every coordinate iff :math:`\alpha < 2 - \beta_t`.  The largest
:math:`\beta_t` after the seeding step is :math:`\beta_2 = 1/(2-\beta)` (0.53 at β = 0.1, 0.71
at β = 0.6, the top of β's range), so α ≤ 1.25 keeps every step contractive for all β in range.
The lower bound 0.01 is the smallest α of the study's grid (the slope barely moves in 200 steps).

With ``gate=True`` a tensor's slope is switched off (a = 0, no slope step) while an EMA (rate
0.1) of its relative residual :math:`\lVert r\rVert^2/\lVert g\rVert^2` is above 1, on again
when it falls below.

With κ_α = κ_β = 0 (and no gate) it is the default diagonal form.  Readable path only.

Phases (each appends one JSON line per run to ``<out>/runs.jsonl``, skipping runs already
there; every run takes ``/tmp/hf_to_cpu.lock``)::

    .venv/bin/python recipes/experiments/hyper_rates.py check
    .venv/bin/python recipes/experiments/hyper_rates.py refs --seeds 0 --baselines adamw to_nesterov --alpha1
    .venv/bin/python recipes/experiments/hyper_rates.py refs --seeds 1 2 3 --alpha1
    .venv/bin/python recipes/experiments/hyper_rates.py tune --kappas 0.03 0.1 0.3 1.0
    .venv/bin/python recipes/experiments/hyper_rates.py tune --rate beta --kappas 0.3 1.0
    .venv/bin/python recipes/experiments/hyper_rates.py report --kappa-alpha K
    .venv/bin/python recipes/experiments/hyper_rates.py report --kappa-beta K
    .venv/bin/python recipes/experiments/hyper_rates.py report --kappa-alpha K --kappa-beta K
    .venv/bin/python recipes/experiments/hyper_rates.py long --kappa-alpha K --steps 1000
    .venv/bin/python recipes/experiments/hyper_rates.py real --kappa-alpha K --steps 300 --seeds 0 1 2
    .venv/bin/python recipes/experiments/hyper_rates.py summary

``--signal slope`` replaces α's direction by the whole slope's: since
:math:`a = -\sum_s \alpha_s q_s`, :math:`\partial a/\partial\log\alpha = a`, and this step's
weight change moves with log α as :math:`-\mathrm{lr}(1-\beta_t)\, a\odot w/(\sqrt{\hat v}+\epsilon)`
(no buffer).  ``--signal whiteness`` tunes one β for the optimizer from the lag-1 correlation
of the estimator's residuals (:class:`WhitenessBeta`, a step hook, so any path);
``check-white`` tests it on a synthetic drifting-mean problem against the Kalman gain.

Result (2026-12-06, proxy, drop-in, seeds 1–3, references rerun on this host): not kept.  The
one-step hypergradient raises α on every task (its cosine is −0.012…−0.017 on nearly every
tensor at α = 0.1): κ_α = 1 (chosen on seed 0) ends at median α 0.62 on pydoc_full (−0.0047
validation vs the default; the fixed α = 1 is −0.0161) and 0.54 on pydoc_lora (+0.0115, worse
on every seed).  Hyper-β (κ_β = 1) is −0.0039 mean validation vs the default but +0.0103 test on
pydoc_lora.  See ``recipes/results/hyper-rates-2026-12-06/SUMMARY.md``.  Second round (same day,
proxy re-pretrained, references rerun): the whole-slope signal (κ_α 0.3) lowers α on full
fine-tuning (median 0.08) and raises it on LoRA, +0.0009 mean validation vs the default;
whiteness β is behind the default on every task at seed 0 (``hyper-signals-2026-12-06``).
"""

from __future__ import annotations

import argparse
import contextlib
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
sys.path.insert(0, str(ROOT))

import study  # noqa: E402
import study_data  # noqa: E402
import study_runner  # noqa: E402
from study_runner import EVAL_EVERY  # noqa: E402

from hf_to import Form, register_form  # noqa: E402
from hf_to.forms import FORMS, TINY, intercept_rate  # noqa: E402

NAME = "diagonal_hyper"
ALPHA_RANGE = (0.01, 1.25)
BETA_RANGE = (0.02, 0.6)
BETA2, EPS = 0.999, 1e-8
STUDY = ROOT / "recipes/results/study-proxy-v2-2026-11-30"
OUT = ROOT / "recipes/results/hyper-rates-2026-12-06"
LOCK = "/tmp/hf_to_cpu.lock"
#: The fixed α = 1 form (the default otherwise), as the study's α/β grid names it.
ALPHA1 = {"alpha": 1.0, "beta": 0.1}


def _cos(x: torch.Tensor, y: torch.Tensor) -> float | None:
    scale = float(torch.linalg.vector_norm(x) * torch.linalg.vector_norm(y))
    return float(torch.dot(x, y)) / scale if scale > 0 and math.isfinite(scale) else None


class HyperRateDiagonal:
    """The diagonal form with per-tensor α and β tuned by hypergradients of the next loss (see the
    module): a form's whole-tensor step, registered with :func:`hf_to.register_form`."""

    state_keys = ("a", "c_alpha", "c_beta")

    def __init__(
        self,
        kappa_alpha: float = 0.0,
        kappa_beta: float = 0.0,
        *,
        alpha0: float = 0.1,
        beta0: float = 0.1,
        nesterov: bool = True,
        gate: bool = False,
        signal: str = "step",
    ) -> None:
        self.kappa_alpha, self.kappa_beta = kappa_alpha, kappa_beta
        self.alpha0, self.beta0, self.nesterov, self.gate = alpha0, beta0, nesterov, gate
        self.signal = signal
        #: Per tensor (by creation order): shape, α, β, cosine sums, gate state, α history.
        self.tensors: list[dict[str, Any]] = []

    def init(self, state: dict, w: torch.Tensor) -> None:
        state["a"] = torch.zeros_like(w, memory_format=torch.contiguous_format)
        state["c_alpha"] = torch.zeros_like(w, memory_format=torch.contiguous_format)
        state["c_beta"] = torch.zeros_like(w, memory_format=torch.contiguous_format)
        info = {
            "index": len(self.tensors),
            "shape": list(w.shape),
            "alpha": self.alpha0,
            "beta": self.beta0,
            "cos_alpha": [],
            "cos_beta": [],
            "rel_res": None,
            "gated_steps": 0,
            "alpha_hist": [],
        }
        self.tensors.append(info)
        state["info"] = info  # a plain dict: not a tensor, not in state_keys (readable path only)

    def step(self, state, w, g, b, stats, *, nf, alpha, floor, beta_t, normalize):
        """One step after the first (the optimizer seeds b_0 = g_0 itself); returns (r, Ĝ)."""
        info, n, beta = state["info"], nf, beta_t
        t = float(state["step"])  # already advanced by the optimizer: this is step t (1-based)
        a, ca, cb = state["a"].view(-1), state["c_alpha"].view(-1), state["c_beta"].view(-1)
        # 1. Hypergradient steps on log α, log β from the previous step's ∂w/∂(rate) and this gradient.
        if self.signal == "slope" and self.kappa_alpha:
            # ∂w_{t+1}/∂log α through the whole slope a = −Σ α_s q_s (∂a/∂log α = a), one step in w:
            # −lr (1 − β_t) a⊙w / (√v̂ + ε); v̂ of the previous step (the optimizer updates it later).
            prev = state["exp_avg_sq"].view(-1) / (1 - BETA2 ** max(t - 1, 1))
            ca = torch.div(a * w, prev.sqrt().add_(EPS)).neg_()
        for rate, kappa, direction, bounds in (
            ("alpha", self.kappa_alpha, ca, ALPHA_RANGE),
            ("beta", self.kappa_beta, cb, BETA_RANGE),
        ):
            c = _cos(g, direction) if kappa else None
            if c is not None:
                info[f"cos_{rate}"].append(c)
                lo, hi = (math.log(x) for x in bounds)
                info[rate] = math.exp(min(hi, max(lo, math.log(info[rate]) - kappa * c)))
        rate_a = info["alpha"] if self.kappa_alpha else alpha * (info["alpha"] / self.alpha0)
        # β_t: the optimizer's own rate unless β is tuned here (then Adam's bias correction as a rate).
        rate_b = intercept_rate(info["beta"], t, "adam") if self.kappa_beta else beta
        # 2. The default diagonal step at these rates.
        r = torch.addcmul(b - g, a, w)
        if self.gate:
            rel = float(torch.dot(r, r)) / max(float(torch.dot(g, g)), 1e-30)
            info["rel_res"] = rel if info["rel_res"] is None else 0.9 * info["rel_res"] + 0.1 * rel
            if info["rel_res"] > 1.0:
                if info["gated_steps"] == 0 or bool(a.any()):
                    a.zero_()
                info["gated_steps"] += 1
                rate_a = 0.0
                r = b - g
        # The slope step in the default form's order of operations (κ = 0 is it bit for bit).
        norm = w * w + (stats["ww"] / n + floor + TINY) if normalize else None
        if rate_a and normalize:
            a.sub_(rate_a * r * w / norm)
        elif rate_a:
            a.sub_(r * w, alpha=rate_a)
        b.add_(r, alpha=-rate_b)
        g_hat = torch.addcmul(b, a, w)
        # 3. Directions of ∂w_{t+1}/∂α and ∂w_{t+1}/∂β_t (positive scalars dropped) for step t+1.
        if self.kappa_alpha or self.kappa_beta:
            v = state["exp_avg_sq"].view(-1) * BETA2 + (1 - BETA2) * g * g
            denom = (v / (1 - BETA2**t)).sqrt_().add_(EPS)
            if self.kappa_alpha and self.signal == "step":
                q = r * w / norm if normalize else r * w
                torch.div(q * w, denom, out=ca)
            if self.kappa_beta:
                d_dbeta = (g - g_hat) - (1 - rate_b) * r if self.nesterov else -r
                torch.div(d_dbeta, denom, out=cb).neg_()
        if len(info["alpha_hist"]) < t // 10:
            info["alpha_hist"].append(info["alpha"] if self.kappa_alpha else self.alpha0)
        if self.kappa_beta and self.nesterov:
            # The optimizer applies its own look-ahead Ĝ + β_t(g − Ĝ) at the group's β_t (rate ρ):
            # return X with X + ρ(g − X) = Ĝ + β'_t(g − Ĝ), β'_t this tensor's rate (ρ < 1 for t ≥ 2).
            rho = beta
            target = g_hat + rate_b * (g - g_hat)
            return r, (target - rho * g) / (1 - rho)
        return r, g_hat


class WhitenessBeta:
    r"""One intercept rate β for the whole optimizer, moved after every step by the lag-1
    correlation of the estimator's residuals (a step hook: any path, the C kernel included).

    The residual :math:`r_t = \hat G_{t-1}(w_t) - g_t` is the estimator's prediction error (the
    innovation).  For an EMA tracking a gradient whose mean drifts (variance q per step) under
    noise (variance σ²), successive innovations are uncorrelated exactly at the Kalman-optimal
    rate; positively correlated when β is too small (the estimate lags the drift), negatively
    when it is too large (with no drift their covariance is −β/(2−β) σ²).  So

    .. math::
        \log\beta \leftarrow \mathrm{clip}\big(\log\beta + \kappa_\beta\,
        \textstyle\sum_k \rho^k_t\rho^k_{t-1} / \sum_k \tfrac12(\rho^{k\,2}_t + \rho^{k\,2}_{t-1}),\
        \log 0.02,\ \log 0.6\big),

    summed over the tensors k, with :math:`\rho_t = s^\top r_t/\sqrt n` the projection of a
    tensor's residual on a fixed random sign vector s (one scalar per tensor and step).  No
    residual is stored: :math:`b_t = b_{t-1} - \beta_t r_t` makes
    :math:`\rho_t = (s^\top b_{t-1} - s^\top b_t)/(\beta_t\sqrt n)`, so each tensor keeps
    two scalars (:math:`s^\top b/\sqrt n` and ρ of the last step).  On a synthetic local-level
    problem it settles near the Kalman gain (phase ``check-white``).
    """

    def __init__(self, kappa: float, beta0: float = 0.1) -> None:
        self.kappa, self.beta = kappa, beta0
        self.signs: dict[int, torch.Tensor] = {}
        self.last: dict[int, tuple[float, float | None, float]] = {}  # id → (sᵀb/√n, ρ, step)
        self.corr_hist: list[float] = []
        self.beta_hist: list[float] = []

    def attach(self, opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
        opt.register_step_post_hook(self._after)
        return opt

    def _after(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        num = den = 0.0
        index = 0
        for group in opt.param_groups:
            for p in group["params"]:
                index += 1
                state = opt.state.get(p)
                if not state or "b" not in state:
                    continue
                b = state["b"].view(-1).float()
                if index not in self.signs:
                    gen = torch.Generator().manual_seed(index)
                    self.signs[index] = torch.randint(0, 2, b.shape, generator=gen).float().mul_(2).sub_(1)
                t = float(state["step"])
                proj = float(torch.dot(self.signs[index], b)) / math.sqrt(b.numel())
                prev = self.last.get(index)
                rho = None
                if prev is not None and t == prev[2] + 1:
                    rho = (prev[0] - proj) / intercept_rate(group["beta"], t, group["beta_warmup"])
                    if prev[1] is not None and math.isfinite(rho):
                        num += rho * prev[1]
                        den += 0.5 * (rho * rho + prev[1] * prev[1])
                self.last[index] = (proj, rho, t)
        if den > 0:
            corr = num / den
            lo, hi = (math.log(x) for x in BETA_RANGE)
            self.beta = math.exp(min(hi, max(lo, math.log(self.beta) + self.kappa * corr)))
            self.corr_hist.append(corr)
            self.beta_hist.append(self.beta)
            for group in opt.param_groups:
                group["beta"] = self.beta


def check_white(kappa: float, steps: int = 1000, tensors: int = 50, size: int = 400) -> dict:
    """The controller on a local-level problem: g_t = μ_t + noise (σ = 1), μ a random walk of
    variance q per step, lr 0 (the weights stay); the final β against the Kalman gain
    K = P/(P+1), P = (q + √(q² + 4q))/2."""
    from hf_to import TrainableOptimizer

    out = {}
    for q in (0.001, 0.01, 0.1):
        params = [torch.nn.Parameter(torch.ones(size)) for _ in range(tensors)]
        white = WhitenessBeta(kappa)
        opt = white.attach(TrainableOptimizer(params, lr=0.0))
        gen = torch.Generator().manual_seed(0)
        mu = torch.randn(tensors, size, generator=gen)
        for _ in range(steps):
            mu += math.sqrt(q) * torch.randn(tensors, size, generator=gen)
            noise = torch.randn(tensors, size, generator=gen)
            for i, p in enumerate(params):
                p.grad = mu[i] + noise[i]
            opt.step()
        P = (q + math.sqrt(q * q + 4 * q)) / 2
        tail = white.beta_hist[steps // 2 :]
        out[q] = {"kalman": P / (P + 1), "beta_final": white.beta, "beta_mean_2nd_half": statistics.fmean(tail)}
        print(
            f"q/σ² = {q}: β {white.beta:.3f} (mean over the second half {out[q]['beta_mean_2nd_half']:.3f}), "
            f"Kalman gain {P / (P + 1):.3f}"
        )
    return out


def register(kappa_alpha: float = 0.0, kappa_beta: float = 0.0, **kw: Any) -> HyperRateDiagonal:
    """Make ``estimator="diagonal_hyper"`` valid in this process (readable path, ``fused=False``)."""
    est = HyperRateDiagonal(kappa_alpha, kappa_beta, **kw)
    register_form(
        Form(
            NAME,
            est.state_keys,
            ("ww",),
            slope_times=FORMS["diagonal"].slope_times,
            state_numel=lambda n: 3 * n,
            tensor_step=est.step,
            init_state=est.init,
        ),
        replace=True,
    )
    return est


def hyper_config(label: str) -> study.Config:
    # The default form (Adam's bias correction as β_t, the look-ahead), our estimator, readable path.
    return study.Config(
        label, "to", (("estimator", NAME), ("beta_warmup", "adam"), ("nesterov", True), ("fused", False))
    )


# -- runs ----------------------------------------------------------------------------------


@contextlib.contextmanager
def cpu_lock():
    with open(LOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _quartiles(xs: list[float]) -> list[float]:
    if len(xs) < 2:
        return [xs[0]] * 3 if xs else []
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return [q[0], q[1], q[2]]


def run(
    task: study.Task,
    seed: int,
    variant: str,
    lr: float,
    *,
    ka: float = 0.0,
    kb: float = 0.0,
    gate: bool = False,
    signal: str = "step",
    overrides: dict | None = None,
    model: str = "proxy",
    threads: int = 1,
    eval_every: int = EVAL_EVERY,
) -> dict[str, Any]:
    """One run under the CPU lock: ``variant`` is ``hyper`` (our estimator) or a study config label."""
    torch.set_num_threads(threads)
    est = white = None
    if variant == "hyper" and signal == "whiteness":
        white, config = WhitenessBeta(kb), study.CONFIGS["to_nesterov"]  # the default, any path, + the hook
    elif variant == "hyper":
        est = register(ka, kb, gate=gate, signal=signal)
        config = hyper_config("hyper")
    else:
        config = study.CONFIGS[variant]
    build = study_runner.build_optimizer
    if white is not None:
        study_runner.build_optimizer = lambda *a, **k: white.attach(build(*a, **k))
    try:
        with cpu_lock():
            rec = study.run_one(task, model, config, lr, seed, dict(overrides or {}), eval_every=eval_every)
    finally:
        FORMS.pop(NAME, None)
        study_runner.build_optimizer = build
    rec.pop("train_losses", None)
    rec.update(variant=variant, kappa_alpha=ka, kappa_beta=kb, gate=gate, steps=task.steps)
    if signal != "step":
        rec["signal"] = signal
    if white is not None:
        rec["tensors"] = [
            {"index": i, "alpha": 0.1, "beta": white.beta, "alpha_hist": [], "gated_steps": 0}
            for i in range(len(white.last))
        ]
        rec["alpha_quartiles"] = [0.1] * 3
        rec["beta_quartiles"] = [white.beta] * 3
        rec["corr_hist"] = [round(c, 4) for c in white.corr_hist[::10]]
        rec["beta_hist"] = [round(b, 4) for b in white.beta_hist[::10]]
    if est is not None:
        rec["tensors"] = [
            {
                k: v
                for k, v in dict(
                    info,
                    mean_cos_alpha=statistics.fmean(info["cos_alpha"]) if info["cos_alpha"] else None,
                    mean_cos_beta=statistics.fmean(info["cos_beta"]) if info["cos_beta"] else None,
                ).items()
                if k not in ("cos_alpha", "cos_beta")
            }
            for info in est.tensors
        ]
        alphas = [i["alpha"] for i in est.tensors]
        betas = [i["beta"] for i in est.tensors]
        rec["alpha_quartiles"] = _quartiles(alphas)
        rec["beta_quartiles"] = _quartiles(betas)
    return rec


def _rid(
    task: str, seed: int, variant: str, ka: float, kb: float, gate: bool, steps: int, overrides: dict, signal: str
) -> str:
    return json.dumps([task, seed, variant, ka, kb, gate, steps, overrides] + ([signal] if signal != "step" else []))


def _form_key(r: dict) -> tuple:
    """What tells two runs' forms apart (the α signal only when it is not the one-step one)."""
    return (r["variant"], r["kappa_alpha"], r["kappa_beta"], r["gate"], json.dumps(r["overrides"]), _signal(r))


def _signal(r: dict) -> str:
    return r.get("signal", "step")


def _done(out: Path) -> dict[str, dict]:
    path = out / "runs.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    return {
        _rid(
            r["task"],
            r["seed"],
            r["variant"],
            r["kappa_alpha"],
            r["kappa_beta"],
            r["gate"],
            r["steps"],
            r["overrides"],
            _signal(r),
        ): r
        for r in recs
    }


def adamw_lr(records: list[dict], task: str) -> float:
    """AdamW's tuned lr of the study (seed 0), the drop-in rate."""
    pool = [r for r in records if r["task"] == task and r["config"] == "adamw" and r.get("phase") == "tune"]
    return min(pool, key=lambda r: r["final_val"])["lr"]


def ensure(out: Path, task: study.Task, seed: int, variant: str, lr: float, **kw: Any) -> dict:
    done = _done(out)
    key = _rid(
        task.name,
        seed,
        variant,
        kw.get("ka", 0.0),
        kw.get("kb", 0.0),
        kw.get("gate", False),
        task.steps,
        kw.get("overrides") or {},
        kw.get("signal", "step"),
    )
    if key in done:
        return done[key]
    rec = run(task, seed, variant, lr, **kw)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "runs.jsonl").open("a") as fh:  # one line per run, whole even with two queues
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write(json.dumps(rec) + "\n")
        fh.flush()
        fcntl.flock(fh, fcntl.LOCK_UN)
    aq = rec.get("alpha_quartiles")
    print(
        f"[hyper] {task.name} steps={task.steps} seed={seed} {variant} κα={kw.get('ka', 0)} κβ={kw.get('kb', 0)} "
        f"{kw.get('overrides') or ''} val={rec['final_val']:.4f} test={rec['test']:.4f}"
        + (f" α quartiles {[round(x, 3) for x in aq]}" if aq else ""),
        flush=True,
    )
    return rec


# -- summary -------------------------------------------------------------------------------


def _stored(records: list[dict], task: str, config: str, lr: float, seed: int, overrides: dict | None = None):
    hits = [
        r
        for r in records
        if r["task"] == task
        and r["config"] == config
        and math.isclose(r["lr"], lr, rel_tol=1e-9)
        and r["seed"] == seed
        and r["overrides"] == (overrides or {})
    ]
    return hits[0] if hits else None


_KINDS: dict[str, list[str]] = {}


def _param_kinds(mode: str) -> list[str]:
    """Trainable parameter names of the proxy in ``mode``, in creation order, layer index dropped."""
    if mode not in _KINDS:
        import re

        model, _ = study_data.build_model("proxy", mode)
        _KINDS[mode] = [
            re.sub(r"\.\d+\.", ".*.", n.replace("base_model.model.", ""))
            for n, p in model.named_parameters()
            if p.requires_grad
        ]
    return _KINDS[mode]


def _base(
    mine: list[dict], study_recs: list[dict], task: str, lr: float, steps: int, config: str, seed: int, overrides
) -> dict | None:
    """A reference run of ours (same length; the study's stored runs do not reproduce on this host)."""
    own = [
        r
        for r in mine
        if r["task"] == task
        and r["variant"] == config
        and r["seed"] == seed
        and r["steps"] == steps
        and r["overrides"] == (overrides or {})
    ]
    return own[0] if own else None


def summary(out: Path, steps: int = 200, seeds: frozenset[int] = frozenset({1, 2, 3})) -> dict:
    """Paired differences of every hyper variant to AdamW, NAdamW, the default (to_nesterov) and α = 1."""
    study_recs = [r for r in study._load(STUDY) if r["model"] == "proxy"]
    mine = list(_done(out).values())
    res: dict[str, Any] = {}
    for task in study.TASKS:
        lr = adamw_lr(study_recs, task)

        refs = {
            "adamw": ("adamw", None),
            "nadamw": ("nadamw", None),
            "default": ("to_nesterov", None),
            "alpha1": ("to_nesterov", ALPHA1),
        }
        rows = {}
        variants = sorted({_form_key(r) for r in mine if r["task"] == task and r["steps"] == steps})
        for variant, ka, kb, gate, ov, signal in variants:
            runs = {
                r["seed"]: r
                for r in mine
                if r["seed"] in seeds
                and r["task"] == task
                and r["steps"] == steps
                and _form_key(r) == (variant, ka, kb, gate, ov, signal)
            }
            if not runs:
                continue
            label = variant if variant != "hyper" else f"hyper κα={ka:g} κβ={kb:g}" + (" gate" if gate else "")
            if signal != "step":
                label += f" signal={signal}"
            if ov != "{}":
                label += " " + ov
            row: dict[str, Any] = {"seeds": sorted(runs), "val": {s: runs[s]["final_val"] for s in sorted(runs)}}
            for ref, (config, overrides) in refs.items():
                dv, dt = {}, {}
                for s, r in runs.items():
                    b = _base(mine, study_recs, task, lr, steps, config, s, overrides)
                    if b is not None:
                        dv[s] = r["final_val"] - b["final_val"]
                        dt[s] = r["test"] - b["test"]
                if dv:
                    row[f"d_val_{ref}"] = dv
                    row[f"d_test_{ref}"] = dt
            if variant == "hyper":
                alphas = [t["alpha"] for s in runs for t in runs[s]["tensors"]]
                betas = [t["beta"] for s in runs for t in runs[s]["tensors"]]
                row["final_alpha_quartiles"] = _quartiles(alphas)
                row["final_beta_quartiles"] = _quartiles(betas)
                row["alpha_hist_median"] = [
                    statistics.median(
                        t["alpha_hist"][i] for s in runs for t in runs[s]["tensors"] if len(t["alpha_hist"]) > i
                    )
                    for i in range(max(len(t["alpha_hist"]) for s in runs for t in runs[s]["tensors"]))
                ]
                names = _param_kinds(study.TASKS[task].mode)
                by_kind: dict[str, list[float]] = {}
                for s in runs:
                    for t in runs[s]["tensors"]:
                        by_kind.setdefault(names[t["index"]], []).append(t["alpha"])
                row["final_alpha_median_by_kind"] = {k: statistics.median(v) for k, v in sorted(by_kind.items())}
                gated = [t["gated_steps"] for s in runs for t in runs[s]["tensors"]]
                row["gated_tensor_fraction"] = sum(x > 0 for x in gated) / len(gated)
            rows[label] = row
        res[task] = {"lr": lr, "rows": rows}
    return res


def _fmt_row(row: dict, ref: str, kind: str = "val") -> str:
    d = row.get(f"d_{kind}_{ref}")
    if not d:
        return "—"
    signs = "".join("−" if v < 0 else "+" if v > 0 else "0" for _, v in sorted(d.items()))
    return f"{statistics.fmean(d.values()):+.4f} ({signs})"


def markdown(res: dict, steps: int, seeds: set[int]) -> str:
    lines = [f"### {steps} steps, seeds {sorted(seeds)}", ""]
    for task, body in res.items():
        lines += [f"**{task}** (drop-in lr {body['lr']:.3g})", ""]
        lines += [
            "| form | Δval vs AdamW | Δtest vs AdamW | Δval vs NAdamW | Δtest vs NAdamW | Δval vs default | Δtest vs default | Δval vs α=1 | final α q1/med/q3 | final β q1/med/q3 |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for label, row in body["rows"].items():
            if set(row["seeds"]) != seeds:
                continue
            aq = row.get("final_alpha_quartiles")
            bq = row.get("final_beta_quartiles")
            lines.append(
                f"| {label} | {_fmt_row(row, 'adamw')} | {_fmt_row(row, 'adamw', 'test')} | {_fmt_row(row, 'nadamw')} | "
                f"{_fmt_row(row, 'nadamw', 'test')} | {_fmt_row(row, 'default')} | {_fmt_row(row, 'default', 'test')} | "
                f"{_fmt_row(row, 'alpha1')} | "
                + ("/".join(f"{x:.3g}" for x in aq) if aq else "—")
                + " | "
                + ("/".join(f"{x:.3g}" for x in bq) if bq else "—")
                + " |"
            )
        lines.append("")
    # Mean over the tasks of each form's per-task mean paired difference (forms run on every task).
    lines += [
        "**mean over the three tasks** (of the per-task means)",
        "",
        "| form | Δval vs AdamW | Δtest vs AdamW | Δval vs NAdamW | Δtest vs NAdamW | Δval vs default | Δtest vs default |",
        "|---|---|---|---|---|---|---|",
    ]
    labels = set.intersection(*(set(body["rows"]) for body in res.values()))
    for label in sorted(labels):
        rows = [body["rows"][label] for body in res.values()]
        if any(set(row["seeds"]) != seeds for row in rows):
            continue
        cells = []
        for ref in ("adamw", "nadamw", "default"):
            for kind in ("val", "test"):
                means = [
                    statistics.fmean(row[f"d_{kind}_{ref}"].values()) for row in rows if row.get(f"d_{kind}_{ref}")
                ]
                cells.append(f"{statistics.fmean(means):+.4f}" if len(means) == len(rows) else "—")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


# -- phases --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("phase", choices=["check", "check-white", "tune", "report", "refs", "long", "real", "summary"])
    ap.add_argument("--kappas", type=float, nargs="+", default=[0.03, 0.1, 0.3])
    ap.add_argument("--rate", choices=["alpha", "beta"], default="alpha", help="tune: the rate tuned")
    ap.add_argument("--kappa-alpha", type=float, default=0.0)
    ap.add_argument("--kappa-beta", type=float, default=0.0)
    ap.add_argument("--gate", action="store_true")
    ap.add_argument(
        "--signal",
        choices=["step", "slope", "whiteness"],
        default="step",
        help="α's hypergradient through the last slope step only (step) or the whole slope (slope); "
        "whiteness: one β for all tensors from the innovations' lag-1 correlation (κ_β)",
    )
    ap.add_argument("--tasks", nargs="+", default=list(study.TASKS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--baselines", nargs="+", default=["adamw", "nadamw", "to_nesterov"])
    ap.add_argument("--alpha1", action="store_true", help="refs: also the fixed α = 1 form")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.phase == "check-white":
        return check_white(args.kappa_beta or 0.3)
    study_recs = [r for r in study._load(STUDY) if r["model"] == "proxy"]
    tasks = [study.TASKS[t] for t in args.tasks]
    if args.phase == "check":
        # The stored drop-in default reproduces (pairing with stored runs is valid), and κ = 0 is it too.
        task = study.TASKS[args.tasks[0]]
        lr = adamw_lr(study_recs, task.name)
        stored = _stored(study_recs, task.name, "to_nesterov", lr, args.seeds[0])
        rerun = ensure(args.out, task, args.seeds[0], "to_nesterov", lr)
        zero = ensure(args.out, task, args.seeds[0], "hyper", lr)
        out = {
            "stored": stored["final_val"],
            "rerun": rerun["final_val"],
            "hyper_kappa0": zero["final_val"],
            "stored_test": stored["test"],
            "rerun_test": rerun["test"],
            "hyper_kappa0_test": zero["test"],
        }
        print(json.dumps(out))
        return out
    if args.phase == "tune":
        for k in args.kappas:
            for task in tasks:
                rates = {"ka": k} if args.rate == "alpha" else {"kb": k}
                ensure(args.out, task, 0, "hyper", adamw_lr(study_recs, task.name), signal=args.signal, **rates)
        return None
    if args.phase == "report":
        for seed in args.seeds:
            for task in tasks:
                ensure(
                    args.out,
                    task,
                    seed,
                    "hyper",
                    adamw_lr(study_recs, task.name),
                    ka=args.kappa_alpha,
                    kb=args.kappa_beta,
                    gate=args.gate,
                    signal=args.signal,
                )
        return None
    if args.phase == "refs":
        # The references rerun on this host (the study's stored runs do not reproduce here: see
        # the ``check`` phase): ``--baselines`` drop-in, and the fixed α = 1 form.
        for seed in args.seeds:
            for task in tasks:
                lr = adamw_lr(study_recs, task.name)
                for variant in args.baselines:
                    ensure(args.out, task, seed, variant, lr)
                if args.alpha1:
                    ensure(args.out, task, seed, "to_nesterov", lr, overrides=ALPHA1)
        return None
    if args.phase == "real":
        # SmolLM2-135M drop-in at the task's base_lr (long_runs.py --model real pairs with these).
        for seed in args.seeds:
            for task in tasks:
                real_task = dataclasses.replace(task, steps=args.steps)
                ensure(
                    args.out,
                    real_task,
                    seed,
                    "hyper",
                    task.base_lr,
                    ka=args.kappa_alpha,
                    kb=args.kappa_beta,
                    signal=args.signal,
                    model="real",
                    threads=2,
                    eval_every=25,
                )
        return None
    if args.phase == "long":
        # validation every 50 steps (the final step's is the result either way)
        for seed in args.seeds:
            for task in tasks:
                long_task = dataclasses.replace(task, steps=args.steps)
                lr = adamw_lr(study_recs, task.name)
                for variant in args.baselines:
                    ensure(args.out, long_task, seed, variant, lr, eval_every=50)
                ensure(
                    args.out,
                    long_task,
                    seed,
                    "hyper",
                    lr,
                    ka=args.kappa_alpha,
                    kb=args.kappa_beta,
                    signal=args.signal,
                    eval_every=50,
                )
        return None
    seed_sets = [frozenset({0}), frozenset(args.seeds)]
    res = {
        f"{steps} steps, seeds {sorted(seeds)}": (steps, seeds, summary(args.out, steps, seeds))
        for steps in sorted({200, args.steps})
        for seeds in seed_sets
    }
    (args.out / "summary.json").write_text(json.dumps({k: v[2] for k, v in res.items()}, indent=1))
    md = "\n".join(
        ["# Hyper-rate tables (generated by `hyper_rates.py summary`)", ""]
        + [markdown(r, steps, set(seeds)) for steps, seeds, r in res.values()]
    )
    (args.out / "TABLES.md").write_text(md)
    print(md)
    return res


if __name__ == "__main__":
    main()
