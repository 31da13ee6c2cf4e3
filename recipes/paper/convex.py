"""Strongly convex setting: ℓ2-regularised logistic regression and least squares.

Problems (scikit-learn's bundled data, nothing downloaded; features standardised, a constant
column appended, the ℓ2 term on every weight so that F is λ-strongly convex):

* ``logreg``: breast cancer (569 × 30), :math:`F(w)=\\frac1n\\sum\\log(1+e^{-y_i x_i^\\top w})+\\frac\\lambda2\\lVert w\\rVert^2`;
  :math:`F^*` by Newton's method to a gradient norm below 1e-13.
* ``lsq``: diabetes (442 × 10, target standardised), :math:`F(w)=\\frac1{2n}\\lVert Xw-y\\rVert^2+\\frac\\lambda2\\lVert w\\rVert^2`;
  :math:`F^*` in closed form.

Mini-batch gradients (batch 8, sampled with replacement) are computed in closed form in
float64.  Two schedules: ``constant`` and ``diminishing`` (:math:`\\eta_t=\\eta_0\\,t_0/(t_0+t)`,
:math:`t_0=T/20`, the ∝ 1/t schedule of the SGD theory).  Along the reported runs of the TO
variants, the full gradient :math:`\\nabla F(w_t)` is computed at every step to measure the
estimator's error :math:`\\lVert\\hat G_t-\\nabla F(w_t)\\rVert^2` against the mini-batch's
:math:`\\lVert g_t-\\nabla F(w_t)\\rVert^2`, and against an EMA with the same β run on the same
trajectory (momentum's estimate, no slope term), started like the method's intercept
(:math:`g_0`, or 0 for the paper-literal ``intercept_init="zero"``).

Usage::

    python recipes/paper/convex.py --out recipes/paper/report/data           # full run
    python recipes/paper/convex.py --out /tmp/paper --smoke                  # a few steps, one seed
    python recipes/paper/convex.py --out DIR --reuse DIR                     # keep the tuning, rerun the seeds
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    METHODS,
    add_reuse_arguments,
    estimate_from_state,
    load_reused,
    provenance,
    run_plan,
    save_json,
    steps_to_target,
    tune,
)

__all__ = ["CONVEX_METHODS", "Problem", "fit_rate", "load_problem", "main", "run"]

CONVEX_METHODS = (
    "sgd",
    "momentum",
    "adam",
    "to_full",
    "to_diagonal",
    "to_rank_one",
    "to_paper_full",
    "to_paper_diagonal",
    "to_paper_rank_one",
    "to_none",
    "to_paper_none",
)
LAMBDA = 0.1
BATCH = 8
#: Relative suboptimality targets (F − F*) / (F(w₀) − F*) for "steps to reach".
TARGETS = (1e-2, 1e-3)


@dataclass
class Problem:
    name: str
    X: torch.Tensor  # (n, d) float64
    y: torch.Tensor  # (n,) labels in {-1, 1} (logreg) or targets (lsq)
    lam: float
    kind: str
    w_star: torch.Tensor | None = None
    f_star: float = 0.0

    @property
    def dim(self) -> int:
        return self.X.shape[1]

    def value(self, w: torch.Tensor) -> float:
        z = self.X @ w
        if self.kind == "logreg":
            data = torch.nn.functional.softplus(-self.y * z).mean()
        else:
            data = 0.5 * ((z - self.y) ** 2).mean()
        return float(data + 0.5 * self.lam * (w @ w))

    def grad(self, w: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        X, y = (self.X, self.y) if idx is None else (self.X[idx], self.y[idx])
        z = X @ w
        if self.kind == "logreg":
            coef = -y * torch.sigmoid(-y * z)
        else:
            coef = z - y
        return X.T @ coef / X.shape[0] + self.lam * w

    def hessian(self, w: torch.Tensor) -> torch.Tensor:
        if self.kind == "logreg":
            s = torch.sigmoid(self.X @ w)
            h = (self.X * (s * (1 - s))[:, None]).T @ self.X / self.X.shape[0]
        else:
            h = self.X.T @ self.X / self.X.shape[0]
        return h + self.lam * torch.eye(self.dim, dtype=self.X.dtype)

    def solve(self) -> None:
        """F* to high precision: closed form (lsq) or Newton's method (logreg)."""
        w = torch.zeros(self.dim, dtype=torch.float64)
        for _ in range(100):
            g = self.grad(w)
            if float(g.norm()) < 1e-13:
                break
            w = w - torch.linalg.solve(self.hessian(w), g)
        self.w_star, self.f_star = w, self.value(w)

    def curvature(self) -> tuple[float, float]:
        """(μ, L): extreme eigenvalues of the Hessian at the optimum."""
        ev = torch.linalg.eigvalsh(self.hessian(self.w_star))
        return float(ev[0]), float(ev[-1])


def load_problem(name: str) -> Problem:
    from sklearn.datasets import load_breast_cancer, load_diabetes
    from sklearn.preprocessing import StandardScaler

    if name == "logreg":
        X, y = load_breast_cancer(return_X_y=True)
        y = 2.0 * y - 1.0
    elif name == "lsq":
        X, y = load_diabetes(return_X_y=True)
        y = (y - y.mean()) / y.std()
    else:
        raise ValueError(f"Invalid problem: {name!r} (expected 'logreg' or 'lsq')")
    X = StandardScaler().fit_transform(X)
    X = np.hstack([X, np.ones((X.shape[0], 1))])
    prob = Problem(name, torch.tensor(X), torch.tensor(y, dtype=torch.float64), LAMBDA, name)
    prob.solve()
    return prob


def checkpoints(steps: int, n: int = 240) -> list[int]:
    """Log-spaced early, linear later: where F(w_t) is recorded (t = 0 … steps)."""
    log = np.unique(np.round(np.logspace(0, math.log10(steps), n // 2)).astype(int))
    lin = np.linspace(0, steps, n // 2).astype(int)
    return sorted({0, steps, *log.tolist(), *lin.tolist()})


def run(
    prob: Problem,
    method_key: str,
    hp: dict[str, float],
    *,
    schedule: str,
    steps: int,
    seed: int,
    track_variance: bool = False,
) -> dict[str, Any]:
    """One optimisation run from w₀ = 0; returns the suboptimality curve (and variance stats)."""
    method = METHODS[method_key]
    w = torch.zeros(prob.dim, dtype=torch.float64, requires_grad=True)
    opt = method.build([w], **hp)
    t0 = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: t0 / (t0 + t) if schedule == "diminishing" else 1.0)
    gen = torch.Generator().manual_seed(seed)
    marks = checkpoints(steps)
    mark_set = set(marks)
    rec_steps, subopt = [], []
    track = track_variance and method.trainable
    beta = hp.get("beta", 0.1)
    zero_init = track and opt.param_groups[0].get("intercept_init") == "zero"
    err_g = err_hat = err_ema = grad_sq = 0.0
    ema = None
    per_step: dict[str, list[float]] = {"g": [], "hat": [], "ema": [], "full": []}
    n_tracked = 0
    start = time.perf_counter()
    for t in range(steps + 1):
        if t in mark_set:
            rec_steps.append(t)
            subopt.append(prob.value(w.detach()) - prob.f_star)
            if not math.isfinite(subopt[-1]) or subopt[-1] > 1e12:
                subopt[-1] = math.inf
                break
        if t == steps:
            break
        idx = torch.randint(prob.X.shape[0], (BATCH,), generator=gen)
        g = prob.grad(w.detach(), idx)
        if track:
            w_before = w.detach().clone()
            full = prob.grad(w_before)
        w.grad = g
        opt.step()
        sched.step()
        if track:
            g_hat = estimate_from_state(opt, w, w_before)
            if ema is None:  # start like the optimizer's intercept: b₀ = g₀, or b₀ = 0 (paper)
                ema = torch.zeros_like(g).add_(g, alpha=beta) if zero_init else g.clone()
            else:
                ema.mul_(1 - beta).add_(g, alpha=beta)
            eg, eh, ee = (float(((x - full) ** 2).sum()) for x in (g, g_hat, ema))
            if t >= 10:  # skip the estimators' warm-up
                err_g += eg
                err_hat += eh
                err_ema += ee
                grad_sq += float(full @ full)
                n_tracked += 1
            per_step["g"].append(eg)
            per_step["hat"].append(eh)
            per_step["ema"].append(ee)
            per_step["full"].append(float(full @ full))
    out: dict[str, Any] = {
        "steps": rec_steps,
        "subopt": subopt,
        "seconds": time.perf_counter() - start,
        "diverged": not math.isfinite(subopt[-1]),
    }
    if track and n_tracked:
        out["variance"] = {
            "err_g": err_g / n_tracked,
            "err_hat": err_hat / n_tracked,
            "err_ema": err_ema / n_tracked,
            "grad_sq": grad_sq / n_tracked,
            "curves": {k: _bin(v, 60) for k, v in per_step.items()},
        }
    return out


def _bin(values: list[float], bins: int) -> list[float]:
    """Mean of ``values`` in ``bins`` equal chunks (for compact curves)."""
    arr = np.asarray(values)
    return [float(c.mean()) for c in np.array_split(arr, min(bins, len(arr))) if len(c)]


def tail_score(res: dict[str, Any]) -> float:
    """Tuning score: log10 of the mean suboptimality over the last 20% of the run."""
    if res["diverged"]:
        return math.inf
    s = np.asarray(res["steps"])
    v = np.asarray(res["subopt"])
    tail = v[s >= 0.8 * s[-1]]
    return float(np.log10(max(tail.mean(), 1e-300)))


def fit_rate(steps: list[int], subopt: list[float], t0: int, *, start_frac: float = 0.25) -> float:
    """Exponent p of the least-squares fit F(w_t) − F* ≈ C (t + t₀)^(−p) on t ≥ start_frac·T."""
    s = np.asarray(steps, dtype=float)
    v = np.asarray(subopt, dtype=float)
    keep = (s >= start_frac * s[-1]) & np.isfinite(v) & (v > 0)
    if keep.sum() < 3:
        return math.nan
    slope = np.polyfit(np.log(s[keep] + t0), np.log(v[keep]), 1)[0]
    return float(-slope)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="directory for convex_<problem>.json")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=5, help="evaluation seeds (1 … N); tuning uses seed 0")
    ap.add_argument("--problems", nargs="+", default=["logreg", "lsq"])
    ap.add_argument("--methods", nargs="+", default=list(CONVEX_METHODS))
    ap.add_argument("--schedules", nargs="+", default=["constant", "diminishing"])
    ap.add_argument("--smoke", action="store_true", help="60 steps, one seed, learning rates 0.01 and 0.1 only")
    add_reuse_arguments(ap, "convex")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    reused = load_reused(args.reuse, args.problems, "convex", "problems")
    steps, seeds, lr_grid = run_plan(args, smoke_steps=60)
    result: dict[str, Any] = {
        "steps": steps,
        "seeds": seeds,
        "batch": BATCH,
        "lambda": LAMBDA,
        "problems": {},
        "provenance": provenance(),
    }
    for pname in args.problems:
        prob = load_problem(pname)
        mu, L = prob.curvature()
        f0 = prob.value(torch.zeros(prob.dim, dtype=torch.float64)) - prob.f_star
        pres: dict[str, Any] = {"n": prob.X.shape[0], "d": prob.dim, "f_star": prob.f_star, "mu": mu, "L": L}
        pres["f0_gap"] = f0
        for sched in args.schedules:
            print(f"[{pname} / {sched}] F* = {prob.f_star:.12f}, mu = {mu:.4g}, L = {L:.4g}", flush=True)
            sres: dict[str, Any] = {}
            for key in args.methods:

                def objective(hp: dict[str, float], key: str = key, prob: Problem = prob, sched: str = sched) -> float:
                    return tail_score(run(prob, key, hp, schedule=sched, steps=steps, seed=0))

                kw = {"lr_grid": lr_grid} if lr_grid else {}
                prior = reused.get(pname, {}).get(sched, {}).get(key) if key not in args.retune else None
                if prior:  # --reuse: keep the earlier selection, rerun only the reported seeds
                    best, trials = prior["best"], prior["trials"]
                else:
                    best, trials = tune(key, objective, **kw)
                runs = [run(prob, key, best, schedule=sched, steps=steps, seed=s, track_variance=True) for s in seeds]
                curves = np.asarray([r["subopt"] for r in runs if not r["diverged"]])
                entry: dict[str, Any] = {"label": METHODS[key].label, "best": best, "trials": trials}
                entry["diverged_seeds"] = sum(r["diverged"] for r in runs)
                entry["steps"] = runs[0]["steps"]
                entry["seconds_per_run"] = float(np.mean([r["seconds"] for r in runs]))
                if len(curves):
                    mean = curves.mean(0)
                    entry["mean"] = mean.tolist()
                    entry["std"] = curves.std(0).tolist()
                    tail = [tail_score(r) for r in runs if not r["diverged"]]
                    entry["final_log10"] = {"mean": float(np.mean(tail)), "std": float(np.std(tail))}
                    entry["steps_to"] = {
                        str(tg): [steps_to_target(r["steps"], r["subopt"], tg * f0) for r in runs] for tg in TARGETS
                    }
                    entry["rate"] = [fit_rate(r["steps"], r["subopt"], max(1, steps // 20)) for r in runs]
                    entry["rate_of_mean"] = fit_rate(entry["steps"], mean.tolist(), max(1, steps // 20))
                var = [r["variance"] for r in runs if "variance" in r]
                if var:
                    entry["variance"] = {
                        k: {"mean": float(np.mean([v[k] for v in var])), "std": float(np.std([v[k] for v in var]))}
                        for k in ("err_g", "err_hat", "err_ema", "grad_sq")
                    }
                    entry["variance"]["curves"] = {
                        k: np.mean([v["curves"][k] for v in var], axis=0).tolist() for k in var[0]["curves"]
                    }
                sres[key] = entry
                fl = entry.get("final_log10", {"mean": math.nan, "std": math.nan})
                print(
                    f"{pname}/{sched} {key:18s} best={best} log10(F-F*)_tail={fl['mean']:.3f}±{fl['std']:.3f}",
                    flush=True,
                )
            pres[sched] = sres
        result["problems"][pname] = pres
        save_json(args.out / f"convex_{pname}.json", {**result, "problems": {pname: pres}})
    return result


if __name__ == "__main__":
    main()
