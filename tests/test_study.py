"""recipes/study.py end to end on a few steps: phases, selection on validation, the report."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

import study  # a broken study.py fails here: never skipped
import study_data
import study_runner
import study_spec

pytestmark = pytest.mark.slow


def test_study_phases_select_on_validation_and_report_on_test(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(study_data, "PROXY_PRETRAIN", {**study_data.PROXY_PRETRAIN, "steps": 2, "max_chars": 20_000})
    monkeypatch.setattr(study_runner, "EVAL_EVERY", 2)
    monkeypatch.setitem(
        study.TASKS, "pydoc_lora", study.Task("pydoc_lora", "pydoc", "lora", 3e-4, 3e-3, val_blocks=4, test_blocks=4)
    )
    out = tmp_path / "out"
    argv = ["--model", "proxy", "--tasks", "pydoc_lora", "--optimizers", "adamw", "to_rank_one"]
    argv += ["--phase", "tune", "tune_extra", "final", "dropin", "report", "--seeds", "1", "--steps", "4"]
    assert study.main([*argv, "--out", str(out)]) == 0
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    tune = [r for r in runs if r["phase"] == "tune"]
    for label in ("adamw", "to_rank_one"):
        grid = study_runner._lr_grid(study.TASKS["pydoc_lora"], study.CONFIGS[label], "proxy")
        lrs = sorted(r["lr"] for r in tune if r["config"] == label)
        on_grid = [lr for lr in lrs if any(lr == pytest.approx(g) for g in grid)]
        assert len(on_grid) == len(study_spec.GRID), "each optimizer on its lr grid"
        assert len(lrs) - len(on_grid) <= 2 * study_spec.EDGE_EXTENSIONS, "edge extensions are bounded"
    lion = study_runner._lr_grid(study.TASKS["pydoc_lora"], study.CONFIGS["lion"], "proxy")
    assert lion == pytest.approx([3e-4 * m for m in study_spec.GRID]), "grids are centred on each peer's documented lr"
    assert len([r for r in runs if r["phase"] == "tune_extra"]) == len(study.CONFIGS["to_rank_one"].extra_grid)
    for label in ("adamw",):
        best = min((r for r in tune if r["config"] == label), key=lambda r: r["final_val"])
        finals = [r for r in runs if r["config"] == label and r["phase"] == "final"]
        assert {r["lr"] for r in finals} == {best["lr"]} and {r["seed"] for r in finals} == {1}, (
            "final runs use the reported seeds (not the tuning seed 0) at the best validation lr"
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


def _tune(lr: float, val: float) -> dict:
    return {"task": "pydoc_lora", "config": "adamw", "phase": "tune", "overrides": {}, "lr": lr, "final_val": val}


def test_the_grid_goes_past_an_edge_where_the_best_rate_sits_at_most_twice():
    task, config = study.TASKS["pydoc_lora"], study.CONFIGS["adamw"]
    grid = study_runner._lr_grid(task, config, "proxy")
    falling = [_tune(lr, 5.0 - i) for i, lr in enumerate(grid)]  # best at the top
    assert study_runner._edge_rate(falling, task, config, "proxy") == pytest.approx(grid[-1] * 3)
    rising = [_tune(lr, 5.0 + i) for i, lr in enumerate(grid)]  # best at the bottom
    assert study_runner._edge_rate(rising, task, config, "proxy") == pytest.approx(grid[0] / 3)
    inside = [_tune(lr, abs(i - 1)) for i, lr in enumerate(grid)]
    assert study_runner._edge_rate(inside, task, config, "proxy") is None
    extended = [*falling, _tune(grid[-1] * 3, 0.5), _tune(grid[-1] * 9, 0.1)]
    assert study_runner._edge_rate(extended, task, config, "proxy") is None, "two extensions past an end at most"
    tuned_alpha = [*inside, {**_tune(grid[-1], -1.0), "overrides": {"alpha": 0.3}}]
    assert study_runner._edge_rate(tuned_alpha, task, config, "proxy") is None, "α/β runs do not move the lr edge"


def test_the_optimizer_table_is_read_from_yaml_into_configs():
    assert all(isinstance(c, study.Config) for c in (*study.CONFIGS.values(), *study.CANDIDATES.values()))
    rank_one = study.CONFIGS["to_rank_one"]
    assert rank_one.peer == "to" and dict(rank_one.kwargs)["estimator"] == "rank_one"
    assert dict(rank_one.extra_grid[0]) == {"alpha": 0.01, "beta": 0.1}, "grid points keep their order"
    assert dict(study.CANDIDATES["cand_a0.3_f0.0001"].kwargs)["norm_floor"] == pytest.approx(1e-4)
    assert isinstance(dict(study.CONFIGS["to_a1"].kwargs)["alpha"], float), "1.0 stays a float (a run's key)"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("adamw: {peer: adamw, lr: 1.0e-3}", "unknown keys ['lr']"),
        ("adamw: {kwargs: {}}", "missing keys ['peer']"),
        ("adamw: {peer: adamw, grid: nope}", "unknown grid 'nope'"),
    ],
)
def test_a_malformed_optimizer_table_is_refused_naming_the_problem(tmp_path, entry, message):
    path = tmp_path / "optimizers.yaml"
    path.write_text(f"optimizers:\n  {entry}\n")
    with pytest.raises(ValueError, match=re.escape(message)):
        study_spec.load_optimizer_table(path)
