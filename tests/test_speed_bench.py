"""The step benchmark script (hf_to.bench) runs and reports what it promises."""

from __future__ import annotations

import math
import os

import pytest
import torch

from hf_to import bench, native


def test_smollm2_shapes_match_the_135m_architecture():
    shapes = bench.smollm2_shapes()
    assert len(shapes) == 1 + 30 * 9 + 1  # embedding (tied), 9 tensors per layer, final norm
    assert sum(math.prod(s) for s in shapes) == 134_515_008
    assert shapes[0] == (49152, 576)


def test_lora_shapes_cover_seven_projections_per_layer():
    shapes = bench.lora_shapes(r=16)
    assert len(shapes) == 30 * 7 * 2
    assert all(16 in s for s in shapes)


def test_step_benchmark_prints_a_table_with_ratios_and_memory(monkeypatch, capsys):
    variants = "adamw_fused,to_paper_diagonal,trainable_to[bf16 state],trainable_to[tune_beta]"
    args = ["step", "--sets", "tiny", "--dtypes", "fp32", "--rounds", "2", "--repeats", "1", "--variants", variants]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [r.split("|")[1].strip() for r in rows] == variants.split(",")
    cells = rows[1].split("|")
    assert float(cells[2]) == pytest.approx(8.0, abs=0.1)  # paper diagonal: b and a in fp32
    assert float(cells[7]) == pytest.approx(1.0)  # same bytes moved as AdamW: limit = 1 x AdamW
    assert "native CPU kernel" in out


def test_state_benchmark_runs_each_column(monkeypatch, capsys):
    monkeypatch.setattr(bench, "_noisy_quadratic", lambda dtype, seed: 1.0 if dtype is None else 2.0)
    monkeypatch.setattr(bench, "_logistic", lambda dtype, seed: 3.0)
    assert bench.main(["state", "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert "| noisy quadratic (d=512, 1000 steps) | 1 (1-1) | 2 (2-2) | 2 (2-2) |" in out


def test_round_to_nearest_ablation_runs_the_kernels_it_patches(monkeypatch):
    """The C kernel rounds stochastically inside; the ablation must not reach it."""
    monkeypatch.delenv("HF_TO_NATIVE", raising=False)
    calls = []
    real = native.native_step
    monkeypatch.setattr(native, "native_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    with bench._nearest_rounding():
        nearest = bench._logistic(torch.bfloat16, seed=0, steps=50)
    assert calls == [] and "HF_TO_NATIVE" not in os.environ
    stochastic = bench._logistic(torch.bfloat16, seed=0, steps=50)
    assert calls and nearest != stochastic
