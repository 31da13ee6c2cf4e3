"""The recipes' summary statistics: steps to reach a target, and mean ± std over seeds.

``compare.py`` (the Trainer runs), ``study.py`` and ``recipes/paper`` summarise their runs with
these, so that "steps to reach" and "mean ± std" mean the same thing in every report.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

__all__ = ["format_mean_std", "mean_std", "state_tensors", "steps_to_target"]


def state_tensors(optimizer: Any) -> Iterator[Any]:
    """Every tensor of an optimizer's state, those it keeps in lists or tuples too (SOAP keeps
    its per-dimension preconditioners in lists), for the runs' state-size figures."""
    import torch

    for state in optimizer.state.values():
        for entry in state.values():
            for value in entry if isinstance(entry, (list, tuple)) else (entry,):
                if isinstance(value, torch.Tensor):
                    yield value


def steps_to_target(steps: Sequence[int], values: Sequence[float], target: float, *, above: bool = False) -> int | None:
    """First recorded step at which ``values`` reaches ``target`` (≤, or ≥ with ``above``); None if never.

    Non-finite values never count as reaching it (a diverged run reaches nothing).
    """
    for step, value in zip(steps, values):
        if math.isfinite(value) and (value >= target if above else value <= target):
            return int(step)
    return None


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the values present (None and NaN are left out).

    The std is None with fewer than two values, the mean too with none.
    """
    present = [v for v in values if v is not None and not math.isnan(v)]
    if not present:
        return None, None
    return statistics.fmean(present), (statistics.stdev(present) if len(present) > 1 else None)


def format_mean_std(mean: float | None, std: float | None, digits: int, *, missing: str = "—") -> str:
    """``"m ± s"`` with ``digits`` decimals, ``"m"`` without a std, ``missing`` without a mean."""
    if mean is None:
        return missing
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"
