"""Named variants of the Trainable Optimizer and a PEFT-style ``create_optimizer`` factory.

``VARIANTS`` maps a name to the keyword arguments that define it; :func:`load_optimizer`
returns a constructor with those presets.  Tests loop over the registry, so a new entry is
tested for free.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .forms import FORMS
from .optimizer import TrainableOptimizer

__all__ = [
    "NO_DECAY_MODULES",
    "NO_DECAY_PATTERNS",
    "PAPER_LITERAL",
    "VARIANTS",
    "create_optimizer",
    "decay_parameter_names",
    "load_optimizer",
    "param_groups_for",
]

#: The paper's plain update: step along Ĝ, raw slope rate, b_0 = 0, constant β.
PAPER_LITERAL: dict[str, Any] = {
    "preconditioner": "none",
    "alpha_scaling": "none",
    "intercept_init": "zero",
    "beta_warmup": False,
    "nesterov": False,
}

VARIANTS: dict[str, dict[str, Any]] = {
    "trainable_to": {},
    **{f"to_{e}": {"estimator": e} for e in FORMS},
    **{f"to_paper_{e}": {"estimator": e, **PAPER_LITERAL} for e in FORMS},
    # The defaults of before: the intercept's running-mean warm-up β_t = max(β, 1/t) and the step
    # along Ĝ (until 2026-11-30 morning); Adam's bias correction and the step along Ĝ (that day);
    # the look-ahead weight tied to the intercept rate, λ = β_t (2026-11-30 to 2026-12-06).
    "to_running_mean": {"estimator": "diagonal", "beta_warmup": True, "nesterov": False},
    "to_without_nesterov": {"estimator": "diagonal", "nesterov": False},
    "to_lookahead_beta": {"estimator": "diagonal", "nesterov": True},
}


def load_optimizer(name: str) -> Callable[..., TrainableOptimizer]:
    """Return a constructor ``(params, lr=..., **overrides) -> TrainableOptimizer`` for ``name``."""
    key = name.lower()
    if key not in VARIANTS:
        raise ValueError(f"Unknown optimizer {name!r}; expected one of {sorted(VARIANTS)}")
    return functools.partial(TrainableOptimizer, **VARIANTS[key])


#: Name patterns (searched in the lower-cased dotted parameter name) that get no weight decay:
#: ``transformers.Trainer.get_decay_parameter_names`` of transformers 5.
NO_DECAY_PATTERNS: tuple[str, ...] = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
#: Module types whose parameters get no weight decay (the Trainer's ``[nn.LayerNorm]``).
NO_DECAY_MODULES: tuple[type[nn.Module], ...] = (nn.LayerNorm,)


def decay_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that get weight decay, by the Trainer's rule.

    A transcription of ``Trainer.get_decay_parameter_names`` (``get_parameter_names`` with
    ``[nn.LayerNorm]`` and :data:`NO_DECAY_PATTERNS`) that does not import transformers.
    """
    patterns = [re.compile(p) for p in NO_DECAY_PATTERNS]

    def names(module: nn.Module) -> list[str]:
        result = []
        for child_name, child in module.named_children():
            result += [
                f"{child_name}.{n}"
                for n in names(child)
                if not isinstance(child, NO_DECAY_MODULES)
                and not any(p.search(f"{child_name}.{n}".lower()) for p in patterns)
            ]
        result += [k for k in module._parameters if not any(p.search(k.lower()) for p in patterns)]
        return result

    return names(model)


def param_groups_for(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into decay / no-decay groups exactly as the Trainer does.

    No weight decay for biases, normalisation weights (by name: ``layernorm``, ``rmsnorm``,
    ``norm``, ``*_norm``) and the parameters of ``nn.LayerNorm`` modules; see
    :func:`decay_parameter_names`.  Both groups are always returned, possibly empty (the
    optimizer skips empty groups).
    """
    decay = set(decay_parameter_names(model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]


def create_optimizer(
    model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.0, *, name: str = "trainable_to", **kwargs: Any
) -> torch.optim.Optimizer:
    """Build a TO variant for ``model`` with the Trainer's decay / no-decay grouping."""
    return load_optimizer(name)(param_groups_for(model, weight_decay), lr=lr, **kwargs)
