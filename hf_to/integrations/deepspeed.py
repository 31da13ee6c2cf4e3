"""DeepSpeed: which estimators run under ZeRO, checked before the first step.

DeepSpeed's ZeRO optimizer (stages 1-3) and its bf16 optimizer wrap the client optimizer
and overwrite each ``param_group["params"]`` with one flat fp32 partition per rank, a slice of
the concatenation of the group's parameters (``runtime/zero/stage_1_and_2.py``,
``stage3.py``, ``bf16_optimizer.py``).  The elementwise estimators (``folded``, ``diagonal``, ``none``)
run on such partitions; ``rank_one`` and ``full`` need each parameter whole and refuse them.

:class:`~hf_to.TrainableOptimizer` detects the partitions itself at its first step (see
:func:`hf_to.distributed.flattened_reason`).  The functions here fail earlier:
:func:`check_estimator` when the run is configured (before a model is loaded) and
:func:`check_wrapped_optimizer` right after ``deepspeed.initialize`` /
``accelerator.prepare``.  Neither imports deepspeed.
"""

from __future__ import annotations

import os
from typing import Any

from ..distributed import check_unflattened
from ..forms import FORMS
from ..optimizer import TrainableOptimizer

__all__ = ["check_estimator", "check_wrapped_optimizer", "deepspeed_requested", "find_trainable_optimizer"]

_TRUE = ("1", "true", "yes", "on")


def deepspeed_requested(training_args: Any = None) -> bool:
    """Whether this run trains under DeepSpeed: ``TrainingArguments.deepspeed`` is set, or
    ``accelerate launch`` was given a DeepSpeed config (it exports ``ACCELERATE_USE_DEEPSPEED``)."""
    if training_args is not None and getattr(training_args, "deepspeed", None):
        return True
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").strip().lower() in _TRUE


def check_estimator(estimator: str, *, tune_beta: float = 0.0, training_args: Any = None) -> None:
    """Raise ``ValueError`` if ``estimator`` (or ``tune_beta``) cannot run under the DeepSpeed this
    run requests."""
    if tune_beta and deepspeed_requested(training_args):
        raise ValueError(
            f"tune_beta={tune_beta} cannot run under DeepSpeed: ZeRO hands the optimizer one flat "
            "partition per param group and rank, so each rank would tune its own beta on its slice of "
            "the model. Use tune_beta=0 with DeepSpeed; with FSDP2 (accelerate's fsdp_version: 2) or "
            "DDP it tunes one beta per param group from the sums of all ranks"
        )
    form = FORMS.get(estimator)
    if form is not None and not form.coordinatewise and deepspeed_requested(training_args):
        raise ValueError(
            f"estimator={estimator!r} cannot run under DeepSpeed: ZeRO (and DeepSpeed's bf16 optimizer) "
            "hands the optimizer one flat partition per param group and rank, pieces of several "
            f"parameters, and the {estimator} estimator couples all elements of one parameter tensor. "
            "Use estimator='folded' (the default), estimator='diagonal' or estimator='none' with DeepSpeed, "
            "or FSDP2 (accelerate's "
            "fsdp_version: 2), where estimator='rank_one' runs on sharded parameters"
        )


def find_trainable_optimizer(optimizer: Any) -> TrainableOptimizer | None:
    """The :class:`TrainableOptimizer` inside wrappers that keep it as ``.optimizer``
    (accelerate's ``AcceleratedOptimizer``, DeepSpeed's ZeRO and bf16 optimizers), or ``None``."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        if isinstance(optimizer, TrainableOptimizer):
            return optimizer
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def check_wrapped_optimizer(optimizer: Any) -> None:
    """Raise ``ValueError`` now if the wrapped TrainableOptimizer holds flat partitions that its
    estimator cannot use (what its first step would raise); no-op for other optimizers."""
    opt = find_trainable_optimizer(optimizer)
    if opt is None:
        return
    for index, group in enumerate(opt.param_groups):
        for p in group["params"]:
            check_unflattened(
                p, opt._given_params, estimator=group["estimator"], alpha_scaling=group["alpha_scaling"], index=index
            )
