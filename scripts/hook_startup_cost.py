"""What the start-up hook (hf_to_hook.pth → _hf_to_startup) adds to every Python start.

Runs ``python -X importtime -c pass`` N times in this environment (hf-to installed) and
reports the import time of ``_hf_to_startup`` (the module the .pth line imports: it only
installs an import finder), median and min.

    .venv/bin/python scripts/hook_startup_cost.py --runs 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys


def hook_import_us() -> int:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True, env=env, check=True
    )
    lines = [ln for ln in run.stderr.splitlines() if ln.rstrip().endswith(" _hf_to_startup")]
    if not lines:
        raise SystemExit("the hook is not installed in this environment (pip install -e . first)")
    return int(lines[0].split("|")[1])  # cumulative microseconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    times = [hook_import_us() for _ in range(args.runs)]
    print(
        f"_hf_to_startup import: median {statistics.median(times) / 1000:.3f} ms, min {min(times) / 1000:.3f} ms "
        f"over {args.runs} runs of `python -X importtime -c pass`"
    )


if __name__ == "__main__":
    main()
