"""Running the study: one fine-tuning run, the phases' plans, and the run records they append to
``<out>/runs.jsonl`` (read back to select the best configs and to skip runs already done).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from peers import PEERS, build_optimizer, needs_train_eval
from recipe_loop import LoopRecord, train_loop, warmup_cosine
from recipe_metrics import state_tensors
from study_data import build_model, evaluate, lm_loss, proxy_checkpoint, task_data
from study_spec import ALL_CONFIGS, CONFIGS, EDGE_EXTENSIONS, GRID, TASKS, Config, Task

__all__ = ["EVAL_EVERY", "load_records", "run_one", "run_phase", "table_runs"]

#: Validation every this many steps (the 'steps to AdamW' column's resolution).
EVAL_EVERY = 10


def run_one(
    task: Task,
    kind: str,
    config: Config,
    lr: float,
    seed: int,
    overrides: dict[str, Any],
    eval_every: int = EVAL_EVERY,
) -> dict[str, Any]:
    """Fine-tune once; return the record (validation curve, test loss, wall time, state size)."""
    torch.manual_seed(seed)
    data = task_data(task)
    model, remap = build_model(kind, task.mode)
    splits = {k: (remap[v] if remap is not None else v) for k, v in data.items()}
    val, test = splits["val"][: task.val_blocks], splits["test"][: task.test_blocks]
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    kwargs = {**dict(config.kwargs), **overrides}
    warmup = max(1, task.steps // 20)
    opt = build_optimizer(config.peer, params, lr, weight_decay=0.0, warmup_steps=warmup, **kwargs)
    schedule_free = PEERS[config.peer].schedule_free
    sched = None if schedule_free else torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, task.steps))
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(splits["train"]), generator=gen)
    curve = []

    def loss_at(step: int) -> torch.Tensor:
        idx = order[((step - 1) * task.batch + torch.arange(task.batch)) % len(order)]
        return lm_loss(model, splits["train"][idx])

    def validate(step: int, record: LoopRecord) -> None:
        curve.append((step, evaluate(model, val), record.seconds))

    loop = train_loop(
        loss_at,
        opt,
        task.steps,
        clip_params=params,
        scheduler=sched,
        eval_every=eval_every,
        on_eval=validate,
        stop_on_nonfinite_loss=True,
        train_eval_modes=needs_train_eval(opt),
    )
    diverged = loop.stopped
    state_bytes = sum(v.numel() * v.element_size() for v in state_tensors(opt) if v.numel() > 1)
    return {
        **_run_id(task, kind, config, lr, seed, overrides),
        "val_curve": curve,
        "train_losses": loop.train_losses,
        "final_val": curve[-1][1] if not diverged else float("inf"),
        "test": evaluate(model, test) if not diverged else float("inf"),
        "initial_val": curve[0][1],
        "wall_s": loop.seconds,
        "state_bytes_per_param": state_bytes / n_params,
        "trainable_params": n_params,
        "diverged": diverged,
    }


# -- phases --------------------------------------------------------------------------------


def _run_id(task: Task, kind: str, config: Config, lr: float, seed: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """The fields that name a run (its record starts with them; :func:`_key` reads them)."""
    return {"task": task.name, "model": kind, "config": config.label, "lr": lr, "seed": seed, "overrides": overrides}


def _key(rec: dict[str, Any]) -> tuple:
    return (rec["task"], rec["model"], rec["config"], f"{rec['lr']:.3g}", rec["seed"], json.dumps(rec["overrides"]))


def load_records(out: Path) -> list[dict[str, Any]]:
    path = out / "runs.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _lr_grid(task: Task, config: Config, kind: str = "real") -> list[float]:
    scale = PEERS[config.peer].lr_scale
    base = task.proxy_base_lr if kind == "proxy" and task.proxy_base_lr else task.base_lr
    return [base * scale * m for m in GRID]


def _edge_rate(records: list[dict[str, Any]], task: Task, config: Config, kind: str) -> float | None:
    """The next rate past the edge of the tried rates where the best one sits; None if it is inside.

    Only learning-rate runs count (no α/β overrides); the step is the grid's ratio, 3, and at
    most ``EDGE_EXTENSIONS`` rates are tried past each end of :func:`_lr_grid`.
    """
    pool = [
        r
        for r in records
        if r["task"] == task.name and r["config"] == config.label and r.get("phase") == "tune" and not r["overrides"]
    ]
    if not pool:
        return None
    grid = _lr_grid(task, config, kind)
    lrs = sorted({r["lr"] for r in pool})
    best = min(pool, key=lambda r: r["final_val"])["lr"]
    if math.isclose(best, lrs[-1], rel_tol=1e-9) and sum(lr > max(grid) * 1.01 for lr in lrs) < EDGE_EXTENSIONS:
        return best * 3
    if math.isclose(best, lrs[0], rel_tol=1e-9) and sum(lr < min(grid) / 1.01 for lr in lrs) < EDGE_EXTENSIONS:
        return best / 3
    return None


def tuned_lr(records: list[dict[str, Any]], task: str, config: str = "adamw") -> float | None:
    """The learning rate ``config`` was tuned to on ``task`` (selected on validation, one seed);
    the drop-in table runs every optimizer and seed at AdamW's."""
    best = _select(records, task, config)
    return None if best is None else best["lr"]


def _select(records: list[dict[str, Any]], task: str, config: str) -> dict[str, Any] | None:
    """The tuning run (lr grid, then α/β grid) with the lowest final validation loss (one seed)."""
    pool = [
        r for r in records if r["task"] == task and r["config"] == config and r.get("phase") in ("tune", "tune_extra")
    ]
    return min(pool, key=lambda r: r["final_val"]) if pool else None


def _matching(records: list[dict], task: str, config: str, lr: float, overrides: dict, seeds: set[int]) -> list[dict]:
    """The runs of one configuration, whatever phase ran them (a tuning run serves its seed)."""
    return sorted(
        (
            r
            for r in records
            if r["task"] == task
            and r["config"] == config
            and math.isclose(r["lr"], lr, rel_tol=1e-9)
            and r["overrides"] == overrides
            and r["seed"] in seeds
        ),
        key=lambda r: r["seed"],
    )


def table_runs(records: list[dict], task: str, table: str, seeds: set[int]) -> dict[str, list[dict]]:
    """Per config, the runs of the ``final`` (tuned) or ``dropin`` table."""
    out = {}
    base = _select(records, task, "adamw")
    if base is None:  # a drop-in phase run without tuning (the real model): AdamW's drop-in lr
        base = next(
            (r for r in records if r["task"] == task and r["config"] == "adamw" and r.get("phase") == "dropin"), None
        )
    for label in CONFIGS:
        if table == "final":
            best = _select(records, task, label)
            rs = _matching(records, task, label, best["lr"], best["overrides"], seeds) if best else []
        else:
            rs = _matching(records, task, label, base["lr"], {}, seeds) if base else []
        if rs:
            out[label] = rs
    return out


def _plan(
    phase: str, tasks: list[Task], kind: str, configs: list[Config], seeds: list[int], records: list[dict]
) -> list:
    jobs = []
    for task in tasks:
        for config in configs:
            if phase == "tune":
                jobs += [(task, config, lr, seeds[0], {}) for lr in _lr_grid(task, config, kind)]
            elif phase == "tune_edge":
                lr = _edge_rate(records, task, config, kind)
                if lr is not None:
                    jobs.append((task, config, lr, seeds[0], {}))
            elif phase == "tune_extra" and config.extra_grid:
                best = _select(records, task.name, config.label)
                if best is None:
                    continue
                jobs += [(task, config, best["lr"], seeds[0], dict(extra)) for extra in config.extra_grid]
            elif phase == "final":
                best = _select(records, task.name, config.label)
                if best is not None:
                    jobs += [(task, config, best["lr"], s, best["overrides"]) for s in seeds]
            elif phase in ("dropin", "candidates"):
                base = _select(records, task.name, "adamw")
                lr = base["lr"] if base is not None else _lr_grid(task, CONFIGS["adamw"], kind)[1]
                jobs += [(task, config, lr, s, {}) for s in seeds]
    # Seed-major order: a phase cut short still leaves paired runs.
    return sorted(jobs, key=lambda j: (j[0].name, j[3])) if phase in ("final", "dropin") else jobs


def _worker(args: tuple) -> dict[str, Any]:
    task_name, kind, label, lr, seed, overrides, phase = args
    torch.set_num_threads(int(os.environ.get("STUDY_THREADS", "1")))
    rec = run_one(TASKS[task_name], kind, ALL_CONFIGS[label], lr, seed, overrides)
    rec["phase"] = phase
    return rec


def run_phase(
    phase: str, tasks: list[Task], kind: str, configs: list[Config], seeds: list[int], out: Path, workers: int
):
    records = load_records(out)
    done = {_key(r) for r in records}
    jobs = []
    records = [r for r in records if r["model"] == kind]
    for task, config, lr, seed, overrides in _plan(phase, tasks, kind, configs, seeds, records):
        probe = _run_id(task, kind, config, lr, seed, overrides)
        if _key(probe) not in done:
            done.add(_key(probe))
            # A run past the grid's edge is a tuning run like the others.
            jobs.append((task.name, kind, config.label, lr, seed, overrides, "tune" if phase == "tune_edge" else phase))
    print(f"[study] phase {phase}: {len(jobs)} runs", flush=True)
    if kind == "proxy" and jobs:
        proxy_checkpoint()  # once, before any worker needs it
    out.mkdir(parents=True, exist_ok=True)
    results = (out / "runs.jsonl").open("a")
    t0 = time.time()
    if workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("fork").Pool(workers)
        it: Iterable = pool.imap_unordered(_worker, jobs)
    else:
        it = map(_worker, jobs)
    for i, rec in enumerate(it, 1):
        results.write(json.dumps(rec) + "\n")
        results.flush()
        print(
            f"[study] {i}/{len(jobs)} {rec['task']} {rec['config']} lr={rec['lr']:.3g} seed={rec['seed']} "
            f"{rec['overrides'] or ''} val={rec['final_val']:.4f} test={rec['test']:.4f} "
            f"({rec['wall_s']:.0f} s train; {time.time() - t0:.0f} s elapsed)",
            flush=True,
        )
    if workers > 1:
        pool.close()
        pool.join()
