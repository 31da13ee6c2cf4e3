"""The plots of ``compare.py``, and a command that redraws them from a ``results.json``.

* ``loss_vs_step.png``: train and eval loss against the optimizer step (top), and each
  variant's loss minus the baseline's for the same seed (bottom), where differences of a few
  thousandths that the top panels cannot show are visible.
* ``loss_vs_wall_time.png``: the same losses against training time, evaluations excluded (the
  Trainer's periodic evaluations pause training; drawing through them would show them as
  training).

Mean over seeds, with a ±1 std band when there are several.  Redraw a committed run::

    .venv/bin/python recipes/compare_plots.py recipes/results/compare-smollm2-135m-lora-cpu-2026-11-29
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_title", "training_time_curve", "write_plots"]

#: Train-loss differences are averaged over this many neighbouring steps in the lower panel.
SMOOTH_STEPS = 5


def training_time_curve(record: dict[str, Any], key: str) -> list[tuple[int, float, float]]:
    """``(step, training seconds, value)`` for every log entry holding ``key``.

    Training seconds are the entry's ``wall_time`` minus the evaluations that ran before it
    (an evaluation entry's own ``eval_runtime`` included: it is stamped when the evaluation ends).
    """
    out, evaluated = [], 0.0
    for entry in record["log_history"]:
        evaluated += float(entry.get("eval_runtime", 0.0))
        if key in entry:
            out.append((entry["step"], entry.get("wall_time", math.nan) - evaluated, float(entry[key])))
    return out


def _mean_curve(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Mean over seeds of ``key`` at the steps every run logged: steps, training times, mean, std."""
    curves = [{s: (t, v) for s, t, v in training_time_curve(r, key)} for r in records]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    times = [statistics.fmean(c[s][0] for c in curves) for s in steps]
    means = [statistics.fmean(c[s][1] for c in curves) for s in steps]
    stds = [statistics.stdev([c[s][1] for c in curves]) if len(curves) > 1 else 0.0 for s in steps]
    return steps, times, means, stds


def _difference_curve(
    runs: list[dict[str, Any]], label: str, baseline: str, key: str, smooth: int
) -> tuple[list[int], list[float], list[float]]:
    """Mean over seeds of (label's ``key`` − baseline's, same seed and step): steps, mean, std."""
    diffs = []
    for run in (r for r in runs if r["label"] == label):
        base = next((r for r in runs if r["label"] == baseline and r["seed"] == run["seed"]), None)
        if base is None:
            continue
        mine = {s: v for s, _, v in training_time_curve(run, key)}
        ref = {s: v for s, _, v in training_time_curve(base, key)}
        steps = sorted(set(mine) & set(ref))
        raw = [mine[s] - ref[s] for s in steps]
        half = smooth // 2
        values = [statistics.fmean(raw[max(0, i - half) : i + half + 1]) for i in range(len(raw))]
        diffs.append(dict(zip(steps, values)))
    if not diffs:
        return [], [], []
    steps = sorted(set.intersection(*(set(d) for d in diffs)))
    means = [statistics.fmean(d[s] for d in diffs) for s in steps]
    stds = [statistics.stdev([d[s] for d in diffs]) if len(diffs) > 1 else 0.0 for s in steps]
    return steps, means, stds


def _model_name(results: dict[str, Any]) -> str:
    model = results.get("model_args", {})
    name = model.get("model_name_or_path", "model")
    name = "SmolLM2-135M-Instruct" if name == "embedded" else name.rstrip("/").split("/")[-1]
    if model.get("use_peft"):
        name += f" + {'QLoRA' if model.get('load_in_4bit') else 'LoRA'} r={model.get('lora_r')}"
    return name


def plot_title(results: dict[str, Any]) -> str:
    """The figure title, e.g. "<model> on <data>, 60 steps, seed 42", read from results.json."""
    data = results.get("script_args", {}).get("dataset_name", "data")
    data = "the Python language reference (pydoc)" if data == "pydoc" else data
    seeds = results.get("compare_args", {}).get("seeds", [])
    steps = results.get("training_args", {}).get("max_steps")
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))} (mean ± std)"
    step_text = f", {steps} steps" if steps and steps > 0 else ""
    return f"{_model_name(results)} on {data}{step_text}, {seed_text}"


def _band(ax: Any, xs: list[float], means: list[float], stds: list[float], color: str) -> None:
    if any(stds):
        lower = [m - s for m, s in zip(means, stds)]
        upper = [m + s for m, s in zip(means, stds)]
        ax.fill_between(xs, lower, upper, color=color, alpha=0.2)


def _finish(fig: Any, title: str, path: str) -> str:
    """Title, lay out, save and close ``fig``; return ``path``."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(runs: list[dict[str, Any]], output_dir: str, *, title: str = "", baseline: str = "adamw") -> list[str]:
    """Write ``loss_vs_step.png`` and ``loss_vs_wall_time.png`` into ``output_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["label"] for r in runs))
    colors = {label: f"C{i}" for i, label in enumerate(labels)}
    panels = (("loss", "train loss"), ("eval_loss", "eval loss"))
    has_baseline = baseline in labels and len(labels) > 1
    paths = []

    # Against the step: absolute losses, then the difference from the baseline.
    rows = 2 if has_baseline else 1
    fig, axes = plt.subplots(rows, 2, figsize=(12, 4.2 * rows), squeeze=False)
    for col, (key, name) in enumerate(panels):
        ax = axes[0][col]
        for label in labels:
            steps, _, means, stds = _mean_curve([r for r in runs if r["label"] == label], key)
            if steps:
                marker = "o" if key == "eval_loss" else None
                ax.plot(steps, means, label=label, color=colors[label], marker=marker, linewidth=1.2)
                _band(ax, steps, means, stds, colors[label])
        below = f" (differences from {baseline}'s below)" if has_baseline else ""
        ax.set(xlabel="optimizer step", ylabel=name, title=name + below)
        if has_baseline:
            ax = axes[1][col]
            smooth = SMOOTH_STEPS if key == "loss" else 1
            for label in labels:
                if label == baseline:
                    continue
                steps, means, stds = _difference_curve(runs, label, baseline, key, smooth)
                if steps:
                    marker = "o" if key == "eval_loss" else None
                    ax.plot(steps, means, label=label, color=colors[label], marker=marker, linewidth=1.2)
                    _band(ax, steps, means, stds, colors[label])
            ax.axhline(0.0, color=colors[baseline], linewidth=1.0, label=f"{baseline} (= 0)")
            how = f", {SMOOTH_STEPS}-step mean" if smooth > 1 else ""
            ax.set(
                xlabel="optimizer step",
                ylabel=f"{name} − {baseline}'s",
                title=f"{name} minus {baseline}'s, same seed{how} (below 0: better)",
            )
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend()
    paths.append(_finish(fig, title, os.path.join(output_dir, "loss_vs_step.png")))

    # Against training time, evaluations excluded.
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), squeeze=False)
    for ax, (key, name) in zip(axes[0], panels):
        for label in labels:
            steps, times, means, stds = _mean_curve([r for r in runs if r["label"] == label], key)
            if steps:
                marker = "o" if key == "eval_loss" else None
                ax.plot(times, means, label=label, color=colors[label], marker=marker, linewidth=1.2)
                _band(ax, times, means, stds, colors[label])
        ax.set(xlabel="training time, evaluations excluded (s)", ylabel=name, title=name)
        ax.grid(alpha=0.3)
        ax.legend()
    paths.append(_finish(fig, title, os.path.join(output_dir, "loss_vs_wall_time.png")))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Redraw compare.py's plots from a results folder's results.json.")
    parser.add_argument("folders", nargs="+", type=Path, help="folders holding a results.json written by compare.py")
    args = parser.parse_args(argv)
    for folder in args.folders:
        path = folder / "results.json"
        if not path.is_file():
            parser.error(f"{path} does not exist")
        results = json.loads(path.read_text(encoding="utf-8"))
        baseline = results.get("compare_args", {}).get("baseline", "adamw")
        written = write_plots(results["runs"], str(folder), title=plot_title(results), baseline=baseline)
        print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
