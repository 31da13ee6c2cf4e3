"""CPU offload: the configs say what they promise, and the offload bench runs end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "accelerate_configs"
sys.path.insert(0, str(ROOT / "tests" / "distributed"))

from _launch import run_once_more_on_abort  # noqa: E402


def test_the_zero_offload_config_keeps_the_client_optimizer_and_offloads_its_state():
    raw = yaml.safe_load((CONFIGS / "deepspeed_zero2_offload.yaml").read_text())
    assert raw["distributed_type"] == "DEEPSPEED"
    ds = json.loads((ROOT / raw["deepspeed_config"]["deepspeed_config_file"]).read_text())
    assert ds["zero_force_ds_cpu_optimizer"] is False  # else DeepSpeed refuses TO under offload
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "optimizer" not in ds  # the client optimizer (TO) is used, not one from the DeepSpeed config


def test_the_fsdp2_offload_config_offloads_the_parameters():
    raw = yaml.safe_load((CONFIGS / "fsdp2_cpu_offload.yaml").read_text())
    assert raw["fsdp_config"]["fsdp_version"] == 2 and raw["fsdp_config"]["fsdp_offload_params"] is True


def test_the_offload_bench_times_one_process_and_two_ranks():
    from hf_to import native

    if not native.available():
        pytest.skip("no C compiler: hf_to.native cannot be built")
    cmd = [sys.executable, "-m", "hf_to.bench", "offload", "--layers", "2", "--width", "32"]
    cmd += ["--threads", "1", "--world", "2", "--rounds", "1", "--repeats", "1"]
    done = run_once_more_on_abort(cmd, cwd=ROOT, timeout=300)  # (gloo's occasional abort under load)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    for setting in ("one process", "fully_shard, 2 ranks (rank 0)", "fully_shard, 2 ranks (rank 1)"):
        assert any(row.startswith(f"| {setting} |") and "trainable_to" in row for row in rows), setting
    assert "faster than its readable path on the same shards" in done.stdout
