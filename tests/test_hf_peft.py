"""PEFT (LoRA, LoRA+, QLoRA), TRL's SFTTrainer and the PEFT-style ``create_optimizer`` factory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import hf_to
from hf_to import TrainableOptimizer
from hf_to.registry import decay_parameter_names, param_groups_for

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from hf_utils import VOCAB, snapshot, tiny_llama, trainer, training_args  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer  # noqa: E402

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def _lora_model() -> Any:
    return get_peft_model(tiny_llama(), LoraConfig(**LORA))


def _assert_adapters_changed_and_base_kept(before: dict[str, torch.Tensor], model: Any) -> None:
    after = snapshot(model)
    adapters = [n for n in before if "lora_" in n]
    assert adapters
    assert all(not torch.equal(before[n], after[n]) for n in adapters if "lora_B" in n)
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n)


def test_lora_trains_the_adapters_and_keeps_the_base_weights(tmp_path: Path) -> None:
    model = _lora_model()
    before = snapshot(model)
    run = trainer(model, training_args(tmp_path, max_steps=3))
    run.train()
    assert isinstance(run.optimizer.optimizer, TrainableOptimizer)
    _assert_adapters_changed_and_base_kept(before, model)


def test_loraplus_grouping_with_empty_groups_trains(tmp_path: Path) -> None:
    from peft.optimizers import create_loraplus_optimizer

    model = _lora_model()
    before = snapshot(model)
    optimizer = create_loraplus_optimizer(
        model, TrainableOptimizer, lr=1e-3, loraplus_lr_ratio=16.0, estimator="rank_one", diagnostics=True
    )
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    assert 0 in sizes and sum(sizes) == sum(p.requires_grad for p in model.parameters())
    run = trainer(model, training_args(tmp_path, max_steps=3), optimizers=(optimizer, None))
    run.train()
    lrs = {len(g["params"]) > 0 and round(g["initial_lr"] / 1e-3, 6) for g in optimizer.param_groups}
    assert {1.0, 16.0} <= lrs
    _assert_adapters_changed_and_base_kept(before, model)
    assert any(k.startswith("to/") for h in run.state.log_history for k in h)


def test_qlora_with_a_4bit_base_trains_the_adapters(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization, device_map="cpu")
    assert base.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8  # packed 4-bit
    model = get_peft_model(prepare_model_for_kbit_training(base, use_gradient_checkpointing=False), LoraConfig(**LORA))
    before = snapshot(model)
    run = trainer(model, training_args(tmp_path / "out", max_steps=3))
    run.train()
    assert isinstance(run.optimizer.optimizer, TrainableOptimizer)
    _assert_adapters_changed_and_base_kept(before, model)


def _word_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(VOCAB)}, unk_token="t1"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", unk_token="t1", eos_token="t2")


def test_trl_sft_trainer_trains_with_optim_trainable_to(tmp_path: Path) -> None:
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"t{int(i)}" for i in torch.randint(3, VOCAB, (12,), generator=g)) for _ in range(8)]
    config = SFTConfig(
        output_dir=str(tmp_path),
        optim="trainable_to",
        optim_args="estimator=rank_one",
        max_steps=3,
        per_device_train_batch_size=2,
        logging_steps=1,
        max_length=16,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    model = tiny_llama()
    before = snapshot(model)
    run = SFTTrainer(
        model=model, args=config, train_dataset=Dataset.from_dict({"text": texts}), processing_class=_word_tokenizer()
    )
    run.train()
    assert isinstance(run.optimizer.optimizer, TrainableOptimizer)
    assert run.optimizer.param_groups[0]["estimator"] == "rank_one"
    assert run.state.global_step == 3
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert any(k.startswith("to/") for h in run.state.log_history for k in h)


# -- the PEFT-style factory ----------------------------------------------------------------


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32))


@pytest.mark.parametrize("make", [tiny_llama, _gpt2, _lora_model], ids=["llama-rmsnorm", "gpt2-layernorm-bias", "lora"])
def test_create_optimizer_uses_the_trainers_decay_rule(make: Any) -> None:
    model = make()
    assert set(decay_parameter_names(model)) == set(Trainer.get_decay_parameter_names(None, model))
    decay, no_decay = param_groups_for(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}  # tied weights appear once
    assert {names[id(p)] for p in decay["params"]} == trainable & set(Trainer.get_decay_parameter_names(None, model))
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in decay["params"] + no_decay["params"]} == trainable


def test_create_optimizer_tolerates_an_empty_group() -> None:
    model = _lora_model()  # LoRA matrices only: the no-decay group is empty
    optimizer = hf_to.create_optimizer(model, lr=1e-3, weight_decay=0.01, estimator="rank_one")
    assert [len(g["params"]) > 0 for g in optimizer.param_groups] == [True, False]
    ids = torch.randint(0, VOCAB, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    before = snapshot(model)
    optimizer.step()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
