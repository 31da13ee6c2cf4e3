r"""Benchmark of the optimizer step: Trainable Optimizer variants against AdamW, interleaved.

Usage::

    python -m hf_to.bench step                       # SmolLM2-135M shapes, fp32 and bf16, + LoRA set
    python -m hf_to.bench step --sets smollm2 --dtypes fp32 --rounds 5 --repeats 10
    python -m hf_to.bench step --sets synthetic      # 8 x 2M fp32, the issue's measurement
    python -m hf_to.bench step --device cuda         # on a GPU
    python -m hf_to.bench state                      # bf16 state vs fp32 state: final losses
    python -m hf_to.bench offload                    # CPU-offload sizes: 18 x Linear(4096, 4096), 302 M fp32
    python -m hf_to.bench offload --layers 8 --width 1024 --rounds 5 --repeats 5   # issue 20's FSDP2 set

Parameter sets (weights and gradients are random; only shapes and dtypes matter):

* ``smollm2``: every parameter of SmolLM2-135M, built on the meta device from a
  ``LlamaConfig`` (hidden 576, intermediate 1536, 30 layers, 9 heads, 3 kv heads, vocab
  49152, tied embeddings): 272 tensors, 134.5 M values;
* ``lora``: the LoRA adapters (r = 16) on q/k/v/o/gate/up/down of the same model;
* ``llama1b``: every parameter of Llama-3.2-1B (1.24 B values; a GPU set);
* ``synthetic``: 8 tensors of 2 M values (the measurement in the issue).

All variants step the *same* parameter and gradient tensors (each keeps its own state), in
``--rounds`` rounds; a round times ``--repeats`` consecutive steps of every variant in turn,
so that drift of the machine's load hits all variants alike.  Reported per variant: the
median over all timed steps, min and max, the ratio to fused AdamW, and the ratio to the
*bandwidth limit* of the issue: an in-place elementwise step that reads ``w``, ``g`` and
``k`` state tensors and writes ``w`` and the ``k`` states moves ``2·|w| + |g| + 2·|state|``
bytes, so its limit is that byte count over fused AdamW's, times fused AdamW's time (for
fp32 everything this is :math:`(2k+3)/7`).  Also: state bytes per parameter, the peak memory
a step adds above the memory held before it (CPU: the process's peak RSS, reset through
``/proc/self/clear_refs``; CUDA: ``torch.cuda.max_memory_allocated``), and the first step's
and second steps' times: the first step creates the state (and builds the C kernel or
compiles the Triton kernels once per process), the second is the steady state.
On CUDA the TO variants take the Triton step of :mod:`hf_to.gpu`; ``scripts/gpu_check.py``
adds launch counts and a Trainer run.

``offload``: the step where FSDP2's ``CPUOffloadPolicy`` or DeepSpeed ZeRO-Offload puts it, on
the CPU over every parameter: ``--layers`` × ``Linear(--width, --width)`` in fp32 (weights and
biases), the TO default against ``torch.optim.AdamW(fused=True)`` in one process at each of
``--threads``, then sharded by ``fully_shard`` over ``--world`` ranks (gloo, one thread each),
where the TO default (the C kernel on the local shards, one all-reduce per group) is also timed
against its readable path (``fused=False``) on the same shards.  Each rank's median step time
is reported, and the elements per second of the kernel per rank against one process on one
thread.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import native, rounding
from .forms import FORMS
from .optimizer import TrainableOptimizer
from .registry import VARIANTS
from .threads import configure_threads

__all__ = [
    "PARAM_SETS",
    "VARIANT_FACTORIES",
    "llama1b_shapes",
    "lora_shapes",
    "main",
    "offload_command",
    "smollm2_shapes",
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: SmolLM2-135M's architecture (HuggingFaceTB/SmolLM2-135M config.json).
SMOLLM2_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def smollm2_shapes() -> list[tuple[int, ...]]:
    """Shapes of every parameter of SmolLM2-135M (from transformers on the meta device)."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM

        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))
        return [tuple(p.shape) for p in model.parameters()]
    except ImportError:  # the same shapes by hand
        c = SMOLLM2_135M
        h, i, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"]
        head = h // c["num_attention_heads"]
        layer = [(h, h), (kv * head, h), (kv * head, h), (h, h), (i, h), (i, h), (h, i), (h,), (h,)]
        return [(c["vocab_size"], h)] + layer * c["num_hidden_layers"] + [(h,)]


def lora_shapes(r: int = 16) -> list[tuple[int, ...]]:
    """Shapes of LoRA adapters ``A: (r, in)``, ``B: (out, r)`` on SmolLM2-135M's projections."""
    c = SMOLLM2_135M
    h, i, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"]
    kvd = kv * (h // c["num_attention_heads"])
    io = {"q_proj": (h, h), "k_proj": (h, kvd), "v_proj": (h, kvd), "o_proj": (h, h)}
    io |= {"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    shapes = []
    for _ in range(c["num_hidden_layers"]):
        for name in LORA_TARGETS:
            fan_in, fan_out = io[name]
            shapes += [(r, fan_in), (fan_out, r)]
    return shapes


def llama1b_shapes() -> list[tuple[int, ...]]:
    """Shapes of Llama-3.2-1B (hidden 2048, intermediate 8192, 16 layers, 32 heads, 8 kv heads,
    vocab 128256, tied embeddings): 146 tensors, 1.236 B values."""
    h, i, kv, layers, vocab = 2048, 8192, 8 * 64, 16, 128256
    layer = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i), (h,), (h,)]
    return [(vocab, h)] + layer * layers + [(h,)]


PARAM_SETS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "smollm2": smollm2_shapes,
    "lora": lora_shapes,
    "llama1b": llama1b_shapes,
    "synthetic": lambda: [(2_000_000,)] * 8,
    "tiny": lambda: [(33, 5), (7,), (1,)],  # a smoke test of the script
}


def _to(name: str, **overrides: Any) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
    return lambda params: TrainableOptimizer(params, lr=1e-5, **{**VARIANTS[name], **overrides})


@contextlib.contextmanager
def _native_off() -> Iterator[None]:
    """Run with ``HF_TO_NATIVE=0`` (the readable path on a CPU), restoring the setting after."""
    old = os.environ.get("HF_TO_NATIVE")
    os.environ["HF_TO_NATIVE"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["HF_TO_NATIVE"]
        else:
            os.environ["HF_TO_NATIVE"] = old


#: Variant name -> constructor.  ``[readable]`` is the per-tensor reference-style path.
VARIANT_FACTORIES: dict[str, Callable[[list[Tensor]], torch.optim.Optimizer]] = {
    "adamw_fused": lambda params: torch.optim.AdamW(params, lr=1e-5, fused=True),
    "adamw_foreach": lambda params: torch.optim.AdamW(params, lr=1e-5, foreach=True),
    "to_paper_none": _to("to_paper_none", fused=True),
    "to_paper_diagonal": _to("to_paper_diagonal", fused=True),
    # The raw slope rate of the paper-literal rank-one form diverges on the embedding
    # (alpha * |w|^2 >> 1 at alpha = 0.1); a NaN would skip its tensors and fake a fast step.
    # The arithmetic does not depend on alpha, so the bench runs it with a stable one.
    "to_paper_rank_one": _to("to_paper_rank_one", fused=True, alpha=1e-6),
    "trainable_to": _to("trainable_to", fused=True),
    "trainable_to[bf16 state]": _to("trainable_to", fused=True, state_dtype=torch.bfloat16),
    # β tuned on the training loss (hf_to.tuning): the fast step plus the batched tangents.
    "trainable_to[tune_beta]": _to("trainable_to", fused=True, tune_beta=1.0),
    # Every form with a kernel under the default's other settings (to_diagonal, to_folded, ...).
    **{f"to_{name}": _to(f"to_{name}", fused=True) for name, form in FORMS.items() if form.kernels},
    "trainable_to[readable]": _to("trainable_to", fused=False),
}
DEFAULT_VARIANTS = (
    "adamw_fused",
    "adamw_foreach",
    "to_paper_none",
    "to_paper_diagonal",
    "to_paper_rank_one",
    "trainable_to",
    "trainable_to[bf16 state]",
    "trainable_to[readable]",
)


@dataclass
class Result:
    name: str
    times_ms: list[float] = field(default_factory=list)
    first_step_s: float = 0.0
    second_step_s: float = 0.0
    state_bytes: int = 0
    peak_bytes: int = 0


def _state_tensors(opt: torch.optim.Optimizer) -> list[Tensor]:
    return [v for s in opt.state.values() for v in s.values() if isinstance(v, Tensor) and v.numel() > 1]


def _bytes_moved(params: list[Tensor], grads: list[Tensor], opt: torch.optim.Optimizer) -> int:
    """Bytes an ideal in-place step streams: read w, g, state; write w, state."""
    w = sum(p.numel() * p.element_size() for p in params)
    g = sum(x.numel() * x.element_size() for x in grads)
    s = sum(t.numel() * t.element_size() for t in _state_tensors(opt))
    return 2 * w + g + 2 * s


class _Peak:
    """Peak memory a step adds above what is held before it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.proc = device.type == "cpu" and os.path.exists("/proc/self/clear_refs")

    def _status(self, key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        return 0

    def measure(self, fn: Callable[[], None]) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        if self.proc:
            gc.collect()
            base = self._status("VmRSS:")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            fn()
            return max(self._status("VmHWM:") - base, 0)
        import psutil  # pragma: no cover - non-Linux

        proc = psutil.Process()
        base = proc.memory_info().rss
        fn()
        return max(proc.memory_info().rss - base, 0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_set(
    shapes: list[tuple[int, ...]],
    dtype: torch.dtype,
    variants: list[str],
    *,
    device: torch.device,
    rounds: int,
    repeats: int,
    seed: int = 0,
) -> tuple[list[Result], list[Tensor], list[Tensor], dict[str, torch.optim.Optimizer]]:
    # On a GPU the values are drawn there: a billion values drawn on the host take a minute.
    where = device if device.type == "cuda" else torch.device("cpu")
    gen = torch.Generator(device=where).manual_seed(seed)

    def draw(shape: tuple[int, ...], scale: float) -> Tensor:
        return (torch.randn(shape, generator=gen, device=where) * scale).to(device=device, dtype=dtype)

    params = [torch.nn.Parameter(draw(s, 0.02)) for s in shapes]
    grads = [draw(s, 1e-3) for s in shapes]
    for p, g in zip(params, grads):
        p.grad = g
    peak = _Peak(device)
    opts: dict[str, torch.optim.Optimizer] = {}
    results: dict[str, Result] = {}
    for name in variants:
        opt = VARIANT_FACTORIES[name](params)
        _sync(device)
        start = time.perf_counter()
        opt.step()  # creates the state (and builds or compiles the kernels, once per process)
        _sync(device)
        res = Result(name, first_step_s=time.perf_counter() - start)
        start = time.perf_counter()
        opt.step()  # second step: the steady state
        _sync(device)
        res.second_step_s = time.perf_counter() - start
        res.state_bytes = sum(t.numel() * t.element_size() for t in _state_tensors(opt))
        opts[name], results[name] = opt, res
    for _ in range(rounds):
        for name in variants:
            opt = opts[name]
            # Untimed: the other variants stepped the shared weights since this one last ran,
            # so its first step re-derives what it carries (the native kernel's sums).
            opt.step()
            _sync(device)
            for _ in range(repeats):
                _sync(device)
                start = time.perf_counter()
                opt.step()
                _sync(device)
                results[name].times_ms.append((time.perf_counter() - start) * 1e3)
    for name in variants:  # after the timed steps: nothing is compiled or created any more
        results[name].peak_bytes = peak.measure(opts[name].step)
    bad = sum(not bool(torch.isfinite(p).all()) for p in params)
    if bad:  # a diverged variant makes the others step NaN weights: the times would be wrong
        raise RuntimeError(f"{bad} parameter tensors are not finite after the timed steps; a variant diverged")
    return [results[n] for n in variants], params, grads, opts


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def report(
    title: str,
    results: list[Result],
    params: list[Tensor],
    grads: list[Tensor],
    opts: dict[str, torch.optim.Optimizer],
) -> str:
    numel = sum(p.numel() for p in params)
    base = next((r for r in results if r.name == "adamw_fused"), None)
    base_ms = statistics.median(base.times_ms) if base else math.nan
    base_bytes = _bytes_moved(params, grads, opts["adamw_fused"]) if base else math.nan
    lines = [
        f"### {title}: {len(params)} tensors, {numel / 1e6:.1f} M parameters",
        "",
        "| variant | state B/param | median ms | min ms | max ms | × fused AdamW | limit × | × limit "
        "| step peak | 1st step s | 2nd step s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        med = statistics.median(r.times_ms)
        limit = _bytes_moved(params, grads, opts[r.name]) / base_bytes
        lines.append(
            f"| {r.name} | {r.state_bytes / numel:.1f} | {med:.2f} | {min(r.times_ms):.2f} | {max(r.times_ms):.2f} "
            f"| {med / base_ms:.2f} | {limit:.2f} | {med / (limit * base_ms):.2f} | {_fmt_bytes(r.peak_bytes)} "
            f"| {r.first_step_s:.1f} | {r.second_step_s:.1f} |"
        )
    return "\n".join(lines)


def _load_note() -> str:
    try:
        load = os.getloadavg()
        return f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min)"
    except OSError:  # pragma: no cover
        return "load average unavailable"


def step_command(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    variants = args.variants.split(",") if args.variants else list(DEFAULT_VARIANTS)
    unknown = [v for v in variants if v not in VARIANT_FACTORIES]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {sorted(VARIANT_FACTORIES)}")
    if "adamw_fused" not in variants:
        variants.insert(0, "adamw_fused")
    threads = configure_threads(args.threads or None)
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(
        f"# hf_to.bench step — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
        f"torch {torch.__version__}, device {device} ({hw}), {torch.get_num_threads()} threads ({threads['chosen_by']}), "
        f"{args.rounds} rounds x {args.repeats} steps per variant, interleaved; {_load_note()} at start\n"
        f"command: python -m hf_to.bench step {' '.join(sys.argv[2:])}\n",
        flush=True,
    )
    for set_name in args.sets.split(","):
        shapes = PARAM_SETS[set_name]()
        for dtype_name in args.dtypes.split(",") if set_name != "lora" else ["fp32"]:
            results, params, grads, opts = bench_set(
                shapes,
                DTYPES[dtype_name],
                variants,
                device=device,
                rounds=args.rounds,
                repeats=args.repeats,
            )
            print(report(f"{set_name}, {dtype_name} params", results, params, grads, opts), flush=True)
            print(f"\n{_load_note()} after this table\n", flush=True)
            del results, params, grads, opts
            gc.collect()
    if native.library_path() is not None:
        print(f"native CPU kernel: {native.library_path()} (built or loaded in {native.load_seconds():.1f} s)")
    return 0


# -- bfloat16 state: convergence against float32 state -----------------------------------


@contextlib.contextmanager
def _nearest_rounding() -> Iterator[None]:
    """Ablation: store bfloat16 state with round-to-nearest instead of stochastic rounding.

    Runs the readable path (``HF_TO_NATIVE=0``), whose rounding of bfloat16 state it patches:
    the C kernel rounds stochastically inside.
    """
    original = rounding._round_bf16
    rounding._round_bf16 = lambda x, seed: x.to(torch.bfloat16)
    try:
        with _native_off():
            yield
    finally:
        rounding._round_bf16 = original


def _noisy_quadratic(state_dtype: torch.dtype | None, seed: int, steps: int = 1000) -> float:
    """Final loss on ½ Σ hᵢ wᵢ², hᵢ log-spaced in [1e-2, 1], gradient noise σ = 0.1."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.logspace(-2, 0, 512)
    w = torch.nn.Parameter(torch.ones(512))
    opt = TrainableOptimizer([w], lr=3e-3, state_dtype=state_dtype)
    for _ in range(steps):
        w.grad = h * w.detach() + 0.1 * torch.randn(512, generator=gen)
        opt.step()
    return 0.5 * (h * w.detach() ** 2).sum().item()


def _logistic(state_dtype: torch.dtype | None, seed: int, steps: int = 1000) -> float:
    """Final full-batch loss of logistic regression (d = 64, n = 4096, batch 64, lr 1e-3)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, 64, generator=gen)
    y = (x @ torch.randn(64, generator=gen) + 0.5 * torch.randn(4096, generator=gen) > 0).float()
    model = torch.nn.Linear(64, 1)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    opt = TrainableOptimizer(model.parameters(), lr=1e-3, state_dtype=state_dtype)
    loss_fn = torch.nn.functional.binary_cross_entropy_with_logits
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        opt.zero_grad()
        loss_fn(model(x[idx]).squeeze(1), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        return loss_fn(model(x).squeeze(1), y).item()


def state_command(args: argparse.Namespace) -> int:
    """Final losses with float32 state, bfloat16 state (stochastic rounding) and the ablation."""
    print(
        f"# hf_to.bench state — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"torch {torch.__version__}; trainable_to defaults, {args.seeds} seeds, final loss mean (min-max)\n"
    )
    print("| problem | float32 state | bfloat16 state, stochastic rounding | bfloat16 state, round-to-nearest |")
    print("|---|---:|---:|---:|")
    for name, problem in (
        ("noisy quadratic (d=512, 1000 steps)", _noisy_quadratic),
        ("logistic regression (d=64, 1000 steps)", _logistic),
    ):
        cells = []
        for label in ("fp32", "bf16", "bf16-nearest"):
            with _nearest_rounding() if label == "bf16-nearest" else contextlib.nullcontext():
                losses = [problem(None if label == "fp32" else torch.bfloat16, seed) for seed in range(args.seeds)]
            cells.append(f"{statistics.mean(losses):.4g} ({min(losses):.4g}-{max(losses):.4g})")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


# -- CPU offload: the step on the CPU over every parameter, one process and sharded --------

#: Variants of the offload bench: the TO default, its readable path, fused AdamW (CPU).
OFFLOAD_VARIANTS: dict[str, Callable[[list[Tensor]], torch.optim.Optimizer]] = {
    "adamw_fused": VARIANT_FACTORIES["adamw_fused"],
    "trainable_to": VARIANT_FACTORIES["trainable_to"],
    "trainable_to[readable]": VARIANT_FACTORIES["trainable_to[readable]"],
}


def _time_variants(
    params: list[Tensor], variants: list[str], rounds: int, repeats: int, barrier: Callable[[], None] = lambda: None
) -> dict[str, list[float]]:
    """Median-ready step times (ms) of each variant on the same parameters, interleaved by round."""
    opts = {name: OFFLOAD_VARIANTS[name](params) for name in variants}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for opt in opts.values():
        opt.step()  # creates the state (and loads the kernel)
    for _ in range(rounds):
        for name, opt in opts.items():
            barrier()
            opt.step()  # untimed: the other variants moved the weights (the kernel re-derives its sums)
            for _ in range(repeats):
                barrier()
                start = time.perf_counter()
                opt.step()
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def _linear_shapes(layers: int, width: int) -> list[tuple[int, ...]]:
    return [shape for _ in range(layers) for shape in ((width, width), (width,))]


def _offload_rank(rank: int, world: int, args: argparse.Namespace, out: str) -> None:
    """One rank of the sharded offload bench (``torch.multiprocessing.spawn``)."""
    import json

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        with torch.device("meta"):
            model = torch.nn.Sequential(*(torch.nn.Linear(args.width, args.width) for _ in range(args.layers)))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model.to_empty(device="cpu")
        gen = torch.Generator().manual_seed(rank)
        params = list(model.parameters())
        with torch.no_grad():
            for p in params:
                local = p.to_local()
                local.copy_(torch.randn(local.shape, generator=gen) * 0.02)
                p.grad = DTensor.from_local(
                    torch.randn(local.shape, generator=gen) * 1e-3,
                    p.device_mesh,
                    p.placements,
                    shape=p.shape,
                    stride=p.stride(),
                    run_check=False,
                )
        variants = ["adamw_fused", "trainable_to", "trainable_to[readable]"]
        times = _time_variants(params, variants, args.rounds, args.repeats, barrier=dist.barrier)
        local_numel = sum(p.to_local().numel() for p in params)
        Path(out, f"rank{rank}.json").write_text(json.dumps({"times": times, "local_numel": local_numel}))
    finally:
        dist.destroy_process_group()


def offload_command(args: argparse.Namespace) -> int:
    import json
    import socket
    import tempfile

    import torch.multiprocessing as mp

    shapes = _linear_shapes(args.layers, args.width)
    numel = sum(math.prod(s) for s in shapes)
    print(
        f"# hf_to.bench offload — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
        f"torch {torch.__version__}, CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} CPUs; "
        f"{args.layers} x Linear({args.width}, {args.width}): {len(shapes)} fp32 tensors, {numel / 1e6:.1f} M "
        f"parameters; {args.rounds} rounds x {args.repeats} steps per variant, interleaved; {_load_note()} at start\n"
        f"command: python -m hf_to.bench offload {' '.join(sys.argv[2:])}\n",
        flush=True,
    )
    lines = [
        "| setting | threads | variant | median ms | min ms | × fused AdamW | M params/s per thread |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    one_thread_rate = math.nan
    threads_before = torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            times = _time_variants(params, ["adamw_fused", "trainable_to"], args.rounds, args.repeats)
            base = statistics.median(times["adamw_fused"])
            for name, ts in times.items():
                med = statistics.median(ts)
                rate = numel / med / 1e3 / threads
                if name == "trainable_to" and threads == 1:
                    one_thread_rate = rate
                lines.append(
                    f"| one process | {threads} | {name} | {med:.1f} | {min(ts):.1f} | {med / base:.2f} | {rate:.0f} |"
                )
            print(lines[-2] + "\n" + lines[-1], flush=True)
            gc.collect()
    finally:
        torch.set_num_threads(threads_before)
    del params
    gc.collect()
    if args.world > 1:
        with tempfile.TemporaryDirectory() as out, socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(sock.getsockname()[1]))
            sock.close()
            mp.spawn(_offload_rank, args=(args.world, args, out), nprocs=args.world, join=True)
            ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(args.world)]
        for r, res in enumerate(ranks):
            base = statistics.median(res["times"]["adamw_fused"])
            for name, ts in res["times"].items():
                med = statistics.median(ts)
                rate = res["local_numel"] / med / 1e3
                lines.append(
                    f"| fully_shard, {args.world} ranks (rank {r}) | 1 | {name} | {med:.1f} | {min(ts):.1f} "
                    f"| {med / base:.2f} | {rate:.0f} |"
                )
        default = [statistics.median(res["times"]["trainable_to"]) for res in ranks]
        readable = [statistics.median(res["times"]["trainable_to[readable]"]) for res in ranks]
        rate = min(res["local_numel"] / statistics.median(res["times"]["trainable_to"]) / 1e3 for res in ranks)
        summary = (
            f"\nsharded: the TO default is {min(b / a for a, b in zip(default, readable)):.2f}x faster than its "
            f"readable path on the same shards (the slowest rank); per element the kernel on a shard runs at "
            f"{rate / one_thread_rate:.2f}x one process on one thread"
        )
    else:
        summary = ""
    print("\n" + "\n".join(lines) + summary + f"\n\n{_load_note()} at the end", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_to.bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    step = sub.add_parser("step", help="time the optimizer step (see the module docstring)")
    step.add_argument("--sets", default="smollm2,lora", help=f"comma list of {sorted(PARAM_SETS)}")
    step.add_argument("--dtypes", default="fp32,bf16", help="parameter dtypes: fp32,bf16,fp16 (LoRA: fp32)")
    step.add_argument("--variants", default="", help=f"comma list of {sorted(VARIANT_FACTORIES)}")
    step.add_argument("--rounds", type=int, default=5)
    step.add_argument("--repeats", type=int, default=5)
    step.add_argument("--device", default="", help="cpu or cuda (default: cuda when available)")
    step.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch.set_num_threads (default: OMP_NUM_THREADS, else the CPUs this process may use)",
    )
    state = sub.add_parser("state", help="convergence with bfloat16 state against float32 state")
    state.add_argument("--seeds", type=int, default=3)
    offload = sub.add_parser("offload", help="the CPU step of an offloaded run, one process and sharded (gloo)")
    offload.add_argument("--layers", type=int, default=18, help="Linear layers (default 18: 302 M params at 4096)")
    offload.add_argument("--width", type=int, default=4096)
    offload.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    offload.add_argument("--world", type=int, default=2, help="ranks of the sharded run (1: none)")
    offload.add_argument("--rounds", type=int, default=3)
    offload.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    commands = {"step": step_command, "state": state_command, "offload": offload_command}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
