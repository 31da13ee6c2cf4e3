"""Compare AdamW (fused) with Trainable Optimizer variants on the same fine-tuning job.

Every run uses the same model, data, seed, data order, number of steps and learning-rate
schedule; only ``optim`` / ``optim_args`` change.  Writes into ``output_dir``:

* ``results.json``: every run's record (log history with wall times) and the summary;
* ``results.md``: the summary table (mean ± std over seeds when there are several);
* ``loss_vs_step.png`` and ``loss_vs_wall_time.png``: train and eval loss curves, and the
  difference from the baseline (``compare_plots.py`` redraws them from ``results.json``).

Usage (from the repository root; the default job is the embedded SmolLM2-135M with LoRA on
the Python language reference, about 13 minutes from a fresh clone on an idle 2-core CPU,
measured 2026-12-07)::

    .venv/bin/python recipes/compare.py        # = --config recipes/configs/compare_smollm2_135m_lora_cpu.yaml

    # shorter, other variants, three seeds
    .venv/bin/python recipes/compare.py --config recipes/configs/compare_smollm2_135m_lora_cpu.yaml \\
        --max_steps 20 --seeds 0 1 2 \\
        --variants adamw=adamw_torch_fused to_rank_one=trainable_to:estimator=rank_one,alpha=0.05

A variant is ``label=optim[:optim_args]`` (the label is optional).  ``optim`` is any Trainer
optimizer name (``--optim``) or a peer of ``recipes/peers.py``: ``adan``, ``mars``, ``lion``
(pytorch-optimizer), ``nadamw`` (torch's NAdam, decoupled decay) or ``sf_adamw`` (schedulefree),
built from their package defaults at the run's learning rate and weight decay; ``optim_args``
then sets their keywords (``lion:betas=0.95/0.98``).
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import runtime_env  # noqa: F401  (first: sets OpenMP's wait policy before torch loads)
from compare_plots import plot_title, write_plots
from peers import PEERS, PeerError, optimizer_kwargs
from peers import peer as peer_spec
from recipe_config import CONFIG_DIR, ModelArguments, RecipeError, ScriptArguments, parse_recipe_args, run_cli
from recipe_data import load_tokenizer, prepare_datasets
from recipe_metrics import format_mean_std, mean_std, steps_to_target
from recipe_train import note, quiet_progress, run_training
from transformers import TrainingArguments
from transformers.training_args import OptimizerNames

import hf_to
from hf_to.integrations.transformers import OPTIM_NAME, to_kwargs_from_training_args

__all__ = ["DEFAULT_CONFIG", "CompareArguments", "Variant", "main", "parse_args", "parse_variant", "summarize"]

#: Read when no --config is given: the embedded SmolLM2-135M + LoRA job, sized for 2 CPU cores.
DEFAULT_CONFIG = CONFIG_DIR / "compare_smollm2_135m_lora_cpu.yaml"

#: AdamW, the peer a user would pick instead (NAdamW: torch's NAdam with decoupled decay) and TO
#: with its package defaults; other TO forms (rank-one, ...) are the study's (recipes/study.py).
DEFAULT_VARIANTS = [
    "adamw=adamw_torch_fused",
    "nadamw=nadamw",
    "to_default=trainable_to",
]


@dataclass
class CompareArguments:
    """The comparison's own settings (the ``compare:`` section of a YAML config)."""

    variants: list[str] = field(
        default_factory=lambda: list(DEFAULT_VARIANTS),
        metadata={"help": "Runs as label=optim[:optim_args], e.g. to_rank_one=trainable_to:estimator=rank_one."},
    )
    seeds: list[int] = field(default_factory=lambda: [42], metadata={"help": "One run per variant and seed."})
    baseline: str = field(
        default="adamw", metadata={"help": "Label whose final eval loss the 'steps to reach' column targets."}
    )
    final_train_window: int = field(
        default=10, metadata={"help": "Final train loss = mean of the last this-many logged train losses."}
    )


#: Peers run through ``optimizer_cls_and_kwargs`` (the Trainer has no name for them); schedule-free
#: AdamW maps to the Trainer's own ``schedule_free_adamw``, which also switches its train/eval modes.
_TRAINER_NAMES = {"adamw": "adamw_torch_fused", "sf_adamw": "schedule_free_adamw", "to": "trainable_to"}


@dataclass(frozen=True)
class Variant:
    label: str
    optim: str
    optim_args: str | None
    peer: str | None = None  #: a peer of recipes/peers.py run through optimizer_cls_and_kwargs


def parse_variant(spec: str) -> Variant:
    """``label=optim[:optim_args]`` -> :class:`Variant`; the optimizer name must be known."""
    label, sep, rest = spec.partition("=")
    if not sep or ":" in label or "," in label:
        label, rest = "", spec
    optim, _, optim_args = rest.partition(":")
    optim = optim.strip()
    peer = None
    if optim in PEERS:
        try:
            peer_spec(optim).load()  # a clear error now if its package is missing
        except PeerError as exc:
            raise RecipeError(f"variant {spec!r}: {exc}") from None
        if optim in _TRAINER_NAMES:
            optim = _TRAINER_NAMES[optim]
        else:
            peer, optim = optim, "adamw_torch"  # the Trainer's name is a placeholder; the peer is built
            _peer_kwargs(optim_args or "", spec)
    try:
        OptimizerNames(optim)
    except ValueError as exc:
        known = ", ".join(sorted({*(o.value for o in OptimizerNames), *PEERS}))
        raise RecipeError(f"variant {spec!r}: unknown optimizer {optim!r}; known: {known}") from exc
    if not label:
        name = peer or optim
        label = name if not optim_args else f"{name}[{optim_args}]"
    variant = Variant(label=label.strip(), optim=optim, optim_args=(optim_args.strip() or None), peer=peer)
    if optim == OPTIM_NAME:
        # Check the keywords now, not when this variant's turn comes after other trainings.
        try:
            to_kwargs_from_training_args(_ArgsView(optim_args=variant.optim_args, learning_rate=1e-3, weight_decay=0.0))
        except ValueError as exc:
            raise RecipeError(f"variant {spec!r}: {exc}") from None
    return variant


@dataclass
class _ArgsView:
    """The few ``TrainingArguments`` fields the ``trainable_to`` handler reads."""

    optim_args: str | None
    learning_rate: float
    weight_decay: float
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8


def _peer_kwargs(optim_args: str, spec: str) -> dict[str, Any]:
    """``key=value`` pairs for a peer; numbers parsed, ``a/b`` a tuple (``betas=0.9/0.99``)."""

    def value(raw: str) -> Any:
        if "/" in raw:
            return tuple(value(x) for x in raw.split("/"))
        low = raw.lower()
        if low in ("true", "false"):
            return low == "true"
        try:
            return int(raw)
        except ValueError:
            try:
                return float(raw)
            except ValueError:
                return raw

    out = {}
    for entry in filter(None, optim_args.replace(" ", "").split(",")):
        key, sep, raw = entry.partition("=")
        if not sep or not key or not raw:
            raise RecipeError(f"variant {spec!r}: malformed optim_args entry {entry!r} (expected key=value)")
        out[key] = value(raw)
    return out


def _peer_optimizer(variant: Variant, args: TrainingArguments) -> tuple[type, dict[str, Any]] | None:
    """``(cls, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)`` when the variant is a peer."""
    if variant.peer is None:
        return None
    extra = _peer_kwargs(variant.optim_args or "", "")
    lr, decay = extra.pop("lr", args.learning_rate), extra.pop("weight_decay", args.weight_decay)
    kwargs = optimizer_kwargs(variant.peer, lr, weight_decay=decay, **extra)
    return peer_spec(variant.peer).load(), kwargs


def parse_args(
    argv: Sequence[str] | None = None,
) -> tuple[CompareArguments, ScriptArguments, TrainingArguments, ModelArguments]:
    compare_args, script_args, training_args, model_args = parse_recipe_args(
        (CompareArguments, ScriptArguments, TrainingArguments, ModelArguments),
        argv,
        extra_sections={"compare": CompareArguments},
        default_config=DEFAULT_CONFIG,
        description=__doc__,
    )
    return compare_args, script_args, training_args, model_args


def _run_args(training_args: TrainingArguments, variant: Variant, seed: int, output_dir: str) -> TrainingArguments:
    args = copy.deepcopy(training_args)
    args.optim = OptimizerNames(variant.optim)
    args.optim_args = None if variant.peer else variant.optim_args
    args.seed = seed
    args.data_seed = seed
    args.output_dir = output_dir
    return args


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def _curve(record: dict[str, Any], key: str) -> list[tuple[int, float, float]]:
    """``(step, wall_time, value)`` for every log entry holding ``key``."""
    return [(h["step"], h.get("wall_time", math.nan), float(h[key])) for h in record["log_history"] if key in h]


def _steps_to_reach(record: dict[str, Any], target: float | None) -> int | None:
    """The first logged step whose eval loss is at or below ``target`` (the baseline's final one)."""
    if target is None:
        return None
    curve = _curve(record, "eval_loss")
    return steps_to_target([step for step, _, _ in curve], [value for _, _, value in curve], target)


def summarize(runs: list[dict[str, Any]], baseline: str, window: int) -> list[dict[str, Any]]:
    """One row per variant: each metric's mean (and std over seeds), in run order."""
    baseline_eval = {r["seed"]: r["final_eval_loss"] for r in runs if r["label"] == baseline}
    labels = list(dict.fromkeys(r["label"] for r in runs))
    rows = []
    for label in labels:
        mine = [r for r in runs if r["label"] == label]
        per_run = {
            "final_train_loss": [
                statistics.fmean([v for _, _, v in _curve(r, "loss")[-window:]]) if _curve(r, "loss") else None
                for r in mine
            ],
            "final_eval_loss": [r["final_eval_loss"] for r in mine],
            "eval_perplexity": [r["final_eval_perplexity"] for r in mine],
            "wall_time_s": [r["train_runtime"] for r in mine],
            "steps_per_s": [r["global_step"] / r["train_runtime"] if r["train_runtime"] else None for r in mine],
            "peak_memory_mib": [r["peak_memory_bytes"] / 2**20 for r in mine],
            "optimizer_state_mib": [r["optimizer_state_bytes"] / 2**20 for r in mine],
            # Median time of optimizer.step() and its share of the whole training step.
            "optimizer_ms": [r.get("optimizer_step_ms_median") for r in mine],
            "optimizer_share_pct": [
                100 * r["optimizer_step_ms_median"] / r["train_step_ms_median"]
                if r.get("optimizer_step_ms_median") is not None and r.get("train_step_ms_median")
                else None
                for r in mine
            ],
        }
        reached = [_steps_to_reach(r, baseline_eval.get(r["seed"])) for r in mine]
        row: dict[str, Any] = {"label": label, "optim": mine[0]["optim"], "optim_args": mine[0]["optim_args"]}
        row["seeds"] = [r["seed"] for r in mine]
        for key, values in per_run.items():
            row[key], row[f"{key}_std"] = mean_std(values)
        row["steps_to_baseline"], row["steps_to_baseline_std"] = mean_std([s for s in reached if s is not None])
        row["reached_baseline"] = sum(s is not None for s in reached)
        row["peak_memory_kind"] = mine[0]["peak_memory_kind"]
        rows.append(row)
    return rows


def _fmt(mean: float | None, std: float | None, digits: int) -> str:
    return format_mean_std(mean, std, digits, missing="n/a")


def markdown_table(rows: list[dict[str, Any]], baseline: str, n_seeds: int) -> str:
    memory = "peak GPU memory (MiB)" if rows and rows[0]["peak_memory_kind"] == "cuda_allocated" else "peak RSS (MiB)"
    header = [
        "optimizer",
        "final train loss",
        "final eval loss",
        "eval perplexity",
        f"steps to {baseline}'s final eval loss",
        "wall time (s)",
        "steps/s",
        memory,
        "optimizer state (MiB)",
        "optimizer step (ms)",
        "share of train step (%)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        reach = (
            "not reached"
            if row["reached_baseline"] == 0
            else _fmt(row["steps_to_baseline"], row["steps_to_baseline_std"], 0)
            + (f" ({row['reached_baseline']}/{n_seeds} seeds)" if row["reached_baseline"] < n_seeds else "")
        )
        name = row["label"] + (
            f" (`{row['optim']}` `{row['optim_args']}`)" if row["optim_args"] else f" (`{row['optim']}`)"
        )
        cells = [
            name,
            _fmt(row["final_train_loss"], row["final_train_loss_std"], 4),
            _fmt(row["final_eval_loss"], row["final_eval_loss_std"], 4),
            _fmt(row["eval_perplexity"], row["eval_perplexity_std"], 3),
            reach,
            _fmt(row["wall_time_s"], row["wall_time_s_std"], 1),
            _fmt(row["steps_per_s"], row["steps_per_s_std"], 3),
            _fmt(row["peak_memory_mib"], row["peak_memory_mib_std"], 0),
            _fmt(row["optimizer_state_mib"], row["optimizer_state_mib_std"], 2),
            _fmt(row["optimizer_ms"], row["optimizer_ms_std"], 1),
            _fmt(row["optimizer_share_pct"], row["optimizer_share_pct_std"], 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _environment() -> dict[str, Any]:
    import torch
    import transformers

    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_to": hf_to.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(
    compare_args: CompareArguments,
    script_args: ScriptArguments,
    training_args: TrainingArguments,
    model_args: ModelArguments,
) -> dict[str, Any]:
    """Run every variant for every seed, then write results.json, results.md and the plots."""
    variants = [parse_variant(v) for v in compare_args.variants]
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise RecipeError(f"variant labels must be unique, got {labels}")
    if compare_args.baseline not in labels:
        raise RecipeError(f"baseline {compare_args.baseline!r} is not one of the variants {labels}")
    root = training_args.output_dir
    os.makedirs(root, exist_ok=True)
    script_args = copy.copy(script_args)
    script_args.save_final_model = False
    quiet_progress(training_args)
    tokenizer = load_tokenizer(model_args)
    datasets = prepare_datasets(script_args, tokenizer, seed=compare_args.seeds[0])
    runs: list[dict[str, Any]] = []
    jobs = [(seed, v) for seed in compare_args.seeds for v in variants]
    for i, (seed, variant) in enumerate(jobs, 1):
        note(f"run {i}/{len(jobs)}: {variant.label}, seed {seed}")
        run_dir = os.path.join(root, "runs", f"{variant.label}-seed{seed}")
        args = _run_args(training_args, variant, seed, run_dir)
        record = run_training(
            script_args, args, model_args, datasets=datasets, optimizer_cls_and_kwargs=_peer_optimizer(variant, args)
        )
        record["label"] = variant.label
        if variant.peer:
            record["optim"], record["optim_args"] = variant.peer, variant.optim_args
        runs.append(record)
    rows = summarize(runs, compare_args.baseline, compare_args.final_train_window)
    table = markdown_table(rows, compare_args.baseline, len(compare_args.seeds))
    results = {
        "environment": {**_environment(), "threads": runs[0].get("threads") if runs else None},
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "compare_args": asdict(compare_args),
        "script_args": asdict(script_args),
        "model_args": asdict(model_args),
        "training_args": json.loads(training_args.to_json_string()),
        "summary": rows,
        "runs": runs,
    }
    plots = write_plots(runs, root, title=plot_title(results), baseline=compare_args.baseline)
    results["plots"] = [os.path.basename(p) for p in plots]
    written = [os.path.join(root, "results.json"), os.path.join(root, "results.md"), *plots]
    with open(written[0], "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2, default=str)
    with open(written[1], "w", encoding="utf-8") as handle:
        handle.write(table)
    print("\n" + table)
    print("wrote " + ", ".join(written) + f" (and each run's record under {os.path.join(root, 'runs')})")
    return results


def cli(argv: Sequence[str] | None = None) -> int:
    return run_cli("compare.py", main, parse_args, argv)


if __name__ == "__main__":
    sys.exit(cli())
