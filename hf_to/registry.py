"""Named variants of the Trainable Optimizer and a PEFT-style ``create_optimizer`` factory.

``VARIANTS`` maps a name to the keyword arguments that define it; :func:`load_optimizer`
returns a constructor with those presets.  Tests loop over the registry, so a new entry is
tested for free.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .optimizer import TrainableOptimizer

__all__ = ["PAPER_LITERAL", "VARIANTS", "create_optimizer", "load_optimizer", "param_groups_for"]

#: The paper's plain update: step along Ĝ, raw slope rate, b_0 = 0.
PAPER_LITERAL: dict[str, Any] = {"preconditioner": "none", "alpha_scaling": "none", "intercept_init": "zero"}

VARIANTS: dict[str, dict[str, Any]] = {
    "trainable_to": {},
    **{f"to_{e}": {"estimator": e} for e in ("diagonal", "rank_one", "full", "none")},
    **{f"to_paper_{e}": {"estimator": e, **PAPER_LITERAL} for e in ("diagonal", "rank_one", "full", "none")},
}


def load_optimizer(name: str) -> Callable[..., TrainableOptimizer]:
    """Return a constructor ``(params, lr=..., **overrides) -> TrainableOptimizer`` for ``name``."""
    key = name.lower()
    if key not in VARIANTS:
        raise ValueError(f"Unknown optimizer {name!r}; expected one of {sorted(VARIANTS)}")
    return functools.partial(TrainableOptimizer, **VARIANTS[key])


def param_groups_for(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into decay / no-decay groups by the Trainer's rule.

    No weight decay for biases and for the parameters of normalisation layers (any module
    whose class name contains ``Norm``), as ``transformers.Trainer.get_decay_parameter_names``
    does.  Both groups are always returned, possibly empty.
    """
    no_decay: set[int] = set()
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower() or isinstance(module, nn.modules.normalization.LayerNorm)
        for pname, p in module.named_parameters(recurse=False):
            if is_norm or pname == "bias" or "bias" in pname or "layernorm" in pname or "rmsnorm" in pname:
                no_decay.add(id(p))
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in trainable if id(p) not in no_decay], "weight_decay": weight_decay},
        {"params": [p for p in trainable if id(p) in no_decay], "weight_decay": 0.0},
    ]


def create_optimizer(
    model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.0, *, name: str = "trainable_to", **kwargs: Any
) -> torch.optim.Optimizer:
    """Build a TO variant for ``model`` with the Trainer's decay / no-decay grouping."""
    return load_optimizer(name)(param_groups_for(model, weight_decay), lr=lr, **kwargs)
