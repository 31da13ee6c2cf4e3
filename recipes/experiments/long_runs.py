"""The study's drop-in comparison at the lengths users run: 1,000 steps on the proxy.

Each optimizer runs at AdamW's tuned learning rate of the stored study (selected on validation
with seed 0 at 200 steps), with its package defaults, on the study's warm-up + cosine schedule
stretched to ``--steps``, over fresh seeds; the same data order and initialisation per seed for
every optimizer, so differences pair by seed.  ``nadamw_fixed`` is NAdamW with its momentum at
β₁ = 0.9 from the first step (torch's ``NAdam`` warms its momentum up as
μ_t = β₁(1 − ½·0.96^(0.004 t)): 0.45 at step 10, 0.52 at step 1,000).  Each run appends a line to
``<out>/runs.jsonl`` (a rerun skips runs already there); ``--report`` prints the tables::

    .venv/bin/python recipes/experiments/long_runs.py --steps 1000 --tasks pydoc_full pydoc_lora
    .venv/bin/python recipes/experiments/long_runs.py --report

Results (2026-12-06, proxy, seeds 1–3) are in ``recipes/results/long-runs-2026-12-06/`` and
recipes/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "recipes"))
sys.path.insert(0, str(ROOT))

import study  # noqa: E402
from recipe_metrics import format_mean_std, mean_std, steps_to_target  # noqa: E402

OPTIMIZERS = ("adamw", "nadamw", "nadamw_fixed", "to_nesterov")
STORED = ROOT / "recipes/results/study-proxy-v2-2026-11-30"
#: Held while a run trains, so that concurrent jobs on a shared machine take turns.
CPU_LOCK = Path("/tmp/hf_to_cpu.lock")


def run(args: argparse.Namespace) -> None:
    out = args.out / "runs.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    done = (
        {(r["task"], r["seed"], r["config"]) for r in map(json.loads, out.read_text().splitlines())}
        if out.exists()
        else set()
    )
    records = [r for r in study._load(STORED) if r["model"] == "proxy"]
    torch.set_num_threads(args.threads)
    for name in args.tasks:
        task = dataclasses.replace(study.TASKS[name], steps=args.steps)
        adamw = {r["seed"]: r for r in study.table_runs(records, name, "dropin", set(args.seeds))["adamw"]}
        for seed in args.seeds:
            for label in args.optimizers:
                if (name, seed, label) in done:
                    continue
                with CPU_LOCK.open("w") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    rec = study.run_one(task, "proxy", study.CONFIGS[label], adamw[seed]["lr"], seed, {})
                with out.open("a") as f:
                    f.write(json.dumps({**rec, "steps": args.steps}) + "\n")
                print(f"{name} seed {seed} {label}: val {rec['final_val']:.4f} test {rec['test']:.4f}", flush=True)


def report(args: argparse.Namespace) -> str:
    runs = [json.loads(line) for line in (args.out / "runs.jsonl").read_text().splitlines()]
    lines = []
    for name in sorted({r["task"] for r in runs}):
        by = {(r["config"], r["seed"]): r for r in runs if r["task"] == name}
        seeds = sorted({s for _, s in by})
        labels = [c for c in OPTIMIZERS if all((c, s) in by for s in seeds)]
        lines += [f"### {name}, {runs[0]['steps']} steps, seeds {seeds}", ""]
        lines += [
            "| optimizer | test loss (mean ± std) | test − AdamW per seed | test − NAdamW per seed | steps to the better peer's final val |"
        ]
        lines += ["|---|---|---|---|---|"]
        for label in labels:
            test = [by[label, s]["test"] for s in seeds]
            d_adamw = " ".join(f"{by[label, s]['test'] - by['adamw', s]['test']:+.4f}" for s in seeds)
            d_nadamw = " ".join(f"{by[label, s]['test'] - by['nadamw', s]['test']:+.4f}" for s in seeds)
            reach = []
            for s in seeds:
                target = min(by["adamw", s]["final_val"], by["nadamw", s]["final_val"])
                curve = by[label, s]["val_curve"]
                step = steps_to_target([c[0] for c in curve], [c[1] for c in curve], target)
                reach.append("never" if step is None else str(step))
            lines.append(
                f"| {label} | {format_mean_std(*mean_std(test), 4)} | {d_adamw} | {d_nadamw} | {' '.join(reach)} |"
            )
        lines.append("")
    text = "\n".join(lines)
    print(text)
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--tasks", nargs="+", default=["pydoc_full", "pydoc_lora", "code_lora"], choices=list(study.TASKS))
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(study.CONFIGS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "runs/long-runs")
    ap.add_argument("--report", action="store_true", help="print the tables of the runs in --out")
    args = ap.parse_args(argv)
    if args.report:
        (args.out / "REPORT.md").write_text(report(args))
    else:
        run(args)


if __name__ == "__main__":
    main()
