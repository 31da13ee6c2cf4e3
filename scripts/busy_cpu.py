"""Median training-step time of ``recipes/sft.py`` alone and beside a competing torch job.

The competitor is another torch process multiplying 1500 x 1500 matrices with two threads,
the situation that used to slow the recipes down by 10x on a 2-core machine (two OpenMP teams
spinning on the same cores).  Each case runs ``recipes/sft.py --max_steps 4`` on the embedded
model and reads ``train_step_ms_median`` (steps 2-4) from its ``run_record.json``::

    .venv/bin/python scripts/busy_cpu.py                       # the recipes' default thread policy
    .venv/bin/python scripts/busy_cpu.py --env OMP_NUM_THREADS=1

Prints one markdown row per case with the machine's load average when the case started.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# A generator keeps no product (a list comprehension would keep every one and fill the memory).
COMPETITOR = (
    "import torch; torch.set_num_threads(2); a = torch.randn(1500, 1500); any((a @ a) is None for _ in iter(int, 1))"
)
SFT_ARGS = ["--max_steps", "4", "--max_eval_samples", "8", "--save_final_model", "false", "--report_to", "none"]


def run_case(busy: bool, env: dict[str, str], root: Path) -> dict[str, object]:
    load = os.getloadavg()[0]
    competitor = None
    if busy:
        competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR], env={**os.environ, "OMP_NUM_THREADS": "2"})
        time.sleep(3)  # let it reach its loop
    try:
        with tempfile.TemporaryDirectory() as out:
            started = time.perf_counter()
            subprocess.run(
                [sys.executable, str(root / "recipes" / "sft.py"), *SFT_ARGS, "--output_dir", out],
                env={**os.environ, "PYTHONPATH": str(root), **env},
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            total = time.perf_counter() - started
            record = json.loads((Path(out) / "run_record.json").read_text())
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    return {
        "busy": busy,
        "load": load,
        "step_s": record["train_step_ms_median"] / 1e3,
        "total_s": total,
        "threads": record.get("threads", {}),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", nargs="*", default=[], help="KEY=VALUE set for sft.py")
    parser.add_argument("--label", default="", help="first column of the printed rows")
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout whose recipes/sft.py and hf_to run")
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    label = args.label or (" ".join(args.env) or "default")
    for busy in (False, True):
        row = run_case(busy, env, args.root.resolve())
        beside = "beside a 2-thread torch job" if busy else "alone"
        print(
            f"| {label} | {beside} | {row['load']:.2f} | {row['step_s']:.2f} | {row['total_s']:.0f} | "
            f"{json.dumps(row['threads'])} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
