"""``--optim trainable_to`` for the Hugging Face ``Trainer`` (and every trainer built on it).

transformers has no public registry of optimizer names: ``TrainingArguments.__post_init__``
converts ``optim`` with ``OptimizerNames(...)`` and ``HfArgumentParser`` takes its choices from
that enum.  :func:`register` therefore

1. adds the member ``OptimizerNames.TRAINABLE_TO = "trainable_to"`` (no existing member changes),
2. checks ``--optim_args`` when ``TrainingArguments`` is built, so that a bad key or value fails
   at argument parsing, before a model is loaded or anything is written,
3. tells the Trainer how to build the optimizer: a handler in ``_OPTIMIZER_HANDLERS``
   (transformers 5) or a wrapper of ``Trainer.get_optimizer_cls_and_kwargs`` (transformers 4.46+),
4. adds :class:`TrainableOptimizerCallback` to the Trainer's default callbacks; it is inert
   unless the optimizer is a :class:`~hf_to.TrainableOptimizer` with diagnostics on, and then
   writes ``to/...`` keys into the Trainer's logs (and so into every ``report_to`` backend).

:func:`register` is idempotent and is called by ``import hf_to`` (when transformers is loaded)
or by the start-up hook (:mod:`_hf_to_startup`) as soon as transformers' training modules load.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import typing
from collections.abc import Callable
from typing import Any

import torch

from ..optimizer import TrainableOptimizer
from .deepspeed import check_estimator

__all__ = [
    "OPTIM_NAME",
    "SUPPORTED_TRANSFORMERS",
    "OptimArgsError",
    "TrainableOptimizerCallback",
    "is_registered",
    "optim_arg_types",
    "optimizer_cls_and_kwargs",
    "parse_optim_args",
    "register",
    "to_kwargs_from_training_args",
    "unparsable_keywords",
]

logger = logging.getLogger(__name__)

#: The value of ``--optim`` that selects the Trainable Optimizer.
OPTIM_NAME = "trainable_to"
_MEMBER_NAME = "TRAINABLE_TO"

#: transformers versions the integration is tested on (inclusive lower, exclusive upper bound).
SUPPORTED_TRANSFORMERS = ((4, 46), (6, 0))

#: Keys of ``--optim_args`` that have their own ``TrainingArguments`` field.
_OWN_FIELDS = {"lr": "--learning_rate", "weight_decay": "--weight_decay"}

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_NONE = ("none", "null")
#: Spellings of dtypes users type, beside torch's own names (``bfloat16``, ``torch.bfloat16``).
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16", "half": "float16", "fp64": "float64"}


# -- --optim_args --------------------------------------------------------------------------


class OptimArgsError(ValueError):
    """A bad ``--optim_args`` string: the message names the key and the value."""


def _parse_bool(raw: str) -> bool:
    low = raw.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"expected one of {', '.join(_TRUE + _FALSE)}")


def _parse_int(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        value = float(raw)  # 1e4, 4096.0
        if not value.is_integer():
            raise ValueError("not a whole number") from None
        return int(value)


def _parse_dtype(raw: str) -> torch.dtype:
    name = raw.lower().removeprefix("torch.")
    value = getattr(torch, _DTYPE_ALIASES.get(name, name), None)
    if not isinstance(value, torch.dtype):
        raise ValueError("expected a dtype such as bfloat16, bf16, float32, fp32 or torch.bfloat16")
    return value


#: How a value of each type is read from the command line.
_PARSERS: dict[type, Callable[[str], Any]] = {
    bool: _parse_bool,
    int: _parse_int,
    float: float,
    str: str,
    torch.dtype: _parse_dtype,
}


def _keyword_type(param: inspect.Parameter) -> tuple[type | None, bool]:
    """``(type, accepts None)`` of a constructor keyword: the default's type, or for a ``None``
    default the one non-None type of the annotation (``bool | None`` -> ``(bool, True)``).
    The type is ``None`` when no parser exists for it."""
    default = param.default
    if default is not inspect.Parameter.empty and default is not None:
        typ = type(default)
        if typ in (str, float) and bool in typing.get_args(param.annotation):
            # ``bool | Literal["adam"] = "adam"``: the strings are the Literal's choices;
            # ``bool | float = 0.55``: a flag or a number (_convert tries the flag first)
            typ = bool
        return (typ if typ in _PARSERS else None), False
    annotation = param.annotation
    members = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    # Literal["a", "b"] reads as the type of its values.
    members = [type(typing.get_args(a)[0]) if typing.get_origin(a) is typing.Literal else a for a in members]
    parsable = [a for a in members if a in _PARSERS]
    return (parsable[0] if len(parsable) == 1 else None), default is None


def _keywords() -> dict[str, inspect.Parameter]:
    signature = inspect.signature(TrainableOptimizer, eval_str=True)
    return {
        name: param
        for name, param in signature.parameters.items()
        if name != "params" and name not in _OWN_FIELDS and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)
    }


def unparsable_keywords() -> list[str]:
    """Constructor keywords that ``--optim_args`` cannot read (their type has no parser)."""
    return [name for name, param in _keywords().items() if _keyword_type(param)[0] is None]


def optim_arg_types() -> dict[str, type]:
    """The ``--optim_args`` keys and their types, read from ``TrainableOptimizer``'s signature.

    Every keyword of the constructor except ``params`` and the settings that have their own
    ``TrainingArguments`` field (``lr``, ``weight_decay``); the type is that of the default,
    or for a ``None`` default the annotation's other type (``fused`` -> ``bool``,
    ``state_dtype`` -> ``torch.dtype``; ``none`` is then accepted too).  A keyword whose type
    cannot be read from the command line maps to ``str`` (see :func:`unparsable_keywords`).
    """
    return {name: _keyword_type(param)[0] or str for name, param in _keywords().items()}


def _literal_choices(param: inspect.Parameter) -> tuple[str, ...]:
    """The string values a ``Literal`` in the keyword's annotation allows (``bool | Literal["adam"]``)."""
    members = typing.get_args(param.annotation) or (param.annotation,)
    return tuple(
        v for a in members if typing.get_origin(a) is typing.Literal for v in typing.get_args(a) if isinstance(v, str)
    )


def _convert(key: str, raw: str, param: inspect.Parameter) -> Any:
    typ, nullable = _keyword_type(param)
    if nullable and raw.lower() in _NONE:
        return None
    if raw in _literal_choices(param):
        return raw
    if typ is bool and float in typing.get_args(param.annotation):  # ``bool | float``: a flag or a number
        try:
            return _parse_bool(raw)
        except ValueError:
            typ = float
    typ = typ or str
    try:
        return _PARSERS[typ](raw)
    except ValueError as exc:
        name = "dtype" if typ is torch.dtype else typ.__name__
        expected = f"{name} or none" if nullable else name
        if _literal_choices(param):
            expected += " or one of " + ", ".join(map(repr, _literal_choices(param)))
        raise OptimArgsError(
            f"Invalid value for --optim_args key {key!r}: {raw!r} is not a valid {expected} ({exc})"
        ) from None


def parse_optim_args(optim_args: str | None) -> dict[str, Any]:
    """Parse ``"estimator=rank_one,alpha=0.02"`` into typed ``TrainableOptimizer`` keywords.

    Raises :class:`OptimArgsError` (a ``ValueError``) for a malformed entry, an unknown key (listing the valid ones), a
    repeated key, or a value that does not convert to the key's type (naming the key).
    """
    if not optim_args or not optim_args.strip():
        return {}
    keywords = _keywords()
    out: dict[str, Any] = {}
    for entry in optim_args.replace(" ", "").split(","):
        key, sep, raw = entry.partition("=")
        if not sep or not key or not raw or "=" in raw:
            raise OptimArgsError(
                f"Malformed --optim_args entry {entry!r} in {optim_args!r}: expected key=value pairs "
                "separated by commas, e.g. 'estimator=rank_one,alpha=0.01'"
            )
        if key in _OWN_FIELDS:
            raise OptimArgsError(
                f"--optim_args key {key!r} is not accepted for optim={OPTIM_NAME!r}: set it with {_OWN_FIELDS[key]}"
            )
        if key not in keywords:
            raise OptimArgsError(
                f"Unknown --optim_args key {key!r} for optim={OPTIM_NAME!r}; valid keys: {', '.join(sorted(keywords))}"
            )
        if key in out:
            raise OptimArgsError(f"--optim_args key {key!r} is given twice in {optim_args!r}")
        out[key] = _convert(key, raw, keywords[key])
    return out


_DEFAULT_ESTIMATOR = inspect.signature(TrainableOptimizer).parameters["estimator"].default
_DEFAULT_TUNE_BETA = inspect.signature(TrainableOptimizer).parameters["tune_beta"].default


def _validate(kwargs: dict[str, Any]) -> None:
    """Build the optimizer on a one-element tensor: the core's own check names a bad value."""
    try:
        TrainableOptimizer([torch.zeros(1, requires_grad=True)], **kwargs)
    except ValueError as exc:
        raise OptimArgsError(str(exc)) from None


def to_kwargs_from_training_args(args: Any) -> dict[str, Any]:
    """``TrainableOptimizer`` keywords for ``TrainingArguments`` ``args`` (validated).

    ``lr`` is ``learning_rate``; ``weight_decay`` is the Trainer's (its no-decay group
    overrides it with 0); with ``preconditioner="adam"`` (the default) ``beta2``/``eps`` come
    from ``adam_beta2``/``adam_epsilon``; diagnostics are on so that the ``to/...`` metrics
    reach the logs (``--optim_args diagnostics=false`` turns them off).  ``--optim_args``
    overrides all of these.
    """
    parsed = parse_optim_args(getattr(args, "optim_args", None))
    kwargs: dict[str, Any] = {"lr": args.learning_rate, "weight_decay": args.weight_decay, "diagnostics": True}
    default_preconditioner = inspect.signature(TrainableOptimizer).parameters["preconditioner"].default
    if parsed.get("preconditioner", default_preconditioner) == "adam":
        kwargs.update(beta2=args.adam_beta2, eps=args.adam_epsilon)
    kwargs.update(parsed)
    _validate(kwargs)
    # Under DeepSpeed the structured estimators cannot run: say so before the model loads.
    check_estimator(
        kwargs.get("estimator", _DEFAULT_ESTIMATOR),
        tune_beta=kwargs.get("tune_beta", _DEFAULT_TUNE_BETA),
        training_args=args,
    )
    return kwargs


def optimizer_cls_and_kwargs(args: Any = None, /, **to_kwargs: Any) -> tuple[type[TrainableOptimizer], dict[str, Any]]:
    """The pair for ``Trainer(optimizer_cls_and_kwargs=...)``, without any registration.

    ``args`` (a ``TrainingArguments``) supplies lr, weight decay and Adam's beta2/eps as in
    :func:`to_kwargs_from_training_args`; ``to_kwargs`` override them.  The Trainer passes
    its own decay / no-decay parameter groups::

        trainer = Trainer(model, args, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args, estimator="rank_one"))
    """
    kwargs: dict[str, Any] = {"diagnostics": True}
    if args is not None:
        kwargs = to_kwargs_from_training_args(args)
    kwargs.update(to_kwargs)
    _validate(kwargs)
    return TrainableOptimizer, kwargs


# -- the metrics callback ------------------------------------------------------------------


def _unwrap(optimizer: Any) -> Any:
    """The TrainableOptimizer inside accelerate's / deepspeed's wrappers, or None."""
    for _ in range(4):
        if isinstance(optimizer, TrainableOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
        if optimizer is None:
            return None
    return None


def diagnostics_metrics(optimizer: TrainableOptimizer, prefix: str = "to/") -> dict[str, float]:
    """Read (and reset) the optimizer's diagnostics as flat ``to/...`` metrics; {} if none."""
    # all_reduce: sharded (FSDP2) groups sum their shard-local sums; every rank calls on_log.
    groups = [d for d in optimizer.diagnostics(reset=True, all_reduce=True) if d["steps"] > 0]
    if not groups:
        return {}
    residual = sum(d["residual_sq"] for d in groups)
    grad = sum(d["grad_sq"] for d in groups)
    # tune_beta: the intercept rate each tuning group has reached (their mean: one number per log)
    tuned = [g["beta"] for g in optimizer.param_groups if g.get("tune_beta")]
    return {
        **({f"{prefix}beta": sum(tuned) / len(tuned)} if tuned else {}),
        f"{prefix}relative_residual": residual / grad if grad > 0 else 0.0,
        f"{prefix}residual_sq": residual,
        f"{prefix}grad_sq": grad,
        f"{prefix}estimate_sq": sum(d["estimate_sq"] for d in groups),
        f"{prefix}skipped": sum(d["skipped"] for d in groups),
        f"{prefix}steps": max(d["steps"] for d in groups),
        f"{prefix}state_mib": optimizer.state_bytes() / 2**20,
    }


def _callback_base() -> type:
    from transformers.trainer_callback import TrainerCallback

    return TrainerCallback


class TrainableOptimizerCallback(_callback_base()):  # type: ignore[misc]
    """Adds the estimator's health (``to/relative_residual``, ...) to the Trainer's logs.

    In the Trainer's default callbacks once hf_to is registered; does nothing unless the
    optimizer is a ``TrainableOptimizer`` with ``track_diagnostics`` on (the ``trainable_to``
    handler turns it on; ``--optim_args diagnostics=false`` or
    ``trainer.remove_callback(TrainableOptimizerCallback)`` switches the metrics off).
    The keys are averages over the optimizer steps since the previous log.
    """

    prefix = "to/"

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        optimizer = _unwrap(kwargs.get("optimizer"))
        if logs is None or optimizer is None or not optimizer.track_diagnostics:
            return
        metrics = diagnostics_metrics(optimizer, self.prefix)
        if not metrics:
            return
        logs.update(metrics)
        # Trainer.log appended a copy of ``logs`` to the history just before calling on_log.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)


# -- registration --------------------------------------------------------------------------


def _version_tuple(version: str) -> tuple[int, int]:
    parts = version.split(".")
    return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)


def _check_version() -> None:
    import transformers

    found = _version_tuple(transformers.__version__)
    low, high = SUPPORTED_TRANSFORMERS
    if not (low <= found < high):
        raise RuntimeError(
            f"hf-to supports transformers >={low[0]}.{low[1]},<{high[0]}.{high[1]}; "
            f"found {transformers.__version__}. Install a supported version or use "
            "hf_to.integrations.transformers.optimizer_cls_and_kwargs with Trainer(optimizer_cls_and_kwargs=...)"
        )


def _add_enum_member(enum_cls: Any, name: str, value: str) -> Any:
    """Add ``name = value`` to a ``(str, Enum)`` class after its creation (idempotent)."""
    existing = enum_cls._value2member_map_.get(value)
    if existing is not None:
        return existing
    if name in enum_cls._member_map_:
        raise RuntimeError(
            f"{enum_cls.__name__}.{name} already exists with value {enum_cls._member_map_[name].value!r}"
        )
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    # EnumType.__setattr__ refuses to touch members; a new class attribute is what we want.
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    return member


def _wrap_post_init(training_args_cls: Any) -> None:
    """Check ``--optim_args`` when the arguments are built (before any model or file exists)."""
    original = training_args_cls.__post_init__
    if getattr(original, "_hf_to_wrapped", False):
        return

    @functools.wraps(original)
    def __post_init__(self: Any, *a: Any, **k: Any) -> None:
        original(self, *a, **k)
        if self.optim == OPTIM_NAME:
            to_kwargs_from_training_args(self)

    __post_init__._hf_to_wrapped = True  # type: ignore[attr-defined]
    training_args_cls.__post_init__ = __post_init__


def _wrap_argument_parser(parser_cls: Any) -> None:
    """A bad ``--optim_args`` on the command line ends like a bad argparse value: one line
    ``prog: error: ...`` on stderr and exit code 2, not a traceback.  Parsers built with
    ``exit_on_error=False`` and ``TrainingArguments(...)`` in code still raise the error."""
    original = parser_cls.parse_args_into_dataclasses
    if getattr(original, "_hf_to_wrapped", False):
        return

    @functools.wraps(original)
    def parse_args_into_dataclasses(self: Any, *a: Any, **k: Any) -> Any:
        try:
            return original(self, *a, **k)
        except OptimArgsError as exc:
            if not getattr(self, "exit_on_error", True):
                raise
            self.exit(2, f"{self.prog}: error: {exc}\n")

    parse_args_into_dataclasses._hf_to_wrapped = True  # type: ignore[attr-defined]
    parser_cls.parse_args_into_dataclasses = parse_args_into_dataclasses


def _handler(ctx: Any) -> tuple[type[TrainableOptimizer], dict[str, Any]]:
    """transformers 5 handler: ``ctx.args`` is the TrainingArguments."""
    return optimizer_cls_and_kwargs(ctx.args)


def _wrap_get_optimizer_cls_and_kwargs(trainer_cls: Any) -> None:
    """transformers 4.x: no handler table, so wrap the static dispatch for our name only."""
    original = trainer_cls.__dict__["get_optimizer_cls_and_kwargs"]
    func = original.__func__ if isinstance(original, staticmethod) else original
    if getattr(func, "_hf_to_wrapped", False):
        return

    @functools.wraps(func)
    def get_optimizer_cls_and_kwargs(args: Any, model: Any = None) -> tuple[Any, Any]:
        if args.optim == OPTIM_NAME:
            return optimizer_cls_and_kwargs(args)
        return func(args, model)

    get_optimizer_cls_and_kwargs._hf_to_wrapped = True  # type: ignore[attr-defined]
    trainer_cls.get_optimizer_cls_and_kwargs = staticmethod(get_optimizer_cls_and_kwargs)


def register() -> None:
    """Register ``trainable_to`` with the parts of transformers loaded so far (idempotent).

    Call it again after more of transformers is imported (the start-up hook does this).
    Raises ``RuntimeError`` on an unsupported transformers version.
    """
    training_args = sys.modules.get("transformers.training_args")
    if training_args is None or not hasattr(training_args, "TrainingArguments"):
        return
    _check_version()
    _add_enum_member(training_args.OptimizerNames, _MEMBER_NAME, OPTIM_NAME)
    _wrap_post_init(training_args.TrainingArguments)
    from transformers.hf_argparser import HfArgumentParser

    _wrap_argument_parser(HfArgumentParser)

    trainer_optimizer = sys.modules.get("transformers.trainer_optimizer")
    handlers = getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None)
    if handlers is not None:
        handlers.setdefault(training_args.OptimizerNames(OPTIM_NAME), _handler)

    trainer = sys.modules.get("transformers.trainer")
    trainer_cls = getattr(trainer, "Trainer", None)
    if trainer_cls is not None:
        if handlers is None and not hasattr(trainer, "_OPTIMIZER_HANDLERS"):
            _wrap_get_optimizer_cls_and_kwargs(trainer_cls)
        default_callbacks = getattr(trainer, "DEFAULT_CALLBACKS", None)
        if isinstance(default_callbacks, list) and TrainableOptimizerCallback not in default_callbacks:
            default_callbacks.append(TrainableOptimizerCallback)


def is_registered() -> bool:
    """Whether ``OptimizerNames("trainable_to")`` resolves in the loaded transformers."""
    training_args = sys.modules.get("transformers.training_args")
    return training_args is not None and OPTIM_NAME in training_args.OptimizerNames._value2member_map_


# Importing this module registers with whatever part of transformers is loaded (the start-up
# hook skips the calls made while this module itself is still importing transformers).
register()
