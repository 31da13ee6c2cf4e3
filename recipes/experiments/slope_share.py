r"""What the diagonal slope does in fine-tuning: a per-coordinate intercept rate, or a correction
for the weights' travel?

With the normalised diagonal step (hf_to.forms.diagonal_step) the estimate at the current
weights moves exactly as

.. math::
    \hat G_t(w_t) = \hat G_{t-1}(w_t) - \bigl(\beta_t + \alpha\,\tfrac{w^2}{w^2 + c}\bigr)\, r_t ,
    \qquad \hat G_{t-1}(w_t) = \hat G_{t-1}(w_{t-1}) + a_{t-1} \odot (w_t - w_{t-1}),

(``tests/test_math.py::test_diagonal_slope_at_unmoved_weights_is_a_per_coordinate_intercept_rate``).
Against A ≡ 0 momentum at rate β_t the slope adds two terms per step: the *rate term*
α w²/(w²+c) ⊙ r (lighter momentum where |w| is large) and the *travel term* a ⊙ Δw (what a
slope is for: the gradient's change as the weights move).  This script fine-tunes with the
diagonal form and TO's other defaults and prints, every ``--every`` steps and at the end, the ratio of their norms over all
parameters (``travel / rate``), and the mean extra rate α·mean(w²/(w²+c)) per parameter::

    .venv/bin/python recipes/experiments/slope_share.py --model real --task pydoc_full --steps 40
    .venv/bin/python recipes/experiments/slope_share.py --model proxy --task pydoc_lora --steps 60 --threads 1

The learning rate is the study's drop-in rate (AdamW's usual rate for the real model; AdamW's
tuned rate on the proxy, ``--lr`` overrides).  Results (2026-12-07):
``recipes/results/slope-share-2026-12-07/runs.jsonl`` and recipes/README.md.  What it found made
the folded estimator (the rate term alone) the default.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "recipes"))
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "recipes" / "experiments"))

import hyper_rates  # noqa: E402  (the drop-in rate and the CPU lock of the hyper-rate runs)
import study  # noqa: E402
from study_data import build_model, lm_loss, task_data  # noqa: E402
from study_spec import TASKS  # noqa: E402

from hf_to import TrainableOptimizer  # noqa: E402


def snapshot(opt: TrainableOptimizer, params: list, prev_w: dict) -> dict:
    """Per parameter past its first step: its weights now, the slope and intercept the previous
    step left, and the weights that step started from (``None`` if not recorded)."""
    before = {}
    for p in params:
        st = opt.state.get(p, {})
        if "a" in st and int(st["step"]) > 0:
            w = p.detach().double().reshape(-1)
            before[p] = (w, st["a"].double().reshape(-1), st["b"].double().reshape(-1), prev_w.get(p))
    return before


def shares(opt: TrainableOptimizer, before: dict, grads: dict) -> tuple[float, float, float, int]:
    """Squared norms of the rate and travel terms of the step just taken, the summed extra rate
    α·w²/(w²+c) and the element count (tensors past their first step only)."""
    rate2 = travel2 = extra = 0.0
    count = 0
    for group in opt.param_groups:
        alpha, floor = group["alpha"], group["norm_floor"]
        for p in group["params"]:
            if p not in before:
                continue
            # the weights this step starts from, the state the previous step left, its weights
            w, a_old, b_old, w_prev = before[p]
            g = grads[p].double().reshape(-1)
            r = b_old + a_old * w - g
            c = float(w @ w) / w.numel() + floor
            share = alpha * w * w / (w * w + c)
            rate2 += float(((share * r) ** 2).sum())
            if w_prev is not None:
                travel2 += float(((a_old * (w - w_prev)) ** 2).sum())
            extra += float(share.sum())
            count += w.numel()
    return rate2, travel2, extra, count


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["real", "proxy"], default="real")
    ap.add_argument("--task", choices=sorted(TASKS), default="pydoc_full")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="append the summary as a JSON line here")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    task = TASKS[args.task]
    if args.lr:
        lr = args.lr
    elif args.model == "real":
        lr = task.base_lr
    else:
        proxy = [r for r in study._load(hyper_rates.STUDY) if r["model"] == "proxy"]
        lr = hyper_rates.adamw_lr(proxy, args.task)
    data = task_data(task)
    model, remap = build_model(args.model, task.mode)
    train = remap[data["train"]] if remap is not None else data["train"]
    params = [p for p in model.parameters() if p.requires_grad]
    # the diagonal form (the default until 2026-12-07) with the package's other defaults
    opt = TrainableOptimizer(params, lr=lr, estimator="diagonal")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    prev_w: dict = {}
    totals = [0.0, 0.0, 0.0, 0]
    rows = []
    with hyper_rates.cpu_lock():
        for step in range(1, args.steps + 1):
            idx = order[((step - 1) * task.batch + torch.arange(task.batch)) % len(order)]
            loss = lm_loss(model, train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            before = snapshot(opt, params, prev_w)
            grads = {p: p.grad.detach() for p in before}
            if before:
                rate2, travel2, extra, count = shares(opt, before, grads)
                totals = [totals[0] + rate2, totals[1] + travel2, totals[2] + extra, totals[3] + count]
                if step % args.every == 0:
                    rows.append((step, (travel2 / rate2) ** 0.5 if rate2 else float("nan"), extra / count))
                    print(
                        f"step {step}: loss {loss.item():.4f}  travel/rate {rows[-1][1]:.4f}  "
                        f"mean extra rate {rows[-1][2]:.4f}",
                        flush=True,
                    )
            prev_w = {p: p.detach().double().reshape(-1).clone() for p in params}
            opt.step()
    summary = {
        "model": args.model,
        "task": args.task,
        "lr": lr,
        "steps": args.steps,
        "seed": args.seed,
        "travel_over_rate": (totals[1] / totals[0]) ** 0.5 if totals[0] else None,
        "mean_extra_rate": totals[2] / totals[3] if totals[3] else None,
        "per_step": rows,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "per_step"}))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
