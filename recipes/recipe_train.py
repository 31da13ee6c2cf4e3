"""The recipes' training run: one ``transformers.Trainer`` run and what it measures.

:func:`run_training` loads the model and data (:mod:`recipe_data`), trains with the optimizer
``TrainingArguments.optim`` names (``"trainable_to"`` once ``import hf_to`` has registered it)
or a peer passed as ``optimizer_cls_and_kwargs``, and returns the run's record: log history
with wall times, peak memory, optimizer state bytes, the optimizer's share of the step, and
which trainable and frozen tensors changed.
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import sys
import threading
import time
from typing import Any

from recipe_config import ModelArguments, RecipeError, ScriptArguments
from recipe_data import load_model_and_tokenizer, prepare_datasets
from recipe_metrics import state_tensors

__all__ = [
    "PeakMemory",
    "build_trainer",
    "fsdp_on_cpu_note",
    "note",
    "optimizer_state_bytes",
    "quiet_progress",
    "run_training",
]


class PeakMemory:
    """Peak memory of one run: CUDA peak allocated bytes, else the process's peak RSS.

    On CPU a background thread samples ``/proc/self/statm`` (Linux); elsewhere it falls back to
    ``ru_maxrss``, which is a lifetime peak of the process.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak_bytes = 0
        self.kind = "rss"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm", encoding="ascii") as handle:
                return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            import resource

            scale = 1 if sys.platform == "darwin" else 1024
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes, self._rss())

    def __enter__(self) -> PeakMemory:
        import torch

        gc.collect()
        if torch.cuda.is_available():
            self.kind = "cuda_allocated"
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak_bytes = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.kind == "cuda_allocated":
            self.peak_bytes = int(torch.cuda.max_memory_allocated())
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak_bytes = max(self.peak_bytes, self._rss())


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of optimizer state: ``state_bytes()`` when the optimizer has it, else a tensor sum
    (tensors kept in lists included)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
    if hasattr(inner, "state_bytes"):
        return int(inner.state_bytes())
    return sum(value.numel() * value.element_size() for value in state_tensors(inner))


def _timing_callback() -> Any:
    from transformers import TrainerCallback

    class WallTimeCallback(TrainerCallback):
        """Stamp every log entry with the seconds since training began, and time each
        optimizer step (``on_pre_optimizer_step`` to ``on_optimizer_step``) and each whole
        training step, so a run reports the optimizer's share of the step."""

        def __init__(self) -> None:
            self.start = time.perf_counter()
            self.optimizer_seconds: list[float] = []
            self.step_seconds: list[float] = []
            self._opt = self._step = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.start = time.perf_counter()

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._step = time.perf_counter()

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._opt = time.perf_counter()

        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.optimizer_seconds.append(time.perf_counter() - self._opt)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.step_seconds.append(time.perf_counter() - self._step)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if logs is not None and state.log_history:
                state.log_history[-1].setdefault("wall_time", time.perf_counter() - self.start)

    return WallTimeCallback()


def build_trainer(
    model: Any,
    tokenizer: Any,
    training_args: Any,
    train_dataset: Any,
    eval_dataset: Any,
    optimizer_cls_and_kwargs: tuple[type, dict[str, Any]] | None = None,
) -> Any:
    """A plain ``transformers.Trainer``; the optimizer comes from ``training_args.optim`` unless
    ``optimizer_cls_and_kwargs`` names one (a peer optimizer the Trainer has no name for)."""
    from transformers import Trainer, default_data_collator

    return Trainer(
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=default_data_collator,
        processing_class=tokenizer,
        callbacks=[_timing_callback()],
    )


def _snapshot_trainable(model: Any) -> dict[str, Any]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _frozen_fingerprints(model: Any) -> dict[str, tuple[float, float]]:
    """Cheap per-tensor fingerprints (sum, sum of squares in float64) of the frozen weights."""
    import torch

    out = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad and p.is_floating_point():
                x = p.detach().double()
                out[name] = (float(x.sum()), float((x * x).sum()))
    return out


def _is_main_process() -> bool:
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


def note(message: str) -> None:
    """One line for the user on stderr, from the main process only."""
    if _is_main_process():
        print(f"[hf_to recipes] {message}", file=sys.stderr, flush=True)


def fsdp_on_cpu_note(training_args: Any) -> str | None:
    """What to tell the user when FSDP is asked for on a machine without CUDA, else None.

    accelerate shards models with FSDP on GPUs only; on a CPU its FSDP config starts the
    processes as plain DDP (every rank holds the whole model and optimizer state)."""
    import torch

    env = os.environ.get("ACCELERATE_USE_FSDP", "").strip().lower() in ("1", "true", "yes", "on")
    if not (env or getattr(training_args, "fsdp", None)):
        return None
    if torch.cuda.is_available() and not getattr(training_args, "use_cpu", False):
        return None
    world = os.environ.get("WORLD_SIZE", "1")
    return (
        f"FSDP was asked for, but accelerate shards models only on GPUs: on this CPU the {world} "
        "process(es) train as DDP, each holding the whole model and optimizer state "
        "(recipes/accelerate_configs/ddp.yaml says so explicitly)"
    )


def quiet_progress(training_args: Any) -> bool:
    """When stderr is not a terminal (a redirected log), turn progress bars into plain lines:
    the Trainer prints its logs instead of a tqdm bar, and datasets/transformers bars are off.
    Returns whether it did."""
    if sys.stderr.isatty():
        return False
    import datasets
    import transformers

    training_args.disable_tqdm = True
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    return True


def run_training(
    script_args: ScriptArguments,
    training_args: Any,
    model_args: ModelArguments,
    *,
    datasets: tuple[Any, Any] | None = None,
    optimizer_cls_and_kwargs: tuple[type, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train once and return the run's record (log history with wall times, memory, state bytes).

    ``datasets`` lets several runs share one tokenisation; it must have been made with the same
    tokenizer and ``script_args``.
    """
    from transformers import set_seed

    from hf_to.threads import configure_threads

    threads = configure_threads()
    fsdp_note = fsdp_on_cpu_note(training_args)
    if fsdp_note:
        note(fsdp_note)
    quiet_progress(training_args)
    set_seed(training_args.seed)  # before the model exists, so LoRA initialisation is seeded
    model, tokenizer = load_model_and_tokenizer(model_args, training_args)
    train_dataset, eval_dataset = datasets if datasets is not None else prepare_datasets(script_args, tokenizer)
    if eval_dataset is None and str(getattr(training_args, "eval_strategy", "no")) not in ("no", "IntervalStrategy.NO"):
        raise RecipeError("eval_strategy is set but there is no eval dataset")
    trainable_before = _snapshot_trainable(model)
    frozen_before = _frozen_fingerprints(model)
    n_trainable = sum(p.numel() for p in trainable_before.values())
    n_total = sum(p.numel() for p in model.parameters())
    trainer = build_trainer(model, tokenizer, training_args, train_dataset, eval_dataset, optimizer_cls_and_kwargs)
    with PeakMemory() as memory:
        train_output = trainer.train()
        final_eval: dict[str, Any] = {}
        if eval_dataset is not None:
            # Reuse the evaluation of the last step when the schedule already ran it.
            last = [h for h in trainer.state.log_history if "eval_loss" in h]
            if last and last[-1].get("step") == trainer.state.global_step:
                final_eval = last[-1]
            else:
                final_eval = trainer.evaluate()
    changed = sum(
        int(not p.detach().equal(trainable_before[n])) for n, p in model.named_parameters() if n in trainable_before
    )
    frozen_after = _frozen_fingerprints(model)
    frozen_changed = sum(int(frozen_after.get(n) != v) for n, v in frozen_before.items())
    record = {
        "optim": str(getattr(training_args.optim, "value", training_args.optim)),
        "optim_args": training_args.optim_args,
        "seed": training_args.seed,
        "global_step": trainer.state.global_step,
        "train_runtime": train_output.metrics.get("train_runtime"),
        "train_steps_per_second": train_output.metrics.get("train_steps_per_second"),
        "train_loss_mean": train_output.metrics.get("train_loss"),
        "final_eval_loss": final_eval.get("eval_loss"),
        "final_eval_perplexity": math.exp(final_eval["eval_loss"]) if "eval_loss" in final_eval else None,
        "peak_memory_bytes": memory.peak_bytes,
        "peak_memory_kind": memory.kind,
        "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer),
        "trainable_parameters": n_trainable,
        "total_parameters": n_total,
        "trainable_tensors_changed": changed,
        "trainable_tensors": len(trainable_before),
        "frozen_tensors_changed": frozen_changed,
        "frozen_tensors": len(frozen_before),
        "train_sequences": len(train_dataset),
        "eval_sequences": len(eval_dataset) if eval_dataset is not None else 0,
        "threads": threads,
        "log_history": trainer.state.log_history,
    }
    timer = next((c for c in trainer.callback_handler.callbacks if hasattr(c, "optimizer_seconds")), None)
    if timer is not None and timer.optimizer_seconds:
        # Medians over the steps after the first (which creates the optimizer state).
        opt_s, step_s = (
            timer.optimizer_seconds[1:] or timer.optimizer_seconds,
            timer.step_seconds[1:] or timer.step_seconds,
        )
        record["optimizer_step_ms_median"] = 1e3 * statistics.median(opt_s)
        record["train_step_ms_median"] = 1e3 * statistics.median(step_s)
    if script_args.save_final_model and trainer.is_world_process_zero():
        trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero() and training_args.output_dir:
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(os.path.join(training_args.output_dir, "run_record.json"), "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2, default=str)
    del trainer, model
    gc.collect()
    return record
