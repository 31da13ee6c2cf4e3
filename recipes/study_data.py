"""The study's models and data: the tasks' token blocks, the proxy model (pretrained once and
cached), the model a run fine-tunes (LoRA or full) and its evaluation.

Texts: ``pydoc`` is the Python language reference (``pydoc_data``), ``code`` Python
standard-library packages; whole documents go to one of train / validation / test.  The proxy
is a 3-layer, 128-wide Llama with SmolLM2's tokenizer restricted to the ``PROXY_VOCAB`` most
frequent tokens of the study's texts, pretrained on other standard-library modules.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

import torch
from recipe_loop import LoopRecord, train_loop, warmup_cosine
from study_spec import Task

__all__ = [
    "PROXY_CONFIG",
    "PROXY_PRETRAIN",
    "PROXY_VOCAB",
    "build_model",
    "evaluate",
    "lm_loss",
    "proxy_checkpoint",
    "proxy_remap",
    "task_data",
]

#: The proxy: a Llama of SmolLM2's design, smaller, pretrained by :func:`proxy_checkpoint`.
PROXY_CONFIG = dict(
    hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2
)
PROXY_PRETRAIN = dict(steps=1500, batch=16, seq=64, lr=3e-3, seed=0, max_chars=1_200_000)
#: The proxy's vocabulary: the most frequent tokens of the study's texts; the rest share one id.
PROXY_VOCAB = 2048


_CODE_PACKAGES = ("asyncio", "email", "json", "http", "logging", "concurrent", "importlib", "unittest", "xml")


def _documents(text: str) -> list[tuple[str, str]]:
    """(name, text) documents of a corpus, in a fixed order."""
    if text == "pydoc":
        from pydoc_data.topics import topics

        return [(k, topics[k]) for k in sorted(topics)]
    if text == "code":
        import sysconfig

        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(f for pkg in _CODE_PACKAGES for f in (root / pkg).rglob("*.py") if "test" not in f.parts[-1])
        return [(str(f.relative_to(root)), f.read_text(encoding="utf-8", errors="replace")) for f in files]
    raise ValueError(f"unknown text {text!r}")


def _split_of(name: str) -> str:
    """Whole documents go to one split: crc32 % 10 == 0 validation, == 1 test, else train."""
    k = zlib.crc32(name.encode()) % 10
    return "val" if k == 0 else "test" if k == 1 else "train"


def _blocks(ids: list[int], seq: int) -> torch.Tensor:
    n = len(ids) // seq
    return torch.tensor(ids[: n * seq], dtype=torch.long).view(n, seq)


_CACHE: dict[str, Any] = {}


def _tokenizer() -> Any:
    if "tok" not in _CACHE:
        from recipe_data import ensure_embedded_model
        from transformers import AutoTokenizer

        _CACHE["path"] = ensure_embedded_model()
        _CACHE["tok"] = AutoTokenizer.from_pretrained(_CACHE["path"])
    return _CACHE["tok"]


def task_data(task: Task) -> dict[str, torch.Tensor]:
    """Token blocks per split (token ids of the full vocabulary)."""
    key = f"data-{task.text}-{task.seq}"
    if key not in _CACHE:
        tok = _tokenizer()
        ids: dict[str, list[int]] = {"train": [], "val": [], "test": []}
        for name, body in _documents(task.text):
            ids[_split_of(name)] += [*tok(body, add_special_tokens=False)["input_ids"], tok.eos_token_id]
        _CACHE[key] = {k: _blocks(v, task.seq) for k, v in ids.items()}
    return _CACHE[key]


def _pretrain_ids() -> list[int]:
    """Token ids of the proxy's pretraining text: top-level standard-library modules (not the tasks')."""
    import sysconfig

    tok = _tokenizer()
    ids: list[int] = []
    chars = 0
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        body = f.read_text(encoding="utf-8", errors="replace")
        ids += [*tok(body, add_special_tokens=False)["input_ids"], tok.eos_token_id]
        chars += len(body)
        if chars >= PROXY_PRETRAIN["max_chars"]:
            break
    return ids


def proxy_remap() -> torch.Tensor:
    """Map from SmolLM2 token ids to the proxy's: the ``PROXY_VOCAB - 1`` most frequent tokens of
    the pretraining and task texts get ids 1…, every other token id 0."""
    if "remap" not in _CACHE:
        counts = torch.bincount(torch.tensor(_pretrain_ids()), minlength=len(_tokenizer()))
        for text in ("pydoc", "code"):
            for blocks in task_data(Task("", text, "lora", 0.0)).values():
                counts += torch.bincount(blocks.reshape(-1), minlength=len(counts))
        top = torch.argsort(counts, descending=True, stable=True)[: PROXY_VOCAB - 1]
        remap = torch.zeros(len(counts), dtype=torch.long)
        remap[top] = torch.arange(1, PROXY_VOCAB)
        _CACHE["remap"] = remap
    return _CACHE["remap"]


def proxy_checkpoint() -> Path:
    """Pretrain the proxy once (deterministic, ~5 min on 2 cores) and return its folder."""
    import hashlib

    from recipe_data import cache_root
    from transformers import LlamaConfig, LlamaForCausalLM

    key = hashlib.sha1(json.dumps([PROXY_CONFIG, PROXY_PRETRAIN, PROXY_VOCAB], sort_keys=True).encode()).hexdigest()[
        :10
    ]
    target = cache_root() / f"study-proxy-{key}"
    if (target / "model.safetensors").is_file():
        return target
    remap = proxy_remap()
    hp = PROXY_PRETRAIN
    torch.manual_seed(hp["seed"])
    config = LlamaConfig(
        vocab_size=PROXY_VOCAB,
        tie_word_embeddings=True,
        max_position_embeddings=512,
        rope_theta=10000.0,
        **PROXY_CONFIG,
    )
    model = LlamaForCausalLM(config)
    blocks = remap[_blocks(_pretrain_ids(), hp["seq"])]
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(hp["steps"] // 20, hp["steps"]))
    gen = torch.Generator().manual_seed(hp["seed"])
    print(f"[study] pretraining the proxy ({hp['steps']} steps on {len(blocks)} blocks) into {target}", flush=True)

    def loss_at(step: int) -> torch.Tensor:
        idx = torch.randint(len(blocks), (hp["batch"],), generator=gen)
        return lm_loss(model, blocks[idx])

    def log(step: int, record: LoopRecord) -> None:
        if step:
            print(f"[study] pretrain step {step}: loss {record.train_losses[-1]:.3f}", flush=True)

    train_loop(loss_at, opt, hp["steps"], clip_params=model.parameters(), scheduler=sched, eval_every=100, on_eval=log)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    os.replace(tmp, target)
    return target


# -- model ---------------------------------------------------------------------------------


def build_model(kind: str, mode: str) -> tuple[torch.nn.Module, torch.Tensor | None]:
    """The model to fine-tune and, for the proxy, the vocabulary map (full id -> proxy id)."""
    from transformers import AutoModelForCausalLM

    _tokenizer()
    remap = None
    if kind == "proxy":
        model = AutoModelForCausalLM.from_pretrained(proxy_checkpoint(), dtype=torch.float32)
        remap = proxy_remap()
    elif kind == "real":
        model = AutoModelForCausalLM.from_pretrained(_CACHE["path"], dtype=torch.float32)
    else:
        raise ValueError(f"unknown model {kind!r}")
    model.config.use_cache = False
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        )
    elif mode == "full":
        for name, p in model.named_parameters():
            p.requires_grad_("embed_tokens" not in name and "lm_head" not in name)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return model, remap


def lm_loss(model: torch.nn.Module, blocks: torch.Tensor) -> torch.Tensor:
    return model(input_ids=blocks, labels=blocks).loss


@torch.no_grad()
def evaluate(model: torch.nn.Module, blocks: torch.Tensor, batch: int = 16) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(blocks), batch):
        chunk = blocks[i : i + batch]
        total += float(lm_loss(model, chunk)) * len(chunk)
    model.train()
    return total / len(blocks)
