r"""Prototype: the folded default with its slope switched off per tensor while the estimate
predicts the next gradient no better than zero would (the relative-residual gate).

The folded form (:func:`hf_to.forms.folded_step`) steps its intercept at a per-coordinate rate,

.. math::
    r_t = b_{t-1} - g_t,\qquad
    b_t = b_{t-1} - \big(\beta_t + \alpha\, w^2/(w^2 + w^\top w/n + \delta^2)\big)\odot r_t ,

the diagonal slope's rate term; with the slope off (A ≡ 0, ``estimator="none"``) the rate is
:math:`\beta_t` alone.  Per tensor this form keeps an exponential average (rate 0.1) of the
relative residual :math:`\lVert r_t\rVert^2/\lVert g_t\rVert^2` — the ``to/relative_residual``
the Trainer logs — and takes the ``none`` step while that average is above ``threshold``
(1: the estimate predicts the gradient worse than zero would), the folded step otherwise.
With the threshold at infinity it is the folded form; at 0 (or below every average) it is
``none``; both are tested.  Readable path only; the per-tensor average lives in this object
(an experiment: not in the checkpoint).

Why it cannot tell the tasks apart (measured before the runs, the proxy at 1,000 steps, seed 1,
``.venv/bin/python recipes/experiments/residual_gate.py probe --task pydoc_lora``): the average is
above 1 on every tensor from step 100 on, on prose LoRA and on full fine-tuning alike (median
over the tensors 1.11 at step 100, 1.06 at step 1,000; only at step 1,000 of full fine-tuning
is one tensor of 28 below 1).  For an average of noisy gradients with rate β the expected ratio is
:math:`(\sigma^2(1 + \beta/(2-\beta)) + \text{lag}^2)/(\mu^2 + \sigma^2)`, above 1 whenever the
gradient's mean is under about 5 % of its noise power at β = 0.1: in mini-batch fine-tuning it
is, on every tensor, so the gate closes everywhere and the form is ``none``.

Result (2026-12-07, proxy, 1,000 steps, seeds 1–9, ``long_runs.py --optimizers
to_lookahead_folded_gate``, ``recipes/results/residual-gate-2026-12-07/``): not kept.  The gate
is closed on 99.0–99.5 % of tensor-steps (open only in the first steps, while the average
starts); minus NAdamW, validation +0.0066 ± 0.0039 on prose LoRA and +0.0014 ± 0.0029 on full
fine-tuning (s.e.), between A ≡ 0 and the folded default; see recipes/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "recipes"))
sys.path.insert(0, str(ROOT))

from hf_to import register_form  # noqa: E402
from hf_to.forms import FORMS, TINY, folded_step, none_step  # noqa: E402

NAME = "folded_gate"
#: The rate of the relative residual's average (as hyper_rates' gate).
EMA = 0.1


class ResidualGate:
    """The folded form's whole-tensor step behind a relative-residual gate (see the module)."""

    def __init__(self, threshold: float = 1.0) -> None:
        if not threshold >= 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        self.threshold = threshold
        #: Per tensor (keyed by its intercept's storage): the average and the steps gated, open.
        self.tensors: dict[int, dict[str, object]] = {}

    def step(self, state, w, g, b, sums, *, nf, alpha, floor, beta_t, normalize):
        info = self.tensors.setdefault(b.data_ptr(), {"n": w.numel(), "ema": None, "closed": 0, "open": 0, "hist": []})
        r = b - g
        rel = float(torch.dot(r, r)) / max(float(torch.dot(g, g)), TINY)
        info["ema"] = rel if info["ema"] is None else (1 - EMA) * info["ema"] + EMA * rel
        info["hist"].append(info["ema"])
        closed = info["ema"] > self.threshold
        info["closed" if closed else "open"] += 1
        step = none_step if closed else folded_step
        r, _, _, b_new, _ = step(
            w, g, b, None, None, sums.get("ww"), None, None, None, None, nf, alpha, floor, beta_t, normalize
        )
        b.copy_(b_new)
        return r, b.clone()

    def closed_share(self) -> float:
        """The share of tensor-steps taken with the slope off."""
        closed = sum(i["closed"] for i in self.tensors.values())
        return closed / max(1, closed + sum(i["open"] for i in self.tensors.values()))


def register(threshold: float = 1.0) -> ResidualGate:
    """Register (or replace) the gated folded form as ``estimator="folded_gate"``."""
    gate = ResidualGate(threshold)
    form = dataclasses.replace(FORMS["folded"], name=NAME, step=None, tensor_step=gate.step, kernels=frozenset())
    register_form(form, replace=True)
    return gate


def probe(task_name: str, steps: int, seed: int) -> None:
    """The per-tensor averages through one run of the folded default with the gate never closing."""
    import long_runs
    import study

    gate = register(threshold=math.inf)
    task = dataclasses.replace(study.TASKS[task_name], steps=steps)
    config = long_runs._to_nesterov_with("probe", nesterov=0.55, estimator=NAME)
    rec = study.run_one(task, "proxy", config, long_runs.dropin_lr(task_name), seed, {}, eval_every=100)
    print(f"{task_name} seed {seed}: val {rec['final_val']:.4f} test {rec['test']:.4f} (the folded default's)")
    for frac in (0.1, 0.25, 0.5, 0.75, 1.0):
        vals = [i["hist"][max(0, int(frac * len(i["hist"])) - 1)] for i in gate.tensors.values()]
        q = statistics.quantiles(vals, n=10)
        above = sum(v > 1 for v in vals)
        print(
            f"  step {int(frac * steps):5d}: {len(vals)} tensors, relative residual average "
            f"q10 {q[0]:.3f} median {statistics.median(vals):.3f} q90 {q[-1]:.3f}; above 1: {above}"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="phase", required=True)
    pr = sub.add_parser("probe", help="the per-tensor relative-residual averages of one run")
    pr.add_argument("--task", default="pydoc_lora")
    pr.add_argument("--steps", type=int, default=1000)
    pr.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    probe(args.task, args.steps, args.seed)


if __name__ == "__main__":
    main()
