"""recipes/study.py end to end on a few steps: phases, selection on validation, the report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

import study  # a broken study.py fails here: never skipped

pytestmark = pytest.mark.slow


def test_study_phases_select_on_validation_and_report_on_test(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(study, "PROXY_PRETRAIN", {**study.PROXY_PRETRAIN, "steps": 2, "max_chars": 20_000})
    monkeypatch.setattr(study, "EVAL_EVERY", 2)
    monkeypatch.setitem(
        study.TASKS, "pydoc_lora", study.Task("pydoc_lora", "pydoc", "lora", 3e-4, 3e-3, val_blocks=4, test_blocks=4)
    )
    out = tmp_path / "out"
    argv = ["--model", "proxy", "--tasks", "pydoc_lora", "--optimizers", "adamw", "to_disp"]
    argv += ["--phase", "tune", "tune_extra", "final", "dropin", "report", "--seeds", "0", "1", "--steps", "4"]
    assert study.main([*argv, "--out", str(out)]) == 0
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    tune = [r for r in runs if r["phase"] == "tune"]
    assert len(tune) == 2 * len(study.GRID), "each optimizer on its lr grid"
    lion = study._lr_grid(study.TASKS["pydoc_lora"], study.CONFIGS["lion"], "proxy")
    assert lion == pytest.approx([3e-4 * m for m in study.GRID]), "grids are centred on each peer's documented lr"
    assert len([r for r in runs if r["phase"] == "tune_extra"]) == len(study.CONFIGS["to_disp"].extra_grid)
    for label in ("adamw",):
        best = min((r for r in tune if r["config"] == label), key=lambda r: r["final_val"])
        finals = [r for r in runs if r["config"] == label and r["phase"] == "final"]
        assert {r["lr"] for r in finals} == {best["lr"]} and {r["seed"] for r in finals} == {1}, (
            "final runs reuse the tuning seed and add the others at the best validation lr"
        )
    report = (out / "REPORT.md").read_text()
    assert "Tuned (best validation config per optimizer): pydoc_lora" in report
    assert "Drop-in (AdamW's lr: its tuned one where a tuning phase ran; own defaults): pydoc_lora" in report
    assert all(r["test"] == r["test"] and r["state_bytes_per_param"] > 0 for r in runs)
    assert (out / "pydoc_lora-final.png").is_file()


def test_unknown_optimizer_is_refused_naming_the_known_ones(capsys):
    with pytest.raises(SystemExit) as exc:
        study.parse_args(["--optimizers", "adamx"])
    assert exc.value.code == 2
    assert "adamx" in capsys.readouterr().err
