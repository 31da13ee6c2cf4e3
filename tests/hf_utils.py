"""Shared helpers of the Hugging Face integration tests (tiny Llama built from a config, no downloads)."""

from __future__ import annotations

from typing import Any

import torch

VOCAB = 256
SEQ = 16


def tiny_llama(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        **overrides,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


class TokenDataset(torch.utils.data.Dataset):
    """Deterministic random token sequences; labels = input_ids (causal LM loss)."""

    def __init__(self, n: int = 32, seq: int = SEQ, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}


def training_args(output_dir: Any, **overrides: Any) -> Any:
    from transformers import TrainingArguments

    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        optim="trainable_to",
        learning_rate=1e-3,
        per_device_train_batch_size=2,
        max_steps=3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def trainer(model: torch.nn.Module, args: Any, dataset: Any = None, **kwargs: Any) -> Any:
    from transformers import Trainer

    return Trainer(model=model, args=args, train_dataset=dataset if dataset is not None else TokenDataset(), **kwargs)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}
