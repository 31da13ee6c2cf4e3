"""The recipes' plain PyTorch training loop (the study's runs, the proxy's pretraining, the paper's
networks); the Hugging Face runs use the ``Trainer`` instead (:mod:`recipe_train`).

One update is: forward (``loss_at(step)``), backward, optional gradient clipping,
``optimizer.step()``, ``zero_grad(set_to_none=True)``, optional scheduler step.  Evaluations
happen before the first update and after every ``eval_every``-th and the last one, through a
callback that may stop the run (a diverged evaluation).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["LoopRecord", "train_loop", "warmup_cosine"]


@dataclass
class LoopRecord:
    """What the loop measured so far (the evaluation callback sees it as it grows)."""

    #: The training loss of every update, in order.
    train_losses: list[float] = field(default_factory=list)
    #: Seconds spent in the updates (forward, backward, step, schedule); evaluations excluded.
    seconds: float = 0.0
    #: Seconds spent in ``optimizer.step()`` alone.
    optimizer_seconds: float = 0.0
    #: Updates done.
    steps: int = 0
    #: Whether a non-finite training loss or the evaluation callback ended the run early.
    stopped: bool = False


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """``LambdaLR`` factor: linear warm-up over ``warmup`` steps, then a cosine decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return factor


def train_loop(
    loss_at: Callable[[int], torch.Tensor],
    optimizer: Any,
    steps: int,
    *,
    clip_params: Iterable[torch.Tensor] | None = None,
    max_grad_norm: float = 1.0,
    scheduler: Any = None,
    eval_every: int = 0,
    on_eval: Callable[[int, LoopRecord], bool | None] | None = None,
    stop_on_nonfinite_loss: bool = False,
    train_eval_modes: bool = False,
) -> LoopRecord:
    """Run ``steps`` updates (numbered from 1) and return the :class:`LoopRecord`.

    ``clip_params``: clip their gradients' total norm to ``max_grad_norm`` before each step.
    ``on_eval(step, record)`` runs at step 0, after every ``eval_every``-th update and after the
    last; a true result stops the loop.  ``train_eval_modes``: the optimizer has ``train()`` /
    ``eval()`` modes (schedule-free): train mode for each update, eval mode for each evaluation
    after one and at the end.
    """
    record = LoopRecord()
    clip = list(clip_params) if clip_params is not None else None
    if on_eval is not None and on_eval(0, record):
        record.stopped = True
        return record
    for step in range(1, steps + 1):
        start = time.perf_counter()
        if train_eval_modes:
            optimizer.train()
        loss = loss_at(step)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(clip, max_grad_norm)
        step_start = time.perf_counter()
        optimizer.step()
        record.optimizer_seconds += time.perf_counter() - step_start
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        record.seconds += time.perf_counter() - start
        record.steps = step
        record.train_losses.append(loss.item())
        if stop_on_nonfinite_loss and not math.isfinite(record.train_losses[-1]):
            record.stopped = True
            break
        if on_eval is not None and ((eval_every and step % eval_every == 0) or step == steps):
            if train_eval_modes:
                optimizer.eval()
            if on_eval(step, record):
                record.stopped = True
                break
    if train_eval_modes:
        optimizer.eval()
    return record
