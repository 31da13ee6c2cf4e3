r"""Prototype: TO's look-ahead weight set apart from its intercept rate, as NAdamW's is.

TO's default steps along :math:`d = \hat G + \beta_t (g - \hat G) = (1-\beta_t)\hat G + \beta_t g`
(``nesterov=True``): one weight, β = 0.1, sets both the EMA's memory and how much of the raw
gradient the step takes.  torch's ``NAdam`` steps along

.. math::
    \frac{1-\mu_t}{1-\prod_{i\le t}\mu_i}\, g + \frac{\mu_{t+1}}{1-\prod_{i\le t+1}\mu_i}\, m_t,
    \qquad m_t = 0.9\, m_{t-1} + 0.1\, g_t,\quad \mu_t = 0.9\,(1 - \tfrac12\, 0.96^{0.004 t}),

and :math:`\mu_t` is 0.45 at step 10 and still 0.46 at step 200: in runs of a few hundred steps
NAdamW's step is about :math:`0.55\,g + 0.45\,m` with a β₁ = 0.9 average — heavy memory, light
look-ahead.  This prototype keeps TO's estimator (β = 0.1, the slope) and steps along

.. math::
    d = (1-\lambda)\,\hat G + \lambda\, g

with a fixed look-ahead weight λ: the optimizer's ``nesterov=λ`` (every path).  The runs of
2026-12-06 were made before that keyword existed, with ``nesterov=False`` at lr·(1−λ) plus
:math:`-\mathrm{lr}\,\lambda\, g/(\sqrt{\hat v_t}+\epsilon)` added in a step hook (no weight
decay in these runs); the hook and the keyword agreed to 6e-7 after 30 steps on both the
readable path and the C kernel.

Phases (one JSON line per run in ``<out>/runs.jsonl``; runs there are skipped; each run holds
``/tmp/hf_to_cpu.lock``)::

    .venv/bin/python recipes/experiments/lookahead_weight.py proxy --lams 0.3 0.55 --seeds 0 1 2 3
    .venv/bin/python recipes/experiments/lookahead_weight.py real --lams 0.55 --seeds 0 1 2
    .venv/bin/python recipes/experiments/lookahead_weight.py report --seeds 1 2 3 --pair <proxy references>
    .venv/bin/python recipes/experiments/lookahead_weight.py report --seeds 0 1 2

``real`` runs SmolLM2-135M as ``long_runs.py --model real --steps 300 --eval-every 25`` does,
so its runs pair by seed with that script's (``--pair`` names its runs.jsonl).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "recipes"))
sys.path.insert(0, str(ROOT))

import hyper_rates  # noqa: E402  (the drop-in rate and the CPU lock of the hyper-rate runs)
import study  # noqa: E402

OUT = ROOT / "runs/lookahead"
PAIR_REAL = ROOT / "recipes/results/long-runs-real-2026-12-06/runs.jsonl"


def run(task: study.Task, model: str, lam: float, lr: float, seed: int, threads: int, eval_every: int) -> dict:
    torch.set_num_threads(threads)
    with hyper_rates.cpu_lock():
        rec = study.run_one(
            task, model, study.CONFIGS["to_nesterov"], lr, seed, {"nesterov": lam}, eval_every=eval_every
        )
    rec.pop("train_losses", None)
    return {**rec, "config": f"to_lookahead_{lam:g}", "lam": lam, "steps": task.steps}


def _load(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("phase", choices=["proxy", "real", "report"])
    ap.add_argument("--lams", type=float, nargs="+", default=[0.55])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--tasks", nargs="+", default=None)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--model", choices=["proxy", "real"], default=None, help="report: one model's runs only")
    ap.add_argument("--pair", type=Path, default=PAIR_REAL, help="report: the real-model runs to pair with")
    args = ap.parse_args(argv)
    out = args.out / "runs.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.phase == "report":  # --seeds filters (the proxy's λ was chosen on seed 0)
        mine = [r for r in _load(out) if r["seed"] in args.seeds and args.model in (None, r["model"])]
        report(mine, _load(args.pair))
        return
    real = args.phase == "real"
    names = args.tasks or (["pydoc_lora", "pydoc_full"] if real else list(study.TASKS))
    proxy_recs = [r for r in study._load(hyper_rates.STUDY) if r["model"] == "proxy"]
    done = {(r["task"], r["model"], r["seed"], r["lam"]) for r in _load(out)}
    for seed in args.seeds:
        for name in names:
            task = study.TASKS[name]
            if real:
                task, lr = dataclasses.replace(task, steps=300), task.base_lr
            else:
                lr = hyper_rates.adamw_lr(proxy_recs, name)
            for lam in args.lams:
                key = (name, "real" if real else "proxy", seed, lam)
                if key in done:
                    continue
                rec = run(task, key[1], lam, lr, seed, 2 if real else 1, 25 if real else 10)
                done.add(key)
                with out.open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                print(f"[lookahead] {name} seed={seed} λ={lam} val={rec['final_val']:.4f} test={rec['test']:.4f}")


def report(mine: list[dict], peers: list[dict]) -> None:
    """Per task and λ: mean val/test and the paired test differences to each peer of ``peers``."""
    for model in sorted({r["model"] for r in mine}):
        for task in sorted({r["task"] for r in mine if r["model"] == model}):
            rows = [r for r in mine if r["model"] == model and r["task"] == task]
            base = {
                (r["config"], r["seed"]): r
                for r in peers
                if r["task"] == task and r.get("model", model) == model and not r.get("overrides")
            }
            print(f"\n### {task}, {model}")
            for lam in sorted({r["lam"] for r in rows}):
                runs = {r["seed"]: r for r in rows if r["lam"] == lam}
                seeds = sorted(runs)
                line = (
                    f"λ={lam:g} seeds {seeds}: val {statistics.fmean(runs[s]['final_val'] for s in seeds):.4f} "
                    f"test {statistics.fmean(runs[s]['test'] for s in seeds):.4f}"
                )
                for peer in ("adamw", "nadamw", "to_nesterov", "sf_adamw"):
                    d = [runs[s]["test"] - base[(peer, s)]["test"] for s in seeds if (peer, s) in base]
                    dv = [runs[s]["final_val"] - base[(peer, s)]["final_val"] for s in seeds if (peer, s) in base]
                    if d:
                        line += f" | test − {peer}: " + " ".join(f"{x:+.4f}" for x in d)
                        line += f" (val {statistics.fmean(dv):+.4f})"
                print(line)


if __name__ == "__main__":
    main()
