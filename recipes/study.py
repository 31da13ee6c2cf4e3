"""A fine-tuning study of TO against the optimizers users pick instead (AdamW, Adan, MARS,
Lion, schedule-free AdamW): same tasks, same tuning budget, selection on validation,
report on test over seeds with paired differences.

Tasks (``TASKS``), each on train / validation / test splits of whole documents:

* ``pydoc_lora``: LoRA (r=8, q/k/v/o) on the Python language reference (``pydoc_data``);
* ``code_lora``: LoRA on Python standard-library source code (a second text, another domain);
* ``pydoc_full``: full fine-tuning (every weight but the tied embeddings) on the language reference.

Models (``--model``): ``real`` is the embedded SmolLM2-135M-Instruct; ``proxy`` is a 3-layer,
128-wide Llama with SmolLM2's tokenizer (restricted to the tokens of the study's texts),
pretrained once by this script on other standard-library modules (``PROXY_PRETRAIN`` steps,
cached under ``$HF_TO_CACHE``) so that the tasks are fine-tuning, not training from scratch.
It is ~200x cheaper per step than SmolLM2-135M, for the wide sweeps; a cut-down SmolLM2 (its
first layers) is no proxy: its loss starts above 16 nats.

Phases (each appends one JSON line per run to ``<out>/runs.jsonl`` and skips runs already
there, so a phase can be interrupted and rerun):

* ``tune``: every optimizer on a learning-rate grid of ``GRID`` × (task base lr) × (the
  peer's documented lr ratio to AdamW), one seed; where an optimizer's best rate is at an
  edge of the rates it has tried, the grid goes on past that edge (× or ÷ 3, at most
  ``EDGE_EXTENSIONS`` times), the same rule for every optimizer;
* ``tune_extra``: TO forms on their α/β grid at their best rate;
* ``final``: each optimizer at its best validation config, ``--seeds`` (≥ 3; fresh seeds,
  not the tuning one, ``--tune-seed``);
* ``dropin``: each optimizer at AdamW's tuned lr with its own defaults, ``--seeds``;
* ``candidates``: the default's candidate forms (``CANDIDATES``) drop-in, ``--seeds``;
* ``report``: tables (tuned and drop-in per task; test loss mean ± std, paired differences
  against AdamW, steps to reach AdamW's final validation loss, wall time, state bytes per
  parameter; the candidates ranked on validation) into ``<out>/REPORT.md`` and loss plots (vs
  step and vs wall time).

Usage (from the repository root)::

    python recipes/study.py --model proxy --workers 2 --out runs/study-proxy
    python recipes/study.py --model real --tasks pydoc_lora --phase dropin report --out runs/study-real \\
        --optimizers adamw to_adamwarm to_nesterov --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import PEERS, build_optimizer, needs_train_eval

__all__ = ["CONFIGS", "GRID", "TASKS", "Config", "Task", "main", "run_one"]

#: Learning-rate grid, as multiples of a task's base lr (× the peer's lr_scale): four points, since
#: small models take larger rates than the usual defaults.
GRID = (1 / 3, 1.0, 3.0, 9.0)
#: How often the grid may go on past an edge where the best rate sits (per optimizer and task).
EDGE_EXTENSIONS = 2
#: Validation every this many steps (the 'steps to AdamW' column's resolution).
EVAL_EVERY = 10
#: The proxy: a Llama of SmolLM2's design, smaller, pretrained by :func:`proxy_checkpoint`.
PROXY_CONFIG = dict(
    hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2
)
PROXY_PRETRAIN = dict(steps=1500, batch=16, seq=64, lr=3e-3, seed=0, max_chars=1_200_000)
#: The proxy's vocabulary: the most frequent tokens of the study's texts; the rest share one id.
PROXY_VOCAB = 2048


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    text: str  #: "pydoc" or "code"
    mode: str  #: "lora" or "full"
    base_lr: float  #: AdamW's usual rate for this kind of job (SmolLM2-135M)
    proxy_base_lr: float = 0.0  #: the same for the proxy (small models take larger rates)
    steps: int = 200
    batch: int = 4
    seq: int = 64
    val_blocks: int = 32
    test_blocks: int = 64


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("pydoc_lora", "pydoc", "lora", 3e-4, 3e-3),
        Task("code_lora", "code", "lora", 3e-4, 3e-3),
        Task("pydoc_full", "pydoc", "full", 3e-5, 3e-4),
    )
}


@dataclasses.dataclass(frozen=True)
class Config:
    """An optimizer configuration of the study: a peer name and keyword overrides."""

    label: str
    peer: str
    kwargs: tuple[tuple[str, Any], ...] = ()
    #: α/β/γ grid for TO forms (each a dict of overrides), searched at the best lr.
    extra_grid: tuple[tuple[tuple[str, Any], ...], ...] = ()


#: The step along Ĝ (no look-ahead): every TO form of the study but the ``nesterov`` rows.
_PLAIN = ("nesterov", False)
_DISP = (("estimator", "diagonal"), ("slope_input", "displacement"), ("beta_warmup", "adam"), _PLAIN)
#: The α/β grid of the TO forms (run at the form's best lr); the displacement form moves its
#: anchor at the intercept's rate (anchor_rate = β).
_AB = ((0.01, 0.1), (0.03, 0.1), (0.3, 0.1), (1.0, 0.1), (0.1, 0.05), (0.1, 0.2))
_TO_GRID = tuple((("alpha", a), ("beta", b)) for a, b in _AB)
_DISP_GRID = tuple((("alpha", a), ("beta", b), ("anchor_rate", b)) for a, b in _AB)

CONFIGS: dict[str, Config] = {
    c.label: c
    for c in (
        Config("adamw", "adamw"),
        Config("adan", "adan"),
        Config("mars", "mars"),
        Config("lion", "lion"),
        Config("sf_adamw", "sf_adamw"),
        Config("nadamw", "nadamw"),
        # TO forms, each explicit about every keyword the defaults changed on: the default until
        # 2026-11-30 (running-mean warm-up), Adam's bias correction without the look-ahead, ...
        Config("to_default", "to", (("estimator", "diagonal"), ("beta_warmup", True), _PLAIN), _TO_GRID),
        Config("to_adamwarm", "to", (("estimator", "diagonal"), ("beta_warmup", "adam"), _PLAIN), _TO_GRID),
        # Candidates for the default's slope rate α (drop-in rows: their own lr grid, no α/β grid).
        Config("to_a03", "to", (("estimator", "diagonal"), ("beta_warmup", "adam"), ("alpha", 0.3), _PLAIN)),
        Config("to_a1", "to", (("estimator", "diagonal"), ("beta_warmup", "adam"), ("alpha", 1.0), _PLAIN)),
        Config("to_rank_one", "to", (("estimator", "rank_one"), ("beta_warmup", "adam"), _PLAIN), _TO_GRID),
        Config("to_disp", "to", _DISP, _DISP_GRID),
        # ... and with it (nesterov=True: the default since 2026-11-30), with and without the slope.
        Config("to_nesterov", "to", (("estimator", "diagonal"), ("beta_warmup", "adam"), ("nesterov", True)), _TO_GRID),
        Config("to_none_nesterov", "to", (("estimator", "none"), ("beta_warmup", "adam"), ("nesterov", True))),
    )
}


#: Candidates for the default form (diagonal, Adam's bias correction as the intercept's rate):
#: the slope rate α × the floor δ² of its normalisation (``norm_floor``). Phase ``candidates``
#: runs each drop-in (at AdamW's tuned lr) on every task and seed; the report ranks them by the
#: mean paired difference of *validation* loss to AdamW (the test split plays no part).
CANDIDATE_ALPHAS = (0.1, 0.3, 1.0)
CANDIDATE_FLOORS = (1e-3, 1e-4, 1e-5)
CANDIDATES: dict[str, Config] = {
    f"cand_a{a:g}_f{f:g}": Config(
        f"cand_a{a:g}_f{f:g}",
        "to",
        (("estimator", "diagonal"), ("beta_warmup", "adam"), ("alpha", a), ("norm_floor", f), _PLAIN),
    )
    for a in CANDIDATE_ALPHAS
    for f in CANDIDATE_FLOORS
}
_ALL = {**CONFIGS, **CANDIDATES}


# -- data ----------------------------------------------------------------------------------

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
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(hp["steps"] // 20, hp["steps"]))
    gen = torch.Generator().manual_seed(hp["seed"])
    print(f"[study] pretraining the proxy ({hp['steps']} steps on {len(blocks)} blocks) into {target}", flush=True)
    for step in range(hp["steps"]):
        idx = torch.randint(len(blocks), (hp["batch"],), generator=gen)
        loss = model(input_ids=blocks[idx], labels=blocks[idx]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if step % 100 == 0 or step == hp["steps"] - 1:
            print(f"[study] pretrain step {step}: loss {loss.item():.3f}", flush=True)
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


def _loss(model: torch.nn.Module, blocks: torch.Tensor) -> torch.Tensor:
    return model(input_ids=blocks, labels=blocks).loss


@torch.no_grad()
def evaluate(model: torch.nn.Module, blocks: torch.Tensor, batch: int = 16) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(blocks), batch):
        chunk = blocks[i : i + batch]
        total += float(_loss(model, chunk)) * len(chunk)
    model.train()
    return total / len(blocks)


# -- one run -------------------------------------------------------------------------------


def _lr_lambda(warmup: int, total: int) -> Any:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return f


def run_one(task: Task, kind: str, config: Config, lr: float, seed: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune once; return the record (validation curve, test loss, wall time, state size)."""
    torch.manual_seed(seed)
    data = task_data(task)
    model, remap = build_model(kind, task.mode)
    splits = {k: (remap[v] if remap is not None else v) for k, v in data.items()}
    val, test = splits["val"][: task.val_blocks], splits["test"][: task.test_blocks]
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    kwargs = {**dict(config.kwargs), **overrides}
    warmup = max(1, task.steps // 20)
    opt = build_optimizer(config.peer, params, lr, weight_decay=0.0, warmup_steps=warmup, **kwargs)
    schedule_free = PEERS[config.peer].schedule_free
    sched = None if schedule_free else torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(warmup, task.steps))
    train_eval = needs_train_eval(opt)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(splits["train"]), generator=gen)
    curve, train_losses, wall = [], [], 0.0
    initial = evaluate(model, val)
    curve.append((0, initial, 0.0))
    diverged = False
    for step in range(1, task.steps + 1):
        idx = order[((step - 1) * task.batch + torch.arange(task.batch)) % len(order)]
        t0 = time.perf_counter()
        if train_eval:
            opt.train()
        loss = _loss(model, splits["train"][idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()
        wall += time.perf_counter() - t0
        train_losses.append(loss.item())
        if not math.isfinite(train_losses[-1]):
            diverged = True
            break
        if step % EVAL_EVERY == 0 or step == task.steps:
            if train_eval:
                opt.eval()
            curve.append((step, evaluate(model, val), wall))
    if train_eval:
        opt.eval()
    state_bytes = sum(
        v.numel() * v.element_size()
        for s in opt.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor) and v.numel() > 1
    )
    return {
        **_run_id(task, kind, config, lr, seed, overrides),
        "val_curve": curve,
        "train_losses": train_losses,
        "final_val": curve[-1][1] if not diverged else float("inf"),
        "test": evaluate(model, test) if not diverged else float("inf"),
        "initial_val": initial,
        "wall_s": wall,
        "state_bytes_per_param": state_bytes / n_params,
        "trainable_params": n_params,
        "diverged": diverged,
    }


# -- phases --------------------------------------------------------------------------------


def _run_id(task: Task, kind: str, config: Config, lr: float, seed: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """The fields that name a run (its record starts with them; :func:`_key` reads them)."""
    return {"task": task.name, "model": kind, "config": config.label, "lr": lr, "seed": seed, "overrides": overrides}


def _key(rec: dict[str, Any]) -> tuple:
    return (rec["task"], rec["model"], rec["config"], f"{rec['lr']:.3g}", rec["seed"], json.dumps(rec["overrides"]))


def _load(out: Path) -> list[dict[str, Any]]:
    path = out / "runs.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _lr_grid(task: Task, config: Config, kind: str = "real") -> list[float]:
    scale = PEERS[config.peer].lr_scale
    base = task.proxy_base_lr if kind == "proxy" and task.proxy_base_lr else task.base_lr
    return [base * scale * m for m in GRID]


def _edge_rate(records: list[dict[str, Any]], task: Task, config: Config, kind: str) -> float | None:
    """The next rate past the edge of the tried rates where the best one sits; None if it is inside.

    Only learning-rate runs count (no α/β overrides); the step is the grid's ratio, 3, and at
    most ``EDGE_EXTENSIONS`` rates are tried past each end of :func:`_lr_grid`.
    """
    pool = [
        r
        for r in records
        if r["task"] == task.name and r["config"] == config.label and r.get("phase") == "tune" and not r["overrides"]
    ]
    if not pool:
        return None
    grid = _lr_grid(task, config, kind)
    lrs = sorted({r["lr"] for r in pool})
    best = min(pool, key=lambda r: r["final_val"])["lr"]
    if math.isclose(best, lrs[-1], rel_tol=1e-9) and sum(lr > max(grid) * 1.01 for lr in lrs) < EDGE_EXTENSIONS:
        return best * 3
    if math.isclose(best, lrs[0], rel_tol=1e-9) and sum(lr < min(grid) / 1.01 for lr in lrs) < EDGE_EXTENSIONS:
        return best / 3
    return None


def _select(records: list[dict[str, Any]], task: str, config: str) -> dict[str, Any] | None:
    """The tuning run (lr grid, then α/β grid) with the lowest final validation loss (one seed)."""
    pool = [
        r for r in records if r["task"] == task and r["config"] == config and r.get("phase") in ("tune", "tune_extra")
    ]
    return min(pool, key=lambda r: r["final_val"]) if pool else None


def _matching(records: list[dict], task: str, config: str, lr: float, overrides: dict, seeds: set[int]) -> list[dict]:
    """The runs of one configuration, whatever phase ran them (a tuning run serves its seed)."""
    return sorted(
        (
            r
            for r in records
            if r["task"] == task
            and r["config"] == config
            and math.isclose(r["lr"], lr, rel_tol=1e-9)
            and r["overrides"] == overrides
            and r["seed"] in seeds
        ),
        key=lambda r: r["seed"],
    )


def table_runs(records: list[dict], task: str, table: str, seeds: set[int]) -> dict[str, list[dict]]:
    """Per config, the runs of the ``final`` (tuned) or ``dropin`` table."""
    out = {}
    base = _select(records, task, "adamw")
    if base is None:  # a drop-in phase run without tuning (the real model): AdamW's drop-in lr
        base = next(
            (r for r in records if r["task"] == task and r["config"] == "adamw" and r.get("phase") == "dropin"), None
        )
    for label in CONFIGS:
        if table == "final":
            best = _select(records, task, label)
            rs = _matching(records, task, label, best["lr"], best["overrides"], seeds) if best else []
        else:
            rs = _matching(records, task, label, base["lr"], {}, seeds) if base else []
        if rs:
            out[label] = rs
    return out


def _plan(
    phase: str, tasks: list[Task], kind: str, configs: list[Config], seeds: list[int], records: list[dict]
) -> list:
    jobs = []
    for task in tasks:
        for config in configs:
            if phase == "tune":
                jobs += [(task, config, lr, seeds[0], {}) for lr in _lr_grid(task, config, kind)]
            elif phase == "tune_edge":
                lr = _edge_rate(records, task, config, kind)
                if lr is not None:
                    jobs.append((task, config, lr, seeds[0], {}))
            elif phase == "tune_extra" and config.extra_grid:
                best = _select(records, task.name, config.label)
                if best is None:
                    continue
                jobs += [(task, config, best["lr"], seeds[0], dict(extra)) for extra in config.extra_grid]
            elif phase == "final":
                best = _select(records, task.name, config.label)
                if best is not None:
                    jobs += [(task, config, best["lr"], s, best["overrides"]) for s in seeds]
            elif phase in ("dropin", "candidates"):
                base = _select(records, task.name, "adamw")
                lr = base["lr"] if base is not None else _lr_grid(task, CONFIGS["adamw"], kind)[1]
                jobs += [(task, config, lr, s, {}) for s in seeds]
    # Seed-major order: a phase cut short still leaves paired runs.
    return sorted(jobs, key=lambda j: (j[0].name, j[3])) if phase in ("final", "dropin") else jobs


def _worker(args: tuple) -> dict[str, Any]:
    task_name, kind, label, lr, seed, overrides, phase = args
    torch.set_num_threads(int(os.environ.get("STUDY_THREADS", "1")))
    rec = run_one(TASKS[task_name], kind, _ALL[label], lr, seed, overrides)
    rec["phase"] = phase
    return rec


def run_phase(
    phase: str, tasks: list[Task], kind: str, configs: list[Config], seeds: list[int], out: Path, workers: int
):
    records = _load(out)
    done = {_key(r) for r in records}
    jobs = []
    records = [r for r in records if r["model"] == kind]
    for task, config, lr, seed, overrides in _plan(phase, tasks, kind, configs, seeds, records):
        probe = _run_id(task, kind, config, lr, seed, overrides)
        if _key(probe) not in done:
            done.add(_key(probe))
            # A run past the grid's edge is a tuning run like the others.
            jobs.append((task.name, kind, config.label, lr, seed, overrides, "tune" if phase == "tune_edge" else phase))
    print(f"[study] phase {phase}: {len(jobs)} runs", flush=True)
    if kind == "proxy" and jobs:
        proxy_checkpoint()  # once, before any worker needs it
    out.mkdir(parents=True, exist_ok=True)
    results = (out / "runs.jsonl").open("a")
    t0 = time.time()
    if workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("fork").Pool(workers)
        it: Iterable = pool.imap_unordered(_worker, jobs)
    else:
        it = map(_worker, jobs)
    for i, rec in enumerate(it, 1):
        results.write(json.dumps(rec) + "\n")
        results.flush()
        print(
            f"[study] {i}/{len(jobs)} {rec['task']} {rec['config']} lr={rec['lr']:.3g} seed={rec['seed']} "
            f"{rec['overrides'] or ''} val={rec['final_val']:.4f} test={rec['test']:.4f} "
            f"({rec['wall_s']:.0f} s train; {time.time() - t0:.0f} s elapsed)",
            flush=True,
        )
    if workers > 1:
        pool.close()
        pool.join()


# -- report --------------------------------------------------------------------------------


def _steps_to(curve: list, target: float) -> float | None:
    for step, val, _ in curve:
        if val <= target:
            return step
    return None


def _steps_vs_adamw(curve: list, target: float, adamw_steps: float | None) -> str:
    """'k (k / AdamW's k)': when a run first reached AdamW's final validation loss; '—' if never."""
    steps = _steps_to(curve, target)
    if steps is None:
        return "—"
    return f"{steps} ({steps / adamw_steps:.2f})" if adamw_steps else str(steps)


def _fmt(xs: list[float], digits: int = 4) -> str:
    if not xs:
        return "—"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def _describe(config: str, lr: float, overrides: dict) -> str:
    extra = ", ".join(f"{k}={v}" for k, v in overrides.items())
    return f"lr {lr:.3g}" + (f", {extra}" if extra else "")


def report(records: list[dict[str, Any]], out: Path, kind: str) -> str:
    lines = [
        f"# Fine-tuning study ({kind} model)",
        "",
        f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by `recipes/study.py` "
        f"({platform.machine()}, torch {torch.__version__}). Test loss mean ± std over seeds; Δ = paired "
        "difference to AdamW per seed (negative: better than AdamW); 'steps to AdamW' = per seed, the first "
        f"evaluation step (every {EVAL_EVERY}) whose validation loss is at or below AdamW's final validation "
        "loss in the same seed, and in brackets that step over the step where AdamW itself first got there "
        "(below 1: faster than AdamW); wall = training seconds per run (other jobs shared the machine: "
        "indicative only).",
        "",
    ]
    records = [r for r in records if r["model"] == kind]
    seeds = {r["seed"] for r in records if r.get("phase") in ("final", "dropin")}
    tables = {(table, task): table_runs(records, task, table, seeds) for table in ("final", "dropin") for task in TASKS}
    for table in ("final", "dropin"):
        title = (
            "Tuned (best validation config per optimizer)"
            if table == "final"
            else "Drop-in (AdamW's lr: its tuned one where a tuning phase ran; own defaults)"
        )
        for task in TASKS:
            by_config = tables[table, task]
            if len(by_config) < 2 or "adamw" not in by_config:
                continue
            base = {r["seed"]: r for r in by_config["adamw"]}
            target = {s: r["final_val"] for s, r in base.items()}
            own = {s: _steps_to(r["val_curve"], target[s]) for s, r in base.items()}
            lines += [f"## {title}: {task}", ""]
            lines += [
                "| optimizer | config | test loss | Δ test vs AdamW (per seed) | steps to AdamW (per seed) | wall (s) | state B/param |",
                "|---|---|---|---|---|---|---|",
            ]
            for label, rs in by_config.items():
                deltas = [r["test"] - base[r["seed"]]["test"] for r in rs if r["seed"] in base]
                steps = [
                    _steps_vs_adamw(r["val_curve"], target[r["seed"]], own[r["seed"]]) if r["seed"] in target else "—"
                    for r in rs
                ]
                lines.append(
                    f"| {label} | {_describe(label, rs[0]['lr'], rs[0]['overrides'])} | {_fmt([r['test'] for r in rs])} "
                    f"| {' '.join(f'{d:+.4f}' for d in deltas) or '—'} "
                    f"| {' '.join(steps)} "
                    f"| {statistics.mean(r['wall_s'] for r in rs):.0f} | {rs[0]['state_bytes_per_param']:.1f} |"
                )
            lines.append("")
    lines += _candidates_section(records, tables)
    tune = [r for r in records if r.get("phase") in ("tune", "tune_extra") and r["model"] == kind]
    if tune:
        lines += ["## Tuning runs (validation loss, one seed)", ""]
        for task in TASKS:
            rs = [r for r in tune if r["task"] == task]
            if not rs:
                continue
            lines += [
                f"**{task}**: "
                + "; ".join(
                    f"{r['config']} {_describe(r['config'], r['lr'], r['overrides'])}: {r['final_val']:.4f}"
                    for r in sorted(rs, key=lambda r: (r["config"], r["lr"], json.dumps(r["overrides"])))
                ),
                "",
            ]
    text = "\n".join(lines)
    (out / "REPORT.md").write_text(text)
    _plots(tables, out, kind)
    return text


def candidate_ranking(records: list[dict], tables: dict) -> list[tuple[str, dict[str, float], float]]:
    """Per default candidate: the mean paired validation-loss difference to AdamW's drop-in runs
    per task, and its mean over tasks (sorted, best first; only candidates run on every task)."""
    ranking = []
    for label in CANDIDATES:
        per_task = {}
        for task in TASKS:
            base = {r["seed"]: r["final_val"] for r in tables["dropin", task].get("adamw", [])}
            rs = [r for r in records if r["task"] == task and r["config"] == label and r["seed"] in base]
            if rs:
                per_task[task] = statistics.mean(r["final_val"] - base[r["seed"]] for r in rs)
        if per_task and len(per_task) == len([t for t in TASKS if tables["dropin", t].get("adamw")]):
            ranking.append((label, per_task, statistics.mean(per_task.values())))
    return sorted(ranking, key=lambda x: x[2])


def _candidates_section(records: list[dict], tables: dict) -> list[str]:
    ranking = candidate_ranking(records, tables)
    if not ranking:
        return []
    tasks = list(ranking[0][1])
    lines = [
        "## Choosing the default: candidates drop-in at AdamW's lr (validation loss)",
        "",
        "Diagonal TO with Adam's bias correction as the intercept's rate, the slope rate α × the floor δ² of "
        "its normalisation (`norm_floor`); mean over seeds of the paired difference of final *validation* "
        "loss to AdamW (negative: better); best first.",
        "",
        "| candidate | α | δ² | " + " | ".join(tasks) + " | mean |",
        "|---|---|---|" + "---|" * len(tasks) + "---|",
    ]
    for label, per_task, mean in ranking:
        kw = dict(CANDIDATES[label].kwargs)
        lines.append(
            f"| {label} | {kw['alpha']:g} | {kw['norm_floor']:g} | "
            + " | ".join(f"{per_task[t]:+.4f}" for t in tasks)
            + f" | {mean:+.4f} |"
        )
    return [*lines, ""]


def _plots(tables: dict[tuple[str, str], dict[str, list[dict]]], out: Path, kind: str) -> None:
    """Per (table, task) with two optimizers or more: validation loss vs step, vs wall time, minus AdamW's."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    for (table, task), by_config in tables.items():
        if len(by_config) >= 2:
            recs = [r for rs in by_config.values() for r in rs]
            fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
            base = [r for r in recs if r["config"] == "adamw"]
            base_curve = None
            if base:
                steps = [s for s, _, _ in base[0]["val_curve"]]
                base_curve = {
                    s: statistics.mean(dict((a, b) for a, b, _ in r["val_curve"])[s] for r in base) for s in steps
                }
            for label, all_rs in by_config.items():
                rs = [r for r in all_rs if not r["diverged"]]
                if not rs:
                    continue
                steps = [s for s, _, _ in rs[0]["val_curve"]]
                mean = [statistics.mean(dict((a, b) for a, b, _ in r["val_curve"])[s] for r in rs) for s in steps]
                walls = [statistics.mean(dict((a, c) for a, _, c in r["val_curve"])[s] for r in rs) for s in steps]
                axes[0].plot(steps, mean, marker=".", label=label)
                axes[1].plot(walls, mean, marker=".", label=label)
                if base_curve is not None:  # at the steps both evaluated (runs may differ in EVAL_EVERY)
                    both = [(s, m - base_curve[s]) for s, m in zip(steps[1:], mean[1:]) if s in base_curve]
                    axes[2].plot([s for s, _ in both], [d for _, d in both], marker=".", label=label)
            run_seeds = sorted({r["seed"] for r in recs})
            axes[0].set(xlabel="step", ylabel="validation loss", title="validation loss vs step")
            axes[1].set(xlabel="training seconds (evaluation excluded)", ylabel="validation loss", title="vs wall time")
            axes[2].axhline(0, color="black", lw=0.8)
            axes[2].set(
                xlabel="step", ylabel="Δ validation loss vs AdamW", title="difference to AdamW (below 0: better)"
            )
            for ax in axes:
                ax.grid(alpha=0.3)
            lo = min(min(b for _, b, _ in r["val_curve"][1:]) for r in recs if not r["diverged"])
            hi = statistics.median(r["val_curve"][1][1] for r in recs if not r["diverged"])
            axes[0].set_ylim(lo - 0.02, hi + 0.05)
            axes[1].set_ylim(lo - 0.02, hi + 0.05)
            axes[2].legend(fontsize=8)
            model = "SmolLM2-135M-Instruct" if kind == "real" else "proxy (3-layer Llama, SmolLM2 tokenizer)"
            what = "tuned" if table == "final" else "drop-in at AdamW's lr"
            fig.suptitle(f"{model} — {task} ({TASKS[task].steps} steps) — {what} — seeds {run_seeds}")
            fig.tight_layout()
            fig.savefig(out / f"{task}-{table}.png", dpi=90)
            plt.close(fig)


# -- CLI -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=("proxy", "real"), default="proxy")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--optimizers", nargs="+", default=list(CONFIGS), help=f"of {', '.join(CONFIGS)}")
    parser.add_argument(
        "--phase",
        nargs="+",
        default=["tune", "tune_extra", "final", "dropin", "candidates", "report"],
        choices=("tune", "tune_extra", "final", "dropin", "candidates", "report"),
    )
    parser.add_argument("--tune-seed", type=int, default=0, help="the seed of the tuning runs")
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[1, 2, 3], help="the reported seeds (final, dropin, candidates)"
    )
    parser.add_argument("--steps", type=int, default=None, help="override every task's step count")
    parser.add_argument("--workers", type=int, default=1, help="parallel runs (one thread each)")
    parser.add_argument("--out", default="runs/study")
    args = parser.parse_args(argv)
    unknown = [o for o in args.optimizers if o not in CONFIGS]
    if unknown:
        parser.error(f"unknown optimizer(s) {unknown}; known: {', '.join(CONFIGS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    tasks = [TASKS[t] for t in args.tasks]
    if args.steps is not None:
        tasks = [dataclasses.replace(t, steps=args.steps) for t in tasks]
        TASKS.update({t.name: t for t in tasks})
    configs = [CONFIGS[c] for c in args.optimizers]
    for phase in args.phase:
        if phase == "report":
            print(report(_load(out), out, args.model))
        elif phase == "candidates":
            run_phase(phase, tasks, args.model, list(CANDIDATES.values()), args.seeds, out, args.workers)
        elif phase == "tune_extra":
            run_phase(phase, tasks, args.model, configs, [args.tune_seed], out, args.workers)
        elif phase == "tune":
            run_phase(phase, tasks, args.model, configs, [args.tune_seed], out, args.workers)
            for _ in range(EDGE_EXTENSIONS):  # each pass goes one rate further where needed
                run_phase("tune_edge", tasks, args.model, configs, [args.tune_seed], out, args.workers)
        else:
            run_phase(phase, tasks, args.model, configs, args.seeds, out, args.workers)
    print(f"[study] wrote {out}/runs.jsonl, {out}/REPORT.md and plots", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
