"""The prepared GPU check script runs on a machine without CUDA up to where it needs it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs the whole check")
def test_gpu_check_says_no_cuda_device_and_exits_0_on_a_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["ok"] and report["environment"]["cuda"] is False
    assert "missing" in report["environment"]


def test_the_triton_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter runs the kernels' Python; this runs Triton's compiler down to a cubin
    (ptxas) for one variant per estimator and dtype pair, and checks 16-byte vector stores."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "triton_compile_check.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr  # every variant compiled, vector stores in all
    assert re.search(r"compiled (\d+)/\1 kernel variants", done.stdout), done.stdout


def test_the_cpu_offload_check_runs_its_steps_without_a_gpu():
    """scripts/cpu_offload_check.py --cpu: the same script on gloo without the offload policy;
    FSDP2-sharded CPU groups take the C kernel and equal the run without FSDP."""
    from hf_to import native

    if not native.available():
        pytest.skip("no C compiler: hf_to.native cannot be built")
    sys.path.insert(0, str(ROOT / "tests" / "distributed"))
    from _launch import run_once_more_on_abort  # (gloo's occasional abort under load)

    done = run_once_more_on_abort(
        [sys.executable, str(ROOT / "scripts" / "cpu_offload_check.py"), "--cpu"], timeout=300, cwd=ROOT
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for estimator in ("diagonal", "rank_one", "none", "folded"):
        assert report[estimator]["native_sharded_calls"] == report[estimator]["steps"]
        assert report[estimator]["max_rel_diff_vs_no_fsdp"] <= 1e-6
