"""A fine-tuning study of TO against the optimizers users pick instead (AdamW, Adan, MARS,
Lion, schedule-free AdamW): same tasks, same tuning budget, selection on validation,
report on test over seeds with paired differences.

Tasks (``TASKS``), each on train / validation / test splits of whole documents:

* ``pydoc_lora``: LoRA (r=8, q/k/v/o) on the Python language reference (``pydoc_data``);
* ``code_lora``: LoRA on Python standard-library source code (a second text, another domain);
* ``pydoc_full``: full fine-tuning (every weight but the tied embeddings) on the language reference.

Models (``--model``): ``real`` is the embedded SmolLM2-135M-Instruct; ``proxy`` is a 3-layer,
128-wide Llama with SmolLM2's tokenizer (restricted to the tokens of the study's texts),
pretrained once by this script on other standard-library modules (``PROXY_PRETRAIN`` steps,
cached under ``$HF_TO_CACHE``) so that the tasks are fine-tuning, not training from scratch.
It is ~200x cheaper per step than SmolLM2-135M, for the wide sweeps; a cut-down SmolLM2 (its
first layers) is no proxy: its loss starts above 16 nats.

Phases (each appends one JSON line per run to ``<out>/runs.jsonl`` and skips runs already
there, so a phase can be interrupted and rerun):

* ``tune``: every optimizer on a learning-rate grid of ``GRID`` × (task base lr) × (the
  peer's documented lr ratio to AdamW), one seed; where an optimizer's best rate is at an
  edge of the rates it has tried, the grid goes on past that edge (× or ÷ 3, at most
  ``EDGE_EXTENSIONS`` times), the same rule for every optimizer;
* ``tune_extra``: TO forms on their α/β grid at their best rate;
* ``final``: each optimizer at its best validation config, ``--seeds`` (≥ 3; fresh seeds,
  not the tuning one, ``--tune-seed``);
* ``dropin``: each optimizer at AdamW's tuned lr with its own defaults, ``--seeds``;
* ``candidates``: the default's candidate forms (``CANDIDATES``) drop-in, ``--seeds``;
* ``report``: tables (tuned and drop-in per task; test loss mean ± std, paired differences
  against AdamW, steps to reach AdamW's final validation loss, wall time, state bytes per
  parameter; the candidates ranked on validation) into ``<out>/REPORT.md`` and loss plots (vs
  step and vs wall time).

The optimizer table is ``configs/study/optimizers.yaml``; the code is in ``study_spec.py``
(tasks, grid, the table read into :class:`Config` objects), ``study_data.py`` (texts, the proxy,
the models), ``study_runner.py`` (one run, the phases, the run records) and ``study_report.py``
(tables and plots); this script is their command line.

Usage (from the repository root)::

    python recipes/study.py --model proxy --workers 2 --out runs/study-proxy
    python recipes/study.py --model real --tasks pydoc_lora --phase dropin report --out runs/study-real \\
        --optimizers adamw to_adamwarm to_nesterov --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from study_report import report
from study_runner import EDGE_EXTENSIONS, load_records, run_one, run_phase, table_runs, tuned_lr
from study_spec import CANDIDATES, CONFIGS, TASKS, Config, Task

__all__ = [
    "CANDIDATES",
    "CONFIGS",
    "TASKS",
    "Config",
    "Task",
    "main",
    "parse_args",
    "run_one",
    "table_runs",
    "tuned_lr",
]

#: The run records of ``<out>/runs.jsonl`` (the name an experiment script imports).
_load = load_records


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=("proxy", "real"), default="proxy")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--optimizers", nargs="+", default=list(CONFIGS), help=f"of {', '.join(CONFIGS)}")
    parser.add_argument(
        "--phase",
        nargs="+",
        default=["tune", "tune_extra", "final", "dropin", "candidates", "report"],
        choices=("tune", "tune_extra", "final", "dropin", "candidates", "report"),
    )
    parser.add_argument("--tune-seed", type=int, default=0, help="the seed of the tuning runs")
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[1, 2, 3], help="the reported seeds (final, dropin, candidates)"
    )
    parser.add_argument("--steps", type=int, default=None, help="override every task's step count")
    parser.add_argument("--workers", type=int, default=1, help="parallel runs (one thread each)")
    parser.add_argument("--out", default="runs/study")
    args = parser.parse_args(argv)
    unknown = [o for o in args.optimizers if o not in CONFIGS]
    if unknown:
        parser.error(f"unknown optimizer(s) {unknown}; known: {', '.join(CONFIGS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    tasks = [TASKS[t] for t in args.tasks]
    if args.steps is not None:
        tasks = [dataclasses.replace(t, steps=args.steps) for t in tasks]
        TASKS.update({t.name: t for t in tasks})
    configs = [CONFIGS[c] for c in args.optimizers]
    for phase in args.phase:
        if phase == "report":
            print(report(load_records(out), out, args.model))
        elif phase == "candidates":
            run_phase(phase, tasks, args.model, list(CANDIDATES.values()), args.seeds, out, args.workers)
        elif phase == "tune_extra":
            run_phase(phase, tasks, args.model, configs, [args.tune_seed], out, args.workers)
        elif phase == "tune":
            run_phase(phase, tasks, args.model, configs, [args.tune_seed], out, args.workers)
            for _ in range(EDGE_EXTENSIONS):  # each pass goes one rate further where needed
                run_phase("tune_edge", tasks, args.model, configs, [args.tune_seed], out, args.workers)
        else:
            run_phase(phase, tasks, args.model, configs, args.seeds, out, args.workers)
    print(f"[study] wrote {out}/runs.jsonl, {out}/REPORT.md and plots", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
