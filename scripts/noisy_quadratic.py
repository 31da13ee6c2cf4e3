"""Variance reduction of the TO estimator on a noisy quadratic (design-decision measurements).

F(w) = ½ wᵀHw + cᵀw, stochastic gradient g = ∇F(w) + σ·ξ.  Reports, after a warm-up,
E‖Ĝ_t − ∇F(w_t)‖² / E‖g_t − ∇F(w_t)‖² (the estimator's error relative to the raw noise) and
the final suboptimality F(w_T) − F*.

    python scripts/noisy_quadratic.py                 # the default grid
    python scripts/noisy_quadratic.py --estimators diagonal --alphas 0 0.01 --betas 0.1
"""

from __future__ import annotations

import argparse
import itertools

import torch

from hf_to import TrainableOptimizer


def make_problem(n: int = 16, seed: int = 0, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eig = torch.linspace(0.1, 1.0, n, dtype=torch.float64)
    h = q @ torch.diag(eig) @ q.T
    c = torch.randn(n, generator=gen, dtype=torch.float64)
    w_star = torch.linalg.solve(h, -c)
    w0 = (w_star + 3 * torch.randn(n, generator=gen, dtype=torch.float64)) * scale
    return h / scale**2, c / scale, w0


def run(
    estimator: str,
    *,
    alpha: float,
    beta: float,
    lr: float = 0.05,
    steps: int = 400,
    warmup: int = 100,
    sigma: float = 1.0,
    seed: int = 0,
    scale: float = 1.0,
    **kwargs,
) -> dict[str, float]:
    """Return the error ratio after warm-up and the final suboptimality."""
    h, c, w0 = make_problem(seed=seed, scale=scale)
    f = lambda w: 0.5 * w @ h @ w + c @ w  # noqa: E731
    f_star = f(torch.linalg.solve(h, -c))
    p = torch.nn.Parameter(w0.clone())
    opt = TrainableOptimizer(
        [p],
        lr=lr,
        estimator=estimator,
        alpha=alpha,
        beta=beta,
        preconditioner=kwargs.pop("preconditioner", "none"),
        **kwargs,
    )
    gen = torch.Generator().manual_seed(seed + 1)
    est_err, noise = 0.0, 0.0
    for t in range(steps):
        w = p.detach().clone()
        true_grad = h @ w + c
        p.grad = true_grad + sigma * scale**-1 * torch.randn(w.shape, generator=gen, dtype=torch.float64)
        opt.step()
        if t >= warmup:
            g_hat = opt.gradient_estimate(p, w)
            est_err += float((g_hat - true_grad).pow(2).sum())
            noise += float((p.grad - true_grad).pow(2).sum())
    return {"ratio": est_err / noise, "subopt": float(f(p.detach()) - f_star)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--estimators", nargs="+", default=["full", "diagonal", "rank_one", "none"])
    ap.add_argument("--alphas", nargs="+", type=float, default=[0.0, 0.01, 0.1])
    ap.add_argument("--betas", nargs="+", type=float, default=[0.05, 0.1, 0.2])
    ap.add_argument("--alpha-scalings", nargs="+", default=["normalized", "none"])
    ap.add_argument("--scales", nargs="+", type=float, default=[1.0], help="multiply w (and divide H, c) by this")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    print("| estimator | alpha_scaling | alpha | beta | w scale | error/noise (mean over seeds) | F-F* |")
    print("|---|---|---|---|---|---|---|")
    for est, scaling, alpha, beta, scale in itertools.product(
        args.estimators, args.alpha_scalings, args.alphas, args.betas, args.scales
    ):
        if est == "none" and (alpha != args.alphas[0] or scaling != args.alpha_scalings[0]):
            continue
        res = [
            run(est, alpha=alpha, beta=beta, lr=args.lr, seed=s, scale=scale, alpha_scaling=scaling)
            for s in range(args.seeds)
        ]
        ratio = sum(r["ratio"] for r in res) / len(res)
        sub = sum(r["subopt"] for r in res) / len(res)
        print(f"| {est} | {scaling} | {alpha:g} | {beta:g} | {scale:g} | {ratio:.4f} | {sub:.3g} |")


if __name__ == "__main__":
    main()
