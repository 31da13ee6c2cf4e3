"""The study's report: ``<out>/REPORT.md`` (tuned and drop-in tables per task, the default's
candidates ranked, the tuning runs) and the loss plots, from the run records.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
from pathlib import Path
from typing import Any

import study_runner
import torch
from recipe_metrics import format_mean_std, mean_std, steps_to_target
from study_runner import table_runs
from study_spec import CANDIDATES, TASKS

__all__ = ["candidate_ranking", "report"]


def _steps_to(curve: list, target: float) -> int | None:
    """The first evaluation step of a ``(step, val, wall)`` curve at or below ``target``."""
    return steps_to_target([step for step, _, _ in curve], [val for _, val, _ in curve], target)


def _steps_vs_adamw(curve: list, target: float, adamw_steps: float | None) -> str:
    """'k (k / AdamW's k)': when a run first reached AdamW's final validation loss; '—' if never."""
    steps = _steps_to(curve, target)
    if steps is None:
        return "—"
    return f"{steps} ({steps / adamw_steps:.2f})" if adamw_steps else str(steps)


def _fmt(xs: list[float], digits: int = 4) -> str:
    return format_mean_std(*mean_std(xs), digits)


def _describe(config: str, lr: float, overrides: dict) -> str:
    extra = ", ".join(f"{k}={v}" for k, v in overrides.items())
    return f"lr {lr:.3g}" + (f", {extra}" if extra else "")


def report(records: list[dict[str, Any]], out: Path, kind: str) -> str:
    lines = [
        f"# Fine-tuning study ({kind} model)",
        "",
        f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by `recipes/study.py` "
        f"({platform.machine()}, torch {torch.__version__}). Test loss mean ± std over seeds; Δ = paired "
        "difference to AdamW per seed (negative: better than AdamW); 'steps to AdamW' = per seed, the first "
        f"evaluation step (every {study_runner.EVAL_EVERY}) whose validation loss is at or below AdamW's final "
        "validation loss in the same seed, and in brackets that step over the step where AdamW itself first got there "
        "(below 1: faster than AdamW); wall = training seconds per run (other jobs shared the machine: "
        "indicative only).",
        "",
    ]
    records = [r for r in records if r["model"] == kind]
    seeds = {r["seed"] for r in records if r.get("phase") in ("final", "dropin")}
    tables = {(table, task): table_runs(records, task, table, seeds) for table in ("final", "dropin") for task in TASKS}
    for table in ("final", "dropin"):
        title = (
            "Tuned (best validation config per optimizer)"
            if table == "final"
            else "Drop-in (AdamW's lr: its tuned one where a tuning phase ran; own defaults)"
        )
        for task in TASKS:
            by_config = tables[table, task]
            if len(by_config) < 2 or "adamw" not in by_config:
                continue
            base = {r["seed"]: r for r in by_config["adamw"]}
            target = {s: r["final_val"] for s, r in base.items()}
            own = {s: _steps_to(r["val_curve"], target[s]) for s, r in base.items()}
            lines += [f"## {title}: {task}", ""]
            lines += [
                "| optimizer | config | test loss | Δ test vs AdamW (per seed) | steps to AdamW (per seed) | wall (s) | state B/param |",
                "|---|---|---|---|---|---|---|",
            ]
            for label, rs in by_config.items():
                deltas = [r["test"] - base[r["seed"]]["test"] for r in rs if r["seed"] in base]
                steps = [
                    _steps_vs_adamw(r["val_curve"], target[r["seed"]], own[r["seed"]]) if r["seed"] in target else "—"
                    for r in rs
                ]
                lines.append(
                    f"| {label} | {_describe(label, rs[0]['lr'], rs[0]['overrides'])} | {_fmt([r['test'] for r in rs])} "
                    f"| {' '.join(f'{d:+.4f}' for d in deltas) or '—'} "
                    f"| {' '.join(steps)} "
                    f"| {statistics.mean(r['wall_s'] for r in rs):.0f} | {rs[0]['state_bytes_per_param']:.1f} |"
                )
            lines.append("")
    lines += _candidates_section(records, tables)
    tune = [r for r in records if r.get("phase") in ("tune", "tune_extra") and r["model"] == kind]
    if tune:
        lines += ["## Tuning runs (validation loss, one seed)", ""]
        for task in TASKS:
            rs = [r for r in tune if r["task"] == task]
            if not rs:
                continue
            lines += [
                f"**{task}**: "
                + "; ".join(
                    f"{r['config']} {_describe(r['config'], r['lr'], r['overrides'])}: {r['final_val']:.4f}"
                    for r in sorted(rs, key=lambda r: (r["config"], r["lr"], json.dumps(r["overrides"])))
                ),
                "",
            ]
    text = "\n".join(lines)
    (out / "REPORT.md").write_text(text)
    _plots(tables, out, kind)
    return text


def candidate_ranking(records: list[dict], tables: dict) -> list[tuple[str, dict[str, float], float]]:
    """Per default candidate: the mean paired validation-loss difference to AdamW's drop-in runs
    per task, and its mean over tasks (sorted, best first; only candidates run on every task)."""
    ranking = []
    for label in CANDIDATES:
        per_task = {}
        for task in TASKS:
            base = {r["seed"]: r["final_val"] for r in tables["dropin", task].get("adamw", [])}
            rs = [r for r in records if r["task"] == task and r["config"] == label and r["seed"] in base]
            if rs:
                per_task[task] = statistics.mean(r["final_val"] - base[r["seed"]] for r in rs)
        if per_task and len(per_task) == len([t for t in TASKS if tables["dropin", t].get("adamw")]):
            ranking.append((label, per_task, statistics.mean(per_task.values())))
    return sorted(ranking, key=lambda x: x[2])


def _candidates_section(records: list[dict], tables: dict) -> list[str]:
    ranking = candidate_ranking(records, tables)
    if not ranking:
        return []
    tasks = list(ranking[0][1])
    lines = [
        "## Choosing the default: candidates drop-in at AdamW's lr (validation loss)",
        "",
        "Diagonal TO with Adam's bias correction as the intercept's rate, the slope rate α × the floor δ² of "
        "its normalisation (`norm_floor`); mean over seeds of the paired difference of final *validation* "
        "loss to AdamW (negative: better); best first.",
        "",
        "| candidate | α | δ² | " + " | ".join(tasks) + " | mean |",
        "|---|---|---|" + "---|" * len(tasks) + "---|",
    ]
    for label, per_task, mean in ranking:
        kw = dict(CANDIDATES[label].kwargs)
        lines.append(
            f"| {label} | {kw['alpha']:g} | {kw['norm_floor']:g} | "
            + " | ".join(f"{per_task[t]:+.4f}" for t in tasks)
            + f" | {mean:+.4f} |"
        )
    return [*lines, ""]


def _plots(tables: dict[tuple[str, str], dict[str, list[dict]]], out: Path, kind: str) -> None:
    """Per (table, task) with two optimizers or more: validation loss vs step, vs wall time, minus AdamW's."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    for (table, task), by_config in tables.items():
        if len(by_config) >= 2:
            recs = [r for rs in by_config.values() for r in rs]
            fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
            base = [r for r in recs if r["config"] == "adamw"]
            base_curve = None
            if base:
                steps = [s for s, _, _ in base[0]["val_curve"]]
                base_curve = {
                    s: statistics.mean(dict((a, b) for a, b, _ in r["val_curve"])[s] for r in base) for s in steps
                }
            for label, all_rs in by_config.items():
                rs = [r for r in all_rs if not r["diverged"]]
                if not rs:
                    continue
                steps = [s for s, _, _ in rs[0]["val_curve"]]
                mean = [statistics.mean(dict((a, b) for a, b, _ in r["val_curve"])[s] for r in rs) for s in steps]
                walls = [statistics.mean(dict((a, c) for a, _, c in r["val_curve"])[s] for r in rs) for s in steps]
                axes[0].plot(steps, mean, marker=".", label=label)
                axes[1].plot(walls, mean, marker=".", label=label)
                if base_curve is not None:  # at the steps both evaluated (runs may differ in EVAL_EVERY)
                    both = [(s, m - base_curve[s]) for s, m in zip(steps[1:], mean[1:]) if s in base_curve]
                    axes[2].plot([s for s, _ in both], [d for _, d in both], marker=".", label=label)
            run_seeds = sorted({r["seed"] for r in recs})
            axes[0].set(xlabel="step", ylabel="validation loss", title="validation loss vs step")
            axes[1].set(xlabel="training seconds (evaluation excluded)", ylabel="validation loss", title="vs wall time")
            axes[2].axhline(0, color="black", lw=0.8)
            axes[2].set(
                xlabel="step", ylabel="Δ validation loss vs AdamW", title="difference to AdamW (below 0: better)"
            )
            for ax in axes:
                ax.grid(alpha=0.3)
            lo = min(min(b for _, b, _ in r["val_curve"][1:]) for r in recs if not r["diverged"])
            hi = statistics.median(r["val_curve"][1][1] for r in recs if not r["diverged"])
            axes[0].set_ylim(lo - 0.02, hi + 0.05)
            axes[1].set_ylim(lo - 0.02, hi + 0.05)
            axes[2].legend(fontsize=8)
            model = "SmolLM2-135M-Instruct" if kind == "real" else "proxy (3-layer Llama, SmolLM2 tokenizer)"
            what = "tuned" if table == "final" else "drop-in at AdamW's lr"
            fig.suptitle(f"{model} — {task} ({TASKS[task].steps} steps) — {what} — seeds {run_seeds}")
            fig.tight_layout()
            fig.savefig(out / f"{task}-{table}.png", dpi=90)
            plt.close(fig)
