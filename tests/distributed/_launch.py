"""Run a worker script under ``torchrun`` (gloo on CPU) from a pytest test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def torchrun(script: str, nproc: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``tests/distributed/<script>`` on ``nproc`` local ranks; raise with its log on failure."""
    path = [str(ROOT), str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(HERE / script),
        *args,
    ]
    proc = run_once_more_on_abort(cmd, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc


def run_once_more_on_abort(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd)`` (output captured), run once more if a rank aborted inside the C++
    runtime ("terminate called without an active exception", SIGABRT), which gloo does now and
    then on a heavily loaded 2-core machine whatever the ranks compute.  An assertion or Python
    error is never retried."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0 and _crashed(proc):
        proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    return proc


def _crashed(proc: subprocess.CompletedProcess) -> bool:
    """Whether a rank died by SIGABRT in the C++ runtime, with no Python error before it (the
    launcher's own traceback, printed after, does not count)."""
    marker = "terminate called without an active exception"
    return marker in proc.stderr and "Traceback (most recent call last)" not in proc.stderr.split(marker)[0]
