r"""Every keyword of the Trainable Optimizer, its default and its check, in one place.

:class:`StepConfig` is the frozen configuration of one param group's step: the constructor's
signature, the ``defaults`` of :class:`~hf_to.TrainableOptimizer`, the functional
:func:`~hf_to.trainable_to` and the calls of the C and Triton kernels all come from its fields.
:data:`RULES` holds each keyword's check; :data:`LEGACY_DEFAULTS` the values a checkpoint
written before a keyword existed resumes with.  What each keyword means is documented once, in
:class:`~hf_to.TrainableOptimizer`'s docstring.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from .forms import FORMS, MAX_NORMALIZED_ALPHA

__all__ = ["LEGACY_DEFAULTS", "RULES", "StepConfig", "check_state_dtype", "constructor_signature", "validate"]

#: Accepted ``preconditioner``, ``alpha_scaling``, ``intercept_init`` and ``state_dtype`` values.
PRECONDITIONERS = ("adam", "none")
ALPHA_SCALINGS = ("normalized", "none")
INTERCEPT_INITS = ("gradient", "zero")
STATE_DTYPES = (None, torch.float32, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """One param group's step: every hyperparameter and path option, with its default."""

    lr: float | Tensor = 1e-3
    estimator: str = "folded"
    alpha: float = 0.1
    beta: float = 0.1
    preconditioner: str = "adam"
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    alpha_scaling: str = "normalized"
    norm_floor: float = 1e-3
    intercept_init: str = "gradient"
    beta_warmup: bool | Literal["adam"] = "adam"
    nesterov: bool | float = 0.55
    max_full_numel: int = 4096
    fused: bool | None = None
    state_dtype: torch.dtype | None = None
    capturable: bool = False
    tune_beta: float = 0.0

    @classmethod
    def from_group(cls, group: dict[str, Any]) -> StepConfig:
        """The configuration of a param group (its keys are the field names)."""
        return cls(**{name: group[name] for name in FIELDS})

    # Derived flags, as the kernels take them.
    @property
    def adam(self) -> bool:
        return self.preconditioner == "adam"

    @property
    def normalize(self) -> bool:
        return self.alpha_scaling == "normalized"

    @property
    def intercept_from_gradient(self) -> bool:
        return self.intercept_init == "gradient"

    def lookahead(self, beta_t: float) -> float:
        """The look-ahead weight λ of d = Ĝ + λ (g − Ĝ): β_t with ``nesterov=True``, the number
        given, 0 with ``False``."""
        return beta_t if self.nesterov is True else float(self.nesterov)

    @property
    def looks_ahead(self) -> bool:
        """Whether the step moves the estimate toward g (any ``nesterov`` but ``False`` or 0)."""
        return bool(self.nesterov)

    @property
    def lookahead_code(self) -> float:
        """The look-ahead weight as the kernels take it: < 0 for β_t (``nesterov=True``)."""
        return -1.0 if self.nesterov is True else float(self.nesterov)

    @property
    def warmup_code(self) -> int:
        """``beta_warmup`` as the kernels number it: 0 constant, 1 running mean, 2 Adam's."""
        return 2 if self.beta_warmup == "adam" and not isinstance(self.beta_warmup, bool) else int(self.beta_warmup)


#: The field names, in signature order.
FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(StepConfig))

#: What a checkpoint written before a keyword existed resumes with (the default of its day).
LEGACY_DEFAULTS: dict[str, Any] = {
    "alpha_scaling": "normalized",
    "norm_floor": 1e-3,
    "intercept_init": "gradient",
    "beta_warmup": True,  # the running mean, the default until 2026-11-30
    "nesterov": False,  # the step along Ĝ, the default until 2026-11-30
    "max_full_numel": 4096,
    "fused": None,
    "state_dtype": None,
    "capturable": False,
    "tune_beta": 0.0,
}


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _flag(x: Any) -> bool:
    return isinstance(x, bool)


#: Per keyword: (check, what it expects).  A check sees the value and the whole group.
RULES: dict[str, tuple[Callable[[Any, dict], bool], str]] = {
    "lr": (lambda x, g: _number(x) and x >= 0, "a finite number >= 0"),
    "estimator": (lambda x, g: isinstance(x, str) and x in FORMS, f"one of {sorted(FORMS)}"),
    "alpha": (lambda x, g: _number(x) and x >= 0, "a finite number >= 0"),
    "beta": (lambda x, g: _number(x) and 0 < x <= 1, "in (0, 1]"),
    "preconditioner": (lambda x, g: x in PRECONDITIONERS, f"one of {PRECONDITIONERS}"),
    "beta2": (lambda x, g: _number(x) and 0 <= x < 1, "in [0, 1)"),
    "eps": (lambda x, g: _number(x) and x >= 0, "a finite number >= 0"),
    "weight_decay": (lambda x, g: _number(x) and x >= 0, "a finite number >= 0"),
    "alpha_scaling": (lambda x, g: x in ALPHA_SCALINGS, f"one of {ALPHA_SCALINGS}"),
    "norm_floor": (lambda x, g: _number(x) and x >= 0, "a finite number >= 0"),
    "intercept_init": (lambda x, g: x in INTERCEPT_INITS, f"one of {INTERCEPT_INITS}"),
    "beta_warmup": (lambda x, g: _flag(x) or (isinstance(x, str) and x == "adam"), "True, False or 'adam'"),
    # An int is refused: nesterov=1 would mean True to one reader and the weight 1 (d = g) to another.
    "nesterov": (
        lambda x, g: _flag(x) or (isinstance(x, float) and 0 <= x <= 1),
        "True, False or a float weight in [0, 1]",
    ),
    "max_full_numel": (lambda x, g: isinstance(x, int) and not _flag(x) and x >= 1, "an int >= 1"),
    "fused": (lambda x, g: x is None or _flag(x), "None, True or False"),
    "state_dtype": (
        lambda x, g: x in STATE_DTYPES and not (x == torch.bfloat16 and not FORMS[g["estimator"]].kernels),
        f"one of {STATE_DTYPES}; bfloat16 with an estimator that has kernels ({sorted(n for n, f in FORMS.items() if f.kernels)})",
    ),
    "capturable": (lambda x, g: _flag(x), "True or False"),
    "tune_beta": (
        lambda x, g: _number(x) and x >= 0 and not (x and g["capturable"]),
        "a finite number >= 0 (0: β fixed); not with capturable=True, since it reads three numbers back per step",
    ),
}


def validate(group: dict[str, Any], *, params: Iterable[Tensor] = ()) -> None:
    """Raise ``ValueError`` naming the keyword and value of the first invalid setting of ``group``
    (and, given its ``params``, a tensor the dense form or the state dtype cannot take)."""
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Invalid lr: a Tensor lr must have one element, got shape {tuple(lr.shape)}")
        lr = float(lr)
    for name in FIELDS:
        check, expected = RULES[name]
        value = lr if name == "lr" else group[name]
        if not check(value, group):
            raise ValueError(f"Invalid {name}: {value!r} (expected {expected})")
    if group["alpha_scaling"] == "normalized" and group["alpha"] >= MAX_NORMALIZED_ALPHA:
        raise ValueError(
            f"Invalid alpha: {group['alpha']!r} (expected < {MAX_NORMALIZED_ALPHA:g} with alpha_scaling='normalized': "
            "the normalised slope step overshoots the residual it learns from by more than it corrects, and the "
            "estimator diverges)"
        )
    if group["preconditioner"] == "adam" and group["eps"] == 0:
        # eps = 0 divides by zero where a gradient coordinate has always been zero.
        raise ValueError("Invalid eps: 0 (expected > 0 with preconditioner='adam')")
    params = list(params)
    _check_full_size(group, params)
    check_state_dtype(group["state_dtype"], params)


def check_state_dtype(state_dtype: torch.dtype | None, params: Iterable[Tensor]) -> None:
    """float64 parameters need float64 state: the step computes in the state's dtype and would
    round the weights to it every step.  (Computing in float64 beside narrower state would
    need a second precision in every form and kernel, for a setting whose only use,
    smaller state, contradicts the choice of float64 weights.)"""
    if state_dtype is None or state_dtype == torch.float64:
        return
    for p in params:
        if p.dtype == torch.float64:
            raise ValueError(
                f"Invalid state_dtype: {state_dtype} for a float64 parameter of shape {tuple(p.shape)} "
                f"(the step computes in the state's dtype and would round the weights to {state_dtype}); "
                "use state_dtype=None (float64 state for float64 parameters) or put float64 "
                "parameters in a param group of their own"
            )


def _check_full_size(group: dict[str, Any], params: list[Tensor]) -> None:
    """The dense form stores n² values per tensor: refuse tensors above the limit."""
    if not FORMS[group["estimator"]].dense:
        return
    limit = group["max_full_numel"]
    for p in params:
        n = p.numel()
        if n > limit:
            gib = n * n * 4 / 2**30
            raise ValueError(
                f"estimator={group['estimator']!r} on a parameter of shape {tuple(p.shape)} ({n} elements) needs an "
                f"{n}x{n} matrix A: {n * n} values, {gib:.2f} GiB in float32. The limit is "
                f"max_full_numel={limit}; use estimator='diagonal' or 'rank_one' (O(n) memory), "
                "put large tensors in another param group, or raise max_full_numel"
            )


def constructor_signature(*, leading: list[inspect.Parameter], trailing: list[inspect.Parameter]) -> inspect.Signature:
    """A signature ``(*leading, lr=..., *, <every other field>=..., *trailing)`` with real annotations
    (``--optim_args`` reads each keyword's type from it)."""
    hints = typing.get_type_hints(StepConfig)
    kind = inspect.Parameter
    fields = [
        kind(
            f.name,
            kind.POSITIONAL_OR_KEYWORD if f.name == "lr" else kind.KEYWORD_ONLY,
            default=f.default,
            annotation=hints[f.name],
        )
        for f in dataclasses.fields(StepConfig)
    ]
    return inspect.Signature([*leading, *fields, *trailing])
