"""FSDP2 (``fully_shard``, gloo on CPU): the sharded step equals the one-process step.

One ``torchrun`` per world size runs ``_fsdp_worker.py``; the tests read what each rank
wrote.  3 ranks shard the 33-row ``fc1`` unevenly and leave ranks 1 and 2 with an empty
shard of the (1, d) start token and rank 2 with an empty shard of the 2-row head.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _launch import torchrun
from _models import FSDP_ESTIMATORS, FSDP_NONFINITE

ESTIMATORS = FSDP_ESTIMATORS
WORLDS = (2, 3)
TOLERANCE = 1e-5  # max relative difference of fp32 parameters after 20 steps (issue 4)


@pytest.fixture(scope="module", params=WORLDS, ids=lambda n: f"{n}ranks")
def run(request, tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp(f"fsdp{request.param}")
    torchrun("_fsdp_worker.py", request.param, "--out", str(out))
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(request.param)]


def test_some_rank_has_an_empty_local_shard(run):
    _, ranks = run
    assert any(0 in r[ESTIMATORS[0]]["local_numels"] for r in ranks)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_sharded_parameters_after_20_steps_equal_one_process(run, estimator):
    _, ranks = run
    for r in ranks:
        assert r[estimator]["max_rel_diff_vs_one_process"] <= TOLERANCE


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_reduced_whole_tensor_sums_equal_one_process(run, estimator):
    _, ranks = run
    for r in ranks:
        assert r[estimator]["max_rel_diff_sums_vs_one_process"] <= TOLERANCE


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_reduced_sums_are_identical_on_every_rank(run, estimator):
    out, ranks = run
    sums = [torch.load(out / f"sums_{estimator}_rank{r}.pt") for r in range(len(ranks))]
    assert len(sums[0]) == 2 * 20  # two param groups, 20 steps
    for other in sums[1:]:
        assert all(torch.equal(a, b) for a, b in zip(sums[0], other))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_one_collective_per_param_group_per_step(run, estimator):
    _, ranks = run
    for r in ranks:
        res = r[estimator]
        counts = res["collectives_per_step"]
        assert len(counts) == 20
        # [c10d calls through torch.distributed, all collectives seen by CommDebugMode]
        assert all(c == [res["param_groups_with_grads"]] * 2 for c in counts), counts


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_sharded_cpu_groups_of_the_kernels_estimators_take_the_c_kernel(run, estimator):
    """fused=True (and the default) on CPU shards: the one-pass C kernel of hf_to.native, its
    sums through the group's one all-reduce; fused=False and the displacement form: the readable path."""
    _, ranks = run
    native = estimator.endswith("+fused") and not estimator.startswith("displacement")
    for r in ranks:
        assert r[estimator]["native_sharded_group_steps"] == (2 * 10 if native else 0)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_optimizer_state_is_sharded_like_its_parameter(run, estimator):
    _, ranks = run
    assert all(r[estimator]["state_is_dtensor_like_param"] for r in ranks)


@pytest.mark.parametrize("mode", ("sharded", "full"))
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_checkpoint_at_step_10_resumes_exactly(run, estimator, mode):
    _, ranks = run
    for r in ranks:
        assert r[estimator][f"resume_{mode}_max_abs_diff"] == 0.0


def test_full_estimator_refuses_sharded_parameters(run):
    _, ranks = run
    for r in ranks:
        assert r["full_error"] is not None
        assert "sharded" in r["full_error"] and "diagonal" in r["full_error"]


def test_diagnostics_summed_over_shards_equal_one_process(run):
    _, ranks = run
    for r in ranks:
        assert r["diagnostics_max_rel_diff"] <= TOLERANCE
    # each rank alone sees only its shards' part
    for r in ranks:
        assert all(a < b for a, b in zip(r["diagnostics_local_grad_sq"], r["diagnostics_summed_grad_sq"]))


def test_parameters_swapped_in_by_accelerate_fsdp2_are_not_flat_partitions(run):
    """accelerate shards the model after the optimizer exists and swaps the DTensors in."""
    _, ranks = run
    for r in ranks:
        assert r["accelerate_swap_max_abs_diff"] == 0.0


NONFINITE = FSDP_NONFINITE


@pytest.mark.parametrize("estimator", NONFINITE)
def test_nonfinite_entries_on_one_rank_are_decided_by_the_global_count(run, estimator):
    """Bad entries of fc1.weight live on the last rank only; start and head.bias are bad everywhere."""
    _, ranks = run
    coordinatewise = not estimator.startswith("rank_one")
    for r in ranks:
        res = r["nonfinite"][estimator]
        assert res["max_rel_diff_vs_one_process"] <= TOLERANCE
        assert res["steps_equal_one_process"]
        steps = res["steps"]
        # 5 steps; fc1.weight steps its finite entries (diagonal, none) or is skipped (rank_one)
        assert steps["block.fc1.weight"] == (5 if coordinatewise else 4)
        assert steps["block.fc1.bias"] == 5
        assert steps["start"] == 4 and steps["head.bias"] == 4  # non-finite everywhere: skipped
        assert res["bad_entries_kept"]
        assert res["fc1_changed_at_the_bad_step"] == coordinatewise


@pytest.mark.parametrize("fused", ["False", "True"], ids=["readable", "fused"])
def test_tuned_beta_on_shards_equals_one_process_and_resumes_exactly(run, fused):
    """``tune_beta`` (hf_to.tuning): the group's sums reduced over the shards give every rank the
    β of one process at every step, the weights follow, and a DCP checkpoint at step 10 (the
    tangents are DTensors of one row per rank) resumes bit for bit."""
    _, ranks = run
    for r in ranks:
        res = r["tuned"][fused]
        assert res["beta_moved"]
        assert res["max_beta_diff_vs_one_process"] <= 1e-6
        assert res["max_rel_diff_vs_one_process"] <= TOLERANCE
        assert res["resume_max_abs_diff"] == 0.0
        assert res["betas"] == ranks[0]["tuned"][fused]["betas"]  # identical on every rank
