"""``--optim trainable_to`` in the Trainer under DDP, launched by ``accelerate launch`` on CPU.

accelerate 1.x runs ``accelerate launch --cpu --num_processes 2`` as *one* process on a
single machine (multi-CPU needs ``--mpirun_hostfile``); ``--multi_gpu --num_processes 2``
starts two processes through ``torch.distributed.run`` and, without CUDA, the Trainer
(``use_cpu=True``) runs DDP over gloo.  That is the launch line tested here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def accelerate_launch(out: Path, *args: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes=2",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={port}",
        str(HERE / "_trainer_worker.py"),
        "--out",
        str(out),
        *args,
    ]
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict, Path, Path]:
    full_dir, resumed_dir = tmp_path_factory.mktemp("full"), tmp_path_factory.mktemp("resumed")
    full = accelerate_launch(full_dir)
    resumed = accelerate_launch(resumed_dir, "--resume", str(full_dir / "checkpoint-3"))
    return full, resumed, full_dir, resumed_dir


def test_trainer_ddp_runs_trainable_to_on_two_ranks(runs):
    full, *_ = runs
    assert full["world"] == 2 and full["optimizer"] == "TrainableOptimizer" and full["estimator"] == "rank_one"
    assert full["global_step"] == 6 and len(full["losses"]) == 6
    assert all(loss == loss for loss in full["losses"])
    assert full["max_abs_change"] > 0


def test_trainer_ddp_ranks_hold_identical_parameters_and_state(runs):
    full, resumed, *_ = runs
    assert full["tensors_compared"] > 0
    assert full["ranks_identical"] and resumed["ranks_identical"]


def test_trainer_ddp_resume_from_step_3_equals_the_uninterrupted_run(runs):
    _, resumed, full_dir, resumed_dir = runs
    assert resumed["global_step"] == 6
    a, b = torch.load(full_dir / "params.pt"), torch.load(resumed_dir / "params.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
