"""Overhead: time of ``optimizer.step()`` and optimizer-state memory, TO against SGD and Adam(W).

The parameters are the tensors of a small decoder (the shapes of a Llama block: attention
``d×d`` projections, an MLP ``d×(8d/3)``, RMSNorm vectors, an embedding), filled with random
gradients; only ``step()`` is timed (median over repeats, after warm-up), on this machine's
CPU with one thread.  It measures the optimizer's own cost, not a training step's, which
also contains the forward and backward passes (the digits runs report both).

Usage::

    python recipes/paper/overhead.py --out recipes/paper/report/data
    python recipes/paper/overhead.py --out /tmp/paper --smoke
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from common import METHODS, provenance, save_json
from torch import nn

from hf_to import TrainableOptimizer

__all__ = ["OVERHEAD_METHODS", "decoder_params", "main", "time_steps"]

OVERHEAD_METHODS = (
    "sgd",
    "momentum",
    "adam",
    "adamw",
    "adamw_fused",
    "to_diagonal",
    "to_diagonal_readable",
    "to_rank_one",
    "to_none",
    "to_paper_diagonal",
)
LABELS = {
    "adamw": "AdamW",
    "adamw_fused": "AdamW (fused)",
    "to_diagonal_readable": "TO-diag, fused=False (readable path)",
}
#: Whether this hf_to has the ``fused`` switch (the fast kernels vs the readable path).
HAS_FUSED = "fused" in inspect.signature(TrainableOptimizer.__init__).parameters


def decoder_params(hidden: int, layers: int, vocab: int) -> list[nn.Parameter]:
    """Parameters shaped like a Llama decoder (no model needed: only shapes matter here)."""
    inter = (8 * hidden) // 3
    shapes: list[tuple[int, ...]] = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4 + [(inter, hidden)] * 2 + [(hidden, inter)] + [(hidden,)] * 2
    shapes.append((hidden,))
    gen = torch.Generator().manual_seed(0)
    params = []
    for s in shapes:
        p = nn.Parameter(torch.randn(s, generator=gen) * 0.02)
        p.grad = torch.randn(s, generator=gen) * 1e-3
        params.append(p)
    return params


def _build(key: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if key == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    if key == "adamw_fused":  # transformers' default optimizer, the bar users compare against
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)
    if key == "to_diagonal_readable":
        return TrainableOptimizer(params, lr=1e-4, fused=False)
    return METHODS[key].build(params, lr=1e-4)


def time_steps(key: str, params: list[nn.Parameter], *, warmup: int, repeats: int) -> dict[str, float]:
    opt = _build(key, params)
    for _ in range(warmup):
        opt.step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    return {"median_s": statistics.median(times), "min_s": min(times), "state_bytes": state}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="directory for overhead.json")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--smoke", action="store_true", help="a tiny decoder, 2 repeats")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.smoke:
        args.hidden, args.layers, args.vocab, args.repeats = 32, 1, 64, 2
    params = decoder_params(args.hidden, args.layers, args.vocab)
    n = sum(p.numel() for p in params)
    res: dict[str, Any] = {
        "params": n,
        "tensors": len(params),
        "shape": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab},
        "methods": {},
        "provenance": provenance(),
    }
    # Interleave the methods over rounds so that a load change on the machine hits them all.
    rounds = 3
    per_round = max(1, args.repeats // rounds)
    keys = [k for k in OVERHEAD_METHODS if HAS_FUSED or k != "to_diagonal_readable"]
    samples: dict[str, list[dict[str, float]]] = {k: [] for k in keys}
    for _ in range(rounds):
        for key in keys:
            samples[key].append(time_steps(key, params, warmup=2, repeats=per_round))
    for key, runs in samples.items():
        res["methods"][key] = {
            "label": LABELS.get(key) or METHODS[key].label,
            "median_s": statistics.median(r["median_s"] for r in runs),
            "min_s": min(r["min_s"] for r in runs),
            "state_bytes": runs[0]["state_bytes"],
        }
        print(
            f"{key:18s} {res['methods'][key]['median_s'] * 1e3:8.2f} ms  state {runs[0]['state_bytes'] / 2**20:.1f} MiB"
        )
    save_json(args.out / "overhead.json", res)
    return res


if __name__ == "__main__":
    main()
