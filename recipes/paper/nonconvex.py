"""Non-convex setting: an MLP and a small CNN on scikit-learn's digits (8×8 images, offline).

Data: 1797 images, pixels scaled to [0, 1], a fixed stratified split (random_state=0) into
train 60% / validation 20% / test 20%.  Models (every tensor ≤ 4096 elements, so TO-full runs):

* ``mlp``: 64 → 32 (ReLU) → 10, 2410 parameters;
* ``cnn``: conv 3×3 1→8, ReLU, conv 3×3 8→16, ReLU, max-pool 2, linear 256 → 10, 3818 parameters.

Cross-entropy, batch 32, constant learning rate, no weight decay (Adam ≡ AdamW).  Every
method is tuned on the validation loss (mean of the last three evaluations) with seed 0, the
same grids as in :mod:`common`, then run with seeds 1 … N (fresh initialisation and batch
order).  Reported: training loss (whole training set), test accuracy, steps to reach targets.

Usage::

    python recipes/paper/nonconvex.py --out recipes/paper/report/data
    python recipes/paper/nonconvex.py --out /tmp/paper --smoke
    python recipes/paper/nonconvex.py --out DIR --reuse DIR --retune to_diagonal   # retune one method
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import METHODS, add_reuse_arguments, load_reused, provenance, run_plan, save_json, steps_to_target, tune
from recipe_loop import LoopRecord, train_loop
from torch import nn

__all__ = ["NONCONVEX_METHODS", "build_model", "load_digits_split", "main", "run"]

NONCONVEX_METHODS = (
    "sgd",
    "momentum",
    "adam",
    "to_full",
    "to_diagonal",
    "to_rank_one",
    "to_paper_diagonal",
    "to_none",
)
BATCH = 32
EVAL_EVERY = 20
#: Targets for "steps to reach": training loss and test accuracy.
LOSS_TARGET = 0.1
ACC_TARGET = 0.95


def load_digits_split() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    X_tr, X_rest, y_tr, y_rest = train_test_split(X, y, test_size=0.4, stratify=y, random_state=0)
    X_va, X_te, y_va, y_te = train_test_split(X_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=0)
    return {
        k: (torch.tensor(a), torch.tensor(b))
        for k, a, b in (("train", X_tr, y_tr), ("val", X_va, y_va), ("test", X_te, y_te))
    }


def build_model(name: str) -> nn.Module:
    if name == "mlp":
        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    if name == "cnn":
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(256, 10),
        )
    raise ValueError(f"Invalid model: {name!r} (expected 'mlp' or 'cnn')")


@torch.no_grad()
def _evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    logits = model(X)
    return float(nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def run(
    data: dict[str, tuple[torch.Tensor, torch.Tensor]],
    model_name: str,
    method_key: str,
    hp: dict[str, float],
    *,
    steps: int,
    seed: int,
) -> dict[str, Any]:
    """One training run; curves are recorded every ``EVAL_EVERY`` steps (and at step 0)."""
    torch.manual_seed(seed)
    model = build_model(model_name)
    opt = METHODS[method_key].build(model.parameters(), **hp)
    gen = torch.Generator().manual_seed(seed)
    X_tr, y_tr = data["train"]
    rec: dict[str, list[float]] = {"steps": [], "train_loss": [], "val_loss": [], "val_acc": [], "test_acc": []}

    def loss_at(step: int) -> torch.Tensor:
        idx = torch.randint(X_tr.shape[0], (BATCH,), generator=gen)
        return nn.functional.cross_entropy(model(X_tr[idx]), y_tr[idx])

    def record(step: int, _: LoopRecord) -> bool:
        """Evaluate; a non-finite or exploding training loss stops the run (diverged)."""
        model.eval()
        tr_loss, _ = _evaluate(model, X_tr, y_tr)
        va_loss, va_acc = _evaluate(model, *data["val"])
        _, te_acc = _evaluate(model, *data["test"])
        model.train()
        for k, v in zip(rec, (step, tr_loss, va_loss, va_acc, te_acc)):
            rec[k].append(v)
        return not math.isfinite(tr_loss) or tr_loss > 1e6

    loop = train_loop(loss_at, opt, steps, eval_every=EVAL_EVERY, on_eval=record)
    return {**rec, "diverged": loop.stopped, "opt_step_seconds": loop.optimizer_seconds / max(1, loop.steps)}


def val_score(res: dict[str, Any]) -> float:
    """Tuning score: mean validation loss over the last three evaluations."""
    if res["diverged"]:
        return math.inf
    return float(np.mean(res["val_loss"][-3:]))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="directory for nonconvex_<model>.json")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=5, help="evaluation seeds (1 … N); tuning uses seed 0")
    ap.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    ap.add_argument("--methods", nargs="+", default=list(NONCONVEX_METHODS))
    ap.add_argument("--smoke", action="store_true", help="20 steps, one seed, learning rates 0.01 and 0.1 only")
    add_reuse_arguments(ap, "nonconvex")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    reused = load_reused(args.reuse, args.models, "nonconvex", "models")
    steps, seeds, lr_grid = run_plan(args, smoke_steps=20)
    data = load_digits_split()
    result: dict[str, Any] = {
        "steps": steps,
        "seeds": seeds,
        "batch": BATCH,
        "split": {k: len(v[1]) for k, v in data.items()},
        "targets": {"train_loss": LOSS_TARGET, "test_acc": ACC_TARGET},
        "models": {},
        "provenance": provenance(),
    }
    for mname in args.models:
        mres: dict[str, Any] = {"params": sum(p.numel() for p in build_model(mname).parameters())}
        for key in args.methods:

            def objective(hp: dict[str, float], key: str = key, mname: str = mname) -> float:
                return val_score(run(data, mname, key, hp, steps=steps, seed=0))

            kw = {"lr_grid": lr_grid} if lr_grid else {}
            prior = reused.get(mname, {}).get(key) if key not in args.retune else None
            if prior:  # --reuse: keep the earlier selection, rerun only the reported seeds
                best, trials = prior["best"], prior["trials"]
            else:
                best, trials = tune(key, objective, **kw)
            runs = [run(data, mname, key, best, steps=steps, seed=s) for s in seeds]
            ok = [r for r in runs if not r["diverged"]]
            entry: dict[str, Any] = {"label": METHODS[key].label, "best": best, "trials": trials}
            entry["diverged_seeds"] = len(runs) - len(ok)
            entry["steps"] = runs[0]["steps"]
            entry["opt_step_seconds"] = float(np.mean([r["opt_step_seconds"] for r in runs]))
            for k in ("train_loss", "val_loss", "val_acc", "test_acc"):
                arr = np.asarray([r[k] for r in ok]) if ok else np.zeros((0, 0))
                if len(arr):
                    entry[k] = {"mean": arr.mean(0).tolist(), "std": arr.std(0).tolist()}
                    entry[f"final_{k}"] = {"mean": float(arr[:, -1].mean()), "std": float(arr[:, -1].std())}
            entry["steps_to_loss"] = [steps_to_target(r["steps"], r["train_loss"], LOSS_TARGET) for r in runs]
            entry["steps_to_acc"] = [steps_to_target(r["steps"], r["test_acc"], ACC_TARGET, above=True) for r in runs]
            mres[key] = entry
            fl = entry.get("final_train_loss", {"mean": math.nan})
            fa = entry.get("final_test_acc", {"mean": math.nan})
            print(f"{mname} {key:18s} best={best} train_loss={fl['mean']:.4f} test_acc={fa['mean']:.4f}", flush=True)
        result["models"][mname] = mres
        save_json(args.out / f"nonconvex_{mname}.json", {**result, "models": {mname: mres}})
    return result


if __name__ == "__main__":
    main()
