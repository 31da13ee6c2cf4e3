"""DeepSpeed ZeRO-2 (gloo on CPU, 2 ranks, bf16): diagonal and none train, rank_one and full refuse.

Needs the ``deepspeed`` package, which hf_to does not depend on: without it these tests are
skipped (``test_flat_partitions.py`` covers the detection with a fake of the structure ZeRO
produces).  DeepSpeed's CPU accelerator builds a small shared-memory op with the system C++
compiler on first use.
"""

from __future__ import annotations

import json

import pytest
from _launch import torchrun

pytest.importorskip("deepspeed", reason="DeepSpeed is an optional dependency and is not installed")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("deepspeed")
    torchrun("_deepspeed_worker.py", 2, "--out", str(out), "--stage", "2", timeout=300)
    return json.loads((out / "deepspeed.json").read_text())


def test_zero_hands_the_client_optimizer_one_flat_partition_per_group(results):
    res = results["diagonal"]
    assert res["wrapper"] == "DeepSpeedZeroOptimizer"
    assert all(len(shape) == 1 for shape in res["client_param_shapes"])


@pytest.mark.parametrize("estimator", ["diagonal", "none", "folded"])
def test_elementwise_estimators_train_under_zero2(results, estimator):
    res = results[estimator]
    assert res["error"] is None
    assert len(res["losses"]) == 5 and all(loss == loss for loss in res["losses"])
    assert res["weights_changed"]


@pytest.mark.parametrize("estimator", ["rank_one", "full"])
def test_whole_tensor_estimators_raise_under_zero2(results, estimator):
    res = results[estimator]
    assert res["error"] is not None and "DeepSpeed" in res["error"] and "estimator='diagonal'" in res["error"]
    assert not res["weights_changed"]
