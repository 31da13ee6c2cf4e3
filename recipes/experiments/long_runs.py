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

``--model real`` runs SmolLM2-135M instead, drop-in at AdamW's usual rate of the task (the
study's ``base_lr``: 3e-4 for LoRA, 3e-5 for full fine-tuning) rather than a tuned one::

    .venv/bin/python recipes/experiments/long_runs.py --model real --steps 300 --eval-every 25 \
        --threads 2 --seeds 0 1 2 --tasks pydoc_full pydoc_lora --optimizers adamw nadamw to_nesterov \
        --out runs/long-real

Results (2026-12-06): proxy, seeds 1–3, in ``recipes/results/long-runs-2026-12-06/``;
SmolLM2-135M in ``recipes/results/long-runs-real-2026-12-06/`` (``to_nesterov`` there is the
default of that morning, λ = β_t; ``to_lookahead`` the diagonal default of 2026-12-06;
``to_lookahead_none`` the same without the slope: within 0.0006 of it on every seed of both
tasks; ``to_lookahead_a1`` and ``to_lookahead_bf16``, full fine-tuning only, added 2026-12-07;
``to_lookahead_folded``, the default since 2026-12-07: level with ``to_lookahead`` to 0.00004
on every seed of both tasks); the proxy at 1,000 steps in
``recipes/results/long-runs-1000-2026-12-07/``; all in recipes/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import functools
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "recipes"))
sys.path.insert(0, str(ROOT))

import residual_gate  # noqa: E402
import study  # noqa: E402
from recipe_metrics import format_mean_std, mean_std, steps_to_target  # noqa: E402
from study_runner import EVAL_EVERY  # noqa: E402

#: The report's row order; ``--optimizers`` runs the first four unless told otherwise.
OPTIMIZERS = (
    "adamw",
    "nadamw",
    "nadamw_fixed",
    "to_nesterov",
    "sf_adamw",
    "to_bf16",
    "to_lookahead",
    "to_lookahead_bf16",
    "to_lookahead_none",
    "to_lookahead_a1",
    "to_lookahead_none_b115",
    "to_lookahead_folded",
    "to_lookahead_folded_b02",
    "to_lookahead_folded_gate",
    "to_lookahead_folded_tuned",
)


def _to_nesterov_with(label: str, **kwargs: object) -> study.Config:
    return study.Config(label, "to", tuple({**dict(study.CONFIGS["to_nesterov"].kwargs), **kwargs}.items()))


#: Rows this script adds to the study's table (whose ``to_lookahead`` is the diagonal default of
#: 2026-12-06, the look-ahead weight fixed at 0.55, see lookahead_weight.py): ``to_nesterov`` (the
#: look-ahead weight β_t) with bfloat16 state (6 B/param); that default with bfloat16 state, without
#: the slope (A ≡ 0, 8 B/param), with the slope rate the proxy's full fine-tuning liked (α = 1),
#: A ≡ 0 with the intercept rate the slope adds on average (β = 0.115, slope_share.py), and the
#: folded estimator, the default since 2026-12-07 (8 B/param), also with the lighter memory the
#: study tuned on prose LoRA (β = 0.2, i.e. β₁ = 0.8), and behind the relative-residual gate
#: (residual_gate.py: the slope off per tensor while its estimate predicts worse than zero), and
#: the folded default with its intercept rate tuned on the training loss (``tune_beta=1.0``, hf_to/tuning.py).
EXTRA = {
    "to_bf16": _to_nesterov_with("to_bf16", state_dtype=torch.bfloat16),
    "to_lookahead_bf16": _to_nesterov_with("to_lookahead_bf16", nesterov=0.55, state_dtype=torch.bfloat16),
    "to_lookahead_none": _to_nesterov_with("to_lookahead_none", nesterov=0.55, estimator="none"),
    "to_lookahead_a1": _to_nesterov_with("to_lookahead_a1", nesterov=0.55, alpha=1.0),
    "to_lookahead_none_b115": _to_nesterov_with("to_lookahead_none_b115", nesterov=0.55, estimator="none", beta=0.115),
    "to_lookahead_folded": _to_nesterov_with("to_lookahead_folded", nesterov=0.55, estimator="folded"),
    "to_lookahead_folded_b02": _to_nesterov_with(
        "to_lookahead_folded_b02", nesterov=0.55, estimator="folded", beta=0.2
    ),
    "to_lookahead_folded_gate": _to_nesterov_with(
        "to_lookahead_folded_gate", nesterov=0.55, estimator=residual_gate.NAME
    ),
    "to_lookahead_folded_tuned": _to_nesterov_with(
        "to_lookahead_folded_tuned", nesterov=0.55, estimator="folded", tune_beta=1.0
    ),
}
STORED = ROOT / "recipes/results/study-proxy-v2-2026-11-30"
#: Held while a run trains, so that concurrent jobs on a shared machine take turns.
CPU_LOCK = Path("/tmp/hf_to_cpu.lock")


@functools.cache
def _stored_proxy_records() -> list[dict]:
    """The stored study's proxy runs, read once per process (every task's rate comes from them)."""
    return [r for r in study._load(STORED) if r["model"] == "proxy"]


def dropin_lr(task: str, model: str = "proxy") -> float:
    """AdamW's learning rate, at which every optimizer runs drop-in: on the real model the task's
    usual rate (``base_lr``), on the proxy the rate the stored study tuned AdamW to (selected on
    validation, seed 0)."""
    if model == "real":
        return study.TASKS[task].base_lr
    lr = study.tuned_lr(_stored_proxy_records(), task)
    if lr is None:
        raise SystemExit(f"long_runs: the stored study {STORED} has no tuned AdamW rate for task {task!r}")
    return lr


def done_runs(out: Path, label: str = "config") -> set[tuple[str, int, str]]:
    """(task, seed, ``label``) of the runs already in ``out`` (a runs.jsonl, whose folder is created),
    so that a rerun skips them."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        return set()
    return {(r["task"], r["seed"], r[label]) for r in map(json.loads, out.read_text().splitlines())}


def run(args: argparse.Namespace) -> None:
    out = args.out / "runs.jsonl"
    done = done_runs(out)
    torch.set_num_threads(args.threads)
    for name in args.tasks:
        task = dataclasses.replace(study.TASKS[name], steps=args.steps)
        lr = dropin_lr(name, args.model)
        for seed in args.seeds:
            for label in args.optimizers:
                if (name, seed, label) in done:
                    continue
                config = EXTRA.get(label) or study.CONFIGS[label]
                gate = residual_gate.register() if dict(config.kwargs).get("estimator") == residual_gate.NAME else None
                with CPU_LOCK.open("w") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    rec = study.run_one(task, args.model, config, lr, seed, {}, eval_every=args.eval_every)
                if gate is not None:
                    rec["gate_closed_share"] = gate.closed_share()
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
        model = "SmolLM2-135M" if by[next(iter(by))].get("model") == "real" else "proxy"
        lines += [f"### {name}, {model}, {runs[0]['steps']} steps, seeds {seeds}", ""]
        lines += [
            "| optimizer | val loss (mean ± std) | test loss (mean ± std) | test − AdamW per seed "
            "| test − NAdamW per seed | steps to the better peer's final val |"
        ]
        lines += ["|---|---|---|---|---|---|"]
        for label in labels:
            test = [by[label, s]["test"] for s in seeds]
            val = [by[label, s]["final_val"] for s in seeds]
            # a peer without a run for a seed (a study stopped early) shows "n/a" there
            d_adamw, d_nadamw = (
                " ".join(
                    f"{by[label, s]['test'] - by[peer, s]['test']:+.4f}" if (peer, s) in by else "n/a" for s in seeds
                )
                for peer in ("adamw", "nadamw")
            )
            reach = []
            for s in seeds:
                peers = [by[peer, s]["final_val"] for peer in ("adamw", "nadamw") if (peer, s) in by]
                if not peers:
                    reach.append("n/a")
                    continue
                target = min(peers)
                curve = by[label, s]["val_curve"]
                step = steps_to_target([c[0] for c in curve], [c[1] for c in curve], target)
                reach.append("never" if step is None else str(step))
            lines.append(
                f"| {label} | {format_mean_std(*mean_std(val), 4)} | {format_mean_std(*mean_std(test), 4)} | {d_adamw} | {d_nadamw} | {' '.join(reach)} |"
            )
        # paired over seeds: mean ± standard error, and the seeds where the label is behind
        for base in args.paired_with if len(seeds) > 2 else ():
            if base not in labels:
                lines += ["", f"Not paired with {base}: it has no run for every seed of this task.", ""]
                continue
            lines += ["", f"Paired with {base} over the seeds (mean ± s.e.; seeds behind it):", ""]
            for label in labels:
                if label == base:
                    continue
                parts = []
                for split, key in (("test", "test"), ("validation", "final_val")):
                    diff = [by[label, s][key] - by[base, s][key] for s in seeds]
                    m, sd = mean_std(diff)
                    behind = sum(d > 0 for d in diff)
                    parts.append(f"{split} {m:+.4f} ± {sd / len(diff) ** 0.5:.4f} ({behind} of {len(diff)} behind)")
                lines.append(f"- {label} − {base}: " + "; ".join(parts))
        lines.append("")
    text = "\n".join(lines)
    print(text)
    return text


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--tasks", nargs="+", default=["pydoc_full", "pydoc_lora", "code_lora"], choices=list(study.TASKS))
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS[:4]), choices=[*study.CONFIGS, *EXTRA])
    ap.add_argument(
        "--model",
        choices=["proxy", "real"],
        default="proxy",
        help="real: SmolLM2-135M at AdamW's usual rate of the task (study_spec.TASKS' base_lr)",
    )
    ap.add_argument("--eval-every", type=_positive, default=EVAL_EVERY, help="validation every this many steps")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "runs/long-runs")
    ap.add_argument("--report", action="store_true", help="print the tables of the runs in --out")
    ap.add_argument(
        "--paired-with",
        nargs="+",
        default=["nadamw"],
        choices=list(OPTIMIZERS),
        help="--report: the rows every other row is paired with over the seeds (default: NAdamW)",
    )
    args = ap.parse_args(argv)
    if args.report:
        (args.out / "REPORT.md").write_text(report(args))
    else:
        run(args)


if __name__ == "__main__":
    main()
