"""Early DeepSpeed checks (hf_to.integrations.deepspeed), without deepspeed installed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_flat_partitions import model, zero_flatten

from hf_to import TrainableOptimizer
from hf_to.integrations.deepspeed import check_estimator, check_wrapped_optimizer, deepspeed_requested


def test_deepspeed_is_requested_by_training_args_or_accelerate_env(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert not deepspeed_requested(SimpleNamespace(deepspeed=None))
    assert deepspeed_requested(SimpleNamespace(deepspeed="ds_config.json"))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert deepspeed_requested()


@pytest.mark.parametrize("estimator", ["rank_one", "full"])
def test_check_estimator_refuses_whole_tensor_estimators_under_deepspeed(estimator, monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    check_estimator(estimator, training_args=SimpleNamespace(deepspeed=None))
    with pytest.raises(ValueError, match="estimator='diagonal'"):
        check_estimator(estimator, training_args=SimpleNamespace(deepspeed={"zero_optimization": {"stage": 2}}))


@pytest.mark.parametrize("estimator", ["diagonal", "none", "folded"])
def test_check_estimator_accepts_elementwise_estimators_under_deepspeed(estimator):
    check_estimator(estimator, training_args=SimpleNamespace(deepspeed="ds_config.json"))


def test_check_wrapped_optimizer_finds_the_client_inside_a_zero_wrapper():
    opt = TrainableOptimizer(model().parameters(), estimator="rank_one")
    wrapper = SimpleNamespace(optimizer=opt)  # DeepSpeedZeroOptimizer keeps the client as .optimizer
    check_wrapped_optimizer(wrapper)  # parameters as given: fine
    zero_flatten(opt)
    with pytest.raises(ValueError, match="DeepSpeed"):
        check_wrapped_optimizer(SimpleNamespace(optimizer=wrapper))


def test_check_wrapped_optimizer_ignores_other_optimizers():
    check_wrapped_optimizer(torch.optim.SGD(model().parameters(), lr=0.1))


def test_check_estimator_refuses_tune_beta_under_deepspeed_by_name(monkeypatch):
    """Each ZeRO rank would tune its own β on its flat partition: refused before the model loads."""
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    check_estimator("folded", tune_beta=1.0, training_args=SimpleNamespace(deepspeed=None))
    check_estimator("folded", tune_beta=0.0, training_args=SimpleNamespace(deepspeed="ds_config.json"))
    with pytest.raises(ValueError, match="tune_beta"):
        check_estimator("folded", tune_beta=1.0, training_args=SimpleNamespace(deepspeed="ds_config.json"))
