"""Seconds per optimizer step of the study's peers on SmolLM2-135M full fine-tuning.

Every weight but the tied embeddings trains (the study's ``pydoc_full`` on the real model);
the gradients are random (the step's cost does not depend on their values), each optimizer
is built as the study builds it (``recipes/peers.py``, package defaults) and steps ``--steps``
times; the first step (state allocation, SOAP's first eigenbases) is printed apart from the
median of the others.  It says what a SmolLM2-135M run of a peer costs on the machine at hand beside
the model's forward and backward pass, before one is started::

    .venv/bin/python recipes/experiments/peer_step_cost.py --optimizers adamw to soap muon --steps 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "recipes"))
sys.path.insert(0, str(ROOT))

from peers import PEERS, build_optimizer  # noqa: E402
from study_data import build_model  # noqa: E402


def step_seconds(name: str, params: list[torch.nn.Parameter], steps: int, lr: float) -> list[float]:
    """Wall seconds of each of ``steps`` optimizer steps of peer ``name`` on ``params``."""
    opt = build_optimizer(name, params, lr, weight_decay=0.0, warmup_steps=1)
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 1e-3
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--optimizers", nargs="+", default=["adamw", "to", "soap", "muon"], choices=sorted(PEERS))
    ap.add_argument("--steps", type=int, default=4, help="steps per optimizer (at least 2)")
    ap.add_argument("--lr", type=float, default=3e-5, help="AdamW's usual full fine-tuning rate")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be at least 2 (the first step is reported apart)")
    torch.set_num_threads(args.threads)
    model, _ = build_model("real", "full")
    params = [p for p in model.parameters() if p.requires_grad]
    print(f"SmolLM2-135M full fine-tuning: {sum(p.numel() for p in params):,} trainable values, {args.threads} threads")
    for name in args.optimizers:
        first, *rest = step_seconds(name, params, args.steps, args.lr)
        print(f"{name:8s} first step {first:7.2f} s, then median {statistics.median(rest):7.2f} s per step", flush=True)


if __name__ == "__main__":
    main()
