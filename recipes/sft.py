"""Fine-tune a causal LM (full, LoRA or QLoRA) with the Trainable Optimizer or any Trainer optimizer.

Usage (from the repository root)::

    # no --config: recipes/configs/smollm2_135m_lora_to_cpu.yaml
    .venv/bin/python recipes/sft.py

    # embedded SmolLM2-135M-Instruct + the Python language reference, LoRA, TO rank-one, CPU
    .venv/bin/python recipes/sft.py --config recipes/configs/smollm2_135m_lora_to_cpu.yaml

    # any YAML key can be overridden on the command line
    .venv/bin/python recipes/sft.py --config recipes/configs/smollm2_135m_lora_to_cpu.yaml \\
        --optim adamw_torch_fused --max_steps 20 --output_dir runs/adamw

    # several GPUs
    .venv/bin/accelerate launch --config_file recipes/accelerate_configs/ddp.yaml recipes/sft.py \\
        --config recipes/configs/qwen2.5_0.5b_lora_to.yaml

YAML keys are ``TrainingArguments`` fields, plus the sections ``model:``, ``peft:`` and
``data:`` (see ``recipe_config.ModelArguments`` and ``recipe_config.ScriptArguments``).  The
optimizer is ``--optim trainable_to`` with ``--optim_args estimator=rank_one,...``;
``import hf_to`` registers that name with transformers.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import runtime_env  # noqa: F401  (first: sets OpenMP's wait policy before torch loads)
from recipe_config import CONFIG_DIR, ModelArguments, ScriptArguments, parse_recipe_args, run_cli
from recipe_train import run_training
from transformers import TrainingArguments

import hf_to  # noqa: F401  (registers --optim trainable_to with transformers)

__all__ = ["DEFAULT_CONFIG", "main", "parse_args"]

#: Read when no --config is given: embedded SmolLM2-135M, LoRA, TO rank-one, sized for a CPU.
DEFAULT_CONFIG = CONFIG_DIR / "smollm2_135m_lora_to_cpu.yaml"


def parse_args(argv: Sequence[str] | None = None) -> tuple[ScriptArguments, TrainingArguments, ModelArguments]:
    """Parse ``--config`` and command-line overrides into the script's three dataclasses."""
    script_args, training_args, model_args = parse_recipe_args(
        (ScriptArguments, TrainingArguments, ModelArguments),
        argv,
        default_config=DEFAULT_CONFIG,
        description=__doc__,
    )
    return script_args, training_args, model_args


def main(script_args: ScriptArguments, training_args: TrainingArguments, model_args: ModelArguments) -> dict[str, Any]:
    """Train once; returns the run record also written to ``output_dir/run_record.json``."""
    record = run_training(script_args, training_args, model_args)
    if training_args.process_index == 0:
        summary = {k: v for k, v in record.items() if k != "log_history"}
        print(json.dumps(summary, indent=2, default=str))
        out = training_args.output_dir
        saved = " and the trained model/adapter" if script_args.save_final_model else ""
        print(f"wrote {os.path.join(out, 'run_record.json')}{saved} in {out}")
    return record


def cli(argv: Sequence[str] | None = None) -> int:
    return run_cli("sft.py", main, parse_args, argv)


if __name__ == "__main__":
    sys.exit(cli())
