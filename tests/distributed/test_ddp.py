"""DDP (gloo on CPU, 2 ranks): replicas stay bit-identical under every estimator."""

from __future__ import annotations

import json

import pytest
from _launch import torchrun

ESTIMATORS = ("diagonal", "rank_one", "full", "none")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ddp")
    torchrun("_ddp_worker.py", 2, "--out", str(out))
    return json.loads((out / "ddp.json").read_text())


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_ddp_ranks_hold_identical_parameters_and_state(results, estimator):
    assert results[estimator]["tensors_compared"] > 0
    assert results[estimator]["ranks_identical"]


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_ddp_parameters_after_20_steps_equal_one_process(results, estimator):
    assert results[estimator]["max_rel_diff_vs_one_process"] <= 1e-5
