"""TO's default with bfloat16 state against float32 state, drop-in on the proxy's three tasks.

Each task and seed (1–3) runs the package defaults twice at AdamW's tuned learning rate of the
stored study, once with ``state_dtype=torch.bfloat16`` (6 bytes of state per parameter, stored
with stochastic rounding) and once with float32 state (12 bytes); the same data order and
initialisation, so the two pair by seed::

    .venv/bin/python recipes/experiments/bf16_state.py

Result (2026-12-06, ``recipes/results/bf16-state-2026-12-06/runs.json``): bf16 minus fp32 final
validation and test loss within ±0.0002 in all nine task × seed pairs.
"""

from __future__ import annotations

import fcntl
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "recipes"))
sys.path.insert(0, str(ROOT))

import study  # noqa: E402

STORED = ROOT / "recipes/results/study-proxy-v2-2026-11-30"
CPU_LOCK = Path("/tmp/hf_to_cpu.lock")


def main(out: Path = ROOT / "runs/bf16-state/runs.json") -> list[dict]:
    torch.set_num_threads(1)
    records = [r for r in study._load(STORED) if r["model"] == "proxy"]
    rows = []
    for task in study.TASKS.values():
        adamw = {r["seed"]: r for r in study.table_runs(records, task.name, "dropin", {1, 2, 3})["adamw"]}
        for seed in sorted(adamw):
            for label, kwargs in (("fp32", ()), ("bf16", (("state_dtype", torch.bfloat16),))):
                with CPU_LOCK.open("w") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    rec = study.run_one(
                        task, "proxy", study.Config(f"to_{label}", "to", kwargs), adamw[seed]["lr"], seed, {}
                    )
                rows.append(
                    dict(task=task.name, seed=seed, state=label, val=rec["final_val"], test=rec["test"],
                         bytes=rec["state_bytes_per_param"])
                )  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
