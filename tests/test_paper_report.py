"""Every recipes/paper script runs in smoke mode, and the report is built from their data."""

from __future__ import annotations

import sys
from pathlib import Path

# recipes/paper's scripts import each other as top-level modules.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes" / "paper"))

import json

import convex
import nonconvex
import overhead
import pytest
import report


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("paper")
    convex.main(
        ["--out", str(out), "--smoke", "--problems", "lsq", "--methods", "sgd", "adam", "to_diagonal", "to_paper_full"]
    )
    nonconvex.main(["--out", str(out), "--smoke", "--models", "mlp", "--methods", "adam", "to_diagonal"])
    overhead.main(["--out", str(out), "--smoke"])
    return out


def test_smoke_runs_write_one_result_file_per_problem_model_and_benchmark(data_dir):
    assert sorted(p.name for p in data_dir.glob("*.json")) == ["convex_lsq.json", "nonconvex_mlp.json", "overhead.json"]


def test_smoke_runs_record_curves_for_every_seed_and_checkpoint(data_dir):
    conv = json.loads((data_dir / "convex_lsq.json").read_text())
    entry = conv["problems"]["lsq"]["constant"]["to_diagonal"]
    assert len(entry["mean"]) == len(entry["steps"]) and entry["steps"][-1] == conv["steps"]
    assert "variance" in entry and entry["variance"]["err_g"]["mean"] > 0
    nc = json.loads((data_dir / "nonconvex_mlp.json").read_text())
    assert len(nc["models"]["mlp"]["adam"]["test_acc"]["mean"]) == len(nc["models"]["mlp"]["adam"]["steps"])


def test_report_and_plots_are_written(data_dir, tmp_path):
    path = report.build_report(data_dir, tmp_path)
    text = path.read_text()
    assert "## Claims" in text
    for png in ("convex_lsq.png", "variance_lsq.png", "nonconvex_mlp.png"):
        assert (tmp_path / png).stat().st_size > 1000, png
        assert f"({png})" in text


def test_report_numbers_are_read_from_the_run_data(data_dir, tmp_path):
    conv = json.loads((data_dir / "convex_lsq.json").read_text())
    conv["problems"]["lsq"]["constant"]["adam"]["final_log10"] = {"mean": -12.3456, "std": 0.0}
    edited = tmp_path / "data"
    edited.mkdir()
    for f in data_dir.glob("*.json"):
        (edited / f.name).write_text(f.read_text())
    (edited / "convex_lsq.json").write_text(json.dumps(conv))
    text = report.build_report(edited, tmp_path / "out", plots=False).read_text()
    assert "-12.35 ± 0.00" in text


def test_llm_results_are_included_when_given_and_marked_not_run_otherwise(data_dir, tmp_path):
    without = report.build_report(data_dir, tmp_path / "a", plots=False).read_text()
    assert "results not given | **not run**" in without
    llm = tmp_path / "results.json"
    llm.write_text(json.dumps({"runs": {"trainable_to": {"eval_loss": 1.5}, "adamw": {"eval_loss": 1.7}}}))
    text = report.build_report(data_dir, tmp_path / "b", llm, plots=False).read_text()
    assert "| trainable_to | 1.5 |" in text
    assert "eval_loss: trainable_to 1.5000 vs adamw 1.7000" in text


def test_llm_claim_reads_the_summary_rows_of_recipes_compare(data_dir, tmp_path):
    summary = [
        {
            "label": "adamw",
            "optim": "adamw_torch_fused",
            "final_eval_loss": 2.0,
            "final_eval_loss_std": 0.0,
            "steps_per_s": 2.0,
        },
        {
            "label": "to_diagonal",
            "optim": "trainable_to",
            "final_eval_loss": 2.5,
            "final_eval_loss_std": 0.0,
            "steps_per_s": 1.0,
        },
    ]
    llm = tmp_path / "results.json"
    llm.write_text(json.dumps({"compare_args": {"baseline": "adamw"}, "summary": summary, "runs": []}))
    text = report.build_report(data_dir, tmp_path / "c", llm, plots=False).read_text()
    assert "final_eval_loss: to_diagonal 2.5000 vs adamw 2.0000 (1 seed each)" in text
    assert "to_diagonal 0.50×" in text
    assert "TO fine-tunes an LLM faster than AdamW |" in text and "| **does not hold** |" in text


def test_llm_claim_pairs_the_seeds_of_recipes_compare(data_dir, tmp_path):
    """Seeds share data order and initialisation in compare.py: a TO run 0.01 below AdamW in
    every seed holds paired, although the seed-to-seed spread (0.1) hides it unpaired."""
    summary = [
        {"label": "adamw", "optim": "adamw_torch_fused", "final_eval_loss": 2.0, "final_eval_loss_std": 0.1},
        {
            "label": "to_diagonal",
            "optim": "trainable_to",
            "optim_args": "estimator=diagonal",
            "final_eval_loss": 1.99,
            "final_eval_loss_std": 0.1,
            "seeds": [0, 1, 2],
        },
    ]
    summary[0]["seeds"] = [0, 1, 2]
    losses = {0: 1.9, 1: 2.0, 2: 2.1}
    runs = [
        {"optim": "adamw_torch_fused", "optim_args": None, "seed": k, "final_eval_loss": v} for k, v in losses.items()
    ]
    runs += [
        {
            "optim": "trainable_to",
            "optim_args": "estimator=diagonal",
            "seed": k,
            "final_eval_loss": v - 0.01 - 0.001 * k,
        }
        for k, v in losses.items()
    ]
    llm = tmp_path / "results.json"
    llm.write_text(json.dumps({"compare_args": {"baseline": "adamw"}, "summary": summary, "runs": runs}))
    text = report.build_report(data_dir, tmp_path / "d", llm, plots=False).read_text()
    assert "paired by seed, TO − AdamW: to_diagonal -0.0100 -0.0110 -0.0120" in text
    assert "TO fine-tunes an LLM faster than AdamW |" in text
    row = next(line for line in text.splitlines() if line.startswith("| TO fine-tunes an LLM"))
    assert row.endswith("| **holds** |")
