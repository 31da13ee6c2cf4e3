"""The Trainable Optimizer inside ``transformers.Trainer``: checkpoints, training-loop semantics, metrics, bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from hf_to import TrainableOptimizer
from hf_to.integrations.transformers import TrainableOptimizerCallback, optimizer_cls_and_kwargs

pytest.importorskip("transformers")
from hf_utils import TokenDataset, snapshot, tiny_llama, trainer, training_args
from transformers import TrainerCallback
from transformers.trainer_utils import SchedulerType


def _unwrap(optimizer: Any) -> TrainableOptimizer:
    while not isinstance(optimizer, TrainableOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _state_tensors(optimizer: TrainableOptimizer) -> list[torch.Tensor]:
    return [v.clone() for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


# -- checkpoints ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """An uninterrupted 6-step run (gradient accumulation 2) that checkpoints at step 3."""
    out = tmp_path_factory.mktemp("six_steps")
    args = training_args(out, max_steps=6, gradient_accumulation_steps=2, save_strategy="steps", save_steps=3)
    run = trainer(tiny_llama(), args)
    run.train()
    return run, out


def test_resume_from_step_3_continues_bit_identically(six_steps: tuple[Any, Path], tmp_path: Path) -> None:
    full, out = six_steps
    args = training_args(tmp_path, max_steps=6, gradient_accumulation_steps=2)
    resumed = trainer(tiny_llama(seed=123), args)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    assert resumed.state.global_step == 6
    expected = snapshot(full.model)
    for name, value in snapshot(resumed.model).items():
        assert torch.equal(value, expected[name]), name
    for a, b in zip(_state_tensors(_unwrap(resumed.optimizer)), _state_tensors(_unwrap(full.optimizer))):
        assert torch.equal(a, b)


def test_optimizer_checkpoint_loads_with_weights_only(six_steps: tuple[Any, Path]) -> None:
    _, out = six_steps
    state = torch.load(out / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert {g["algorithm"] for g in state["param_groups"]} == {"trainable_to"}
    assert all(float(s["step"]) == 3 for s in state["state"].values())


def test_fp32_state_of_bf16_parameters_stays_fp32_after_resume(tmp_path: Path) -> None:
    args = training_args(tmp_path / "a", max_steps=2, save_strategy="steps", save_steps=2)
    trainer(tiny_llama().to(torch.bfloat16), args).train()
    saved = torch.load(tmp_path / "a" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert {v.dtype for s in saved["state"].values() for k, v in s.items() if k != "step"} == {torch.float32}

    resumed = trainer(tiny_llama().to(torch.bfloat16), training_args(tmp_path / "b", max_steps=3))
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    optimizer = _unwrap(resumed.optimizer)
    assert {p.dtype for g in optimizer.param_groups for p in g["params"]} == {torch.bfloat16}
    dtypes = {v.dtype for s in optimizer.state.values() for k, v in s.items() if k != "step"}
    assert dtypes == {torch.float32}
    assert all(float(s["step"]) == 3 for s in optimizer.state.values())


def _checkpoint(tmp_path: Path, **kw: Any) -> Path:
    trainer(
        tiny_llama(), training_args(tmp_path / "first", max_steps=1, save_strategy="steps", save_steps=1, **kw)
    ).train()
    return tmp_path / "first" / "checkpoint-1"


def _assert_nothing_stepped(run: Any, out: Path) -> None:
    assert not _unwrap(run.optimizer).state  # no optimizer step ran
    assert not list(out.glob("checkpoint-*"))


def test_resuming_another_optimizers_checkpoint_raises(tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path, optim="adamw_torch")
    resumed = trainer(tiny_llama(), training_args(tmp_path / "second", max_steps=2))
    with pytest.raises(ValueError, match="not written by TrainableOptimizer"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    _assert_nothing_stepped(resumed, tmp_path / "second")


def test_resuming_another_estimators_checkpoint_raises(tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path, optim_args="estimator=diagonal")
    resumed = trainer(tiny_llama(), training_args(tmp_path / "second", max_steps=2, optim_args="estimator=rank_one"))
    with pytest.raises(ValueError, match=r"estimator='diagonal'.*estimator='rank_one'"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    _assert_nothing_stepped(resumed, tmp_path / "second")


# -- training-loop semantics ---------------------------------------------------------------


def test_gradient_accumulation_updates_the_estimator_once_per_optimizer_step(tmp_path: Path) -> None:
    common = dict(max_steps=3, max_grad_norm=0.0, optim_args="estimator=rank_one")
    accumulated = trainer(
        tiny_llama(),
        training_args(tmp_path / "a", per_device_train_batch_size=1, gradient_accumulation_steps=4, **common),
    )
    accumulated.train()
    batched = trainer(
        tiny_llama(),
        training_args(tmp_path / "b", per_device_train_batch_size=4, gradient_accumulation_steps=1, **common),
    )
    batched.train()
    assert all(float(s["step"]) == 3 for s in _unwrap(accumulated.optimizer).state.values())
    expected = snapshot(batched.model)
    for name, value in snapshot(accumulated.model).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_optimizer_sees_clipped_gradients(tmp_path: Path) -> None:
    max_norm = 1e-3
    run = trainer(tiny_llama(), training_args(tmp_path, max_steps=3, max_grad_norm=max_norm))
    run.train()
    logs = [h for h in run.state.log_history if "loss" in h]
    assert len(logs) == 3
    for log in logs:
        assert log["grad_norm"] > 100 * max_norm  # the norm before clipping
        assert log["to/grad_sq"] == pytest.approx(max_norm**2, rel=1e-3)  # what the optimizer received


SCHEDULER_KWARGS: dict[str, dict[str, Any]] = {
    "cosine_with_min_lr": {"min_lr": 1e-5},
    "cosine_warmup_with_min_lr": {"min_lr": 1e-5},
    "warmup_stable_decay": {"num_decay_steps": 2},
}
#: Schedulers stepped with an evaluation metric (they require an eval strategy).
METRIC_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")


@pytest.mark.parametrize("scheduler", [s.value for s in SchedulerType])
def test_every_transformers_lr_scheduler_drives_the_optimizer(tmp_path: Path, scheduler: str) -> None:
    by_metric = scheduler in METRIC_SCHEDULERS
    args = training_args(
        tmp_path,
        lr_scheduler_type=scheduler,
        lr_scheduler_kwargs=SCHEDULER_KWARGS.get(scheduler, {}),
        warmup_steps=2,
        max_steps=6,
        **({"eval_strategy": "steps", "eval_steps": 1} if by_metric else {}),
    )
    run = trainer(tiny_llama(), args, eval_dataset=TokenDataset(n=2) if by_metric else None)
    run.create_optimizer_and_scheduler(num_training_steps=6)
    optimizer, schedule = run.optimizer, run.lr_scheduler
    assert isinstance(optimizer, TrainableOptimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for step in range(6):
        for p in params:
            p.grad = torch.full_like(p, 0.01)
        before = params[0].detach().clone()
        optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        assert torch.equal(before, params[0]) == (lr == 0)
        if by_metric:
            schedule.step(1.0 / (step + 1))
        else:
            schedule.step()
            assert optimizer.param_groups[0]["lr"] == schedule.get_last_lr()[0]
    assert all(float(s["step"]) == 6 for s in optimizer.state.values())


class _Overflow(TrainerCallback):
    """Makes the second optimizer step overflow under a GradScaler; records what the Trainer saw."""

    def __init__(self, run: Any, scaler: torch.amp.GradScaler) -> None:
        self.run, self.scaler = run, scaler
        self.skipped: list[bool] = []
        self.states: list[list[torch.Tensor]] = []
        self.weights: list[dict[str, torch.Tensor]] = []
        self.scheduler_steps: list[int] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == 1:
            self.scaler.update(2.0**127)  # the scaled loss is inf: every gradient overflows

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.skipped.append(self.run.accelerator.optimizer_step_was_skipped)
        self.states.append(_state_tensors(_unwrap(self.run.optimizer)))
        self.weights.append(snapshot(self.run.model))
        self.scheduler_steps.append(self.run.lr_scheduler.last_epoch)


def test_an_fp16_grad_scaler_overflow_skips_the_step_and_the_trainer_sees_it(tmp_path: Path) -> None:
    # accelerate creates no GradScaler on the CPU (fp16 autocast there is unscaled), so the
    # Trainer gets torch's CPU GradScaler by hand: the same accelerate code path as on a GPU.
    run = trainer(tiny_llama(), training_args(tmp_path, max_steps=3, max_grad_norm=0.0))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, backoff_factor=2.0**-120)
    run.accelerator.scaler = scaler
    probe = _Overflow(run, scaler)
    run.add_callback(probe)
    run.train()
    assert probe.skipped == [False, True, False]
    assert all(torch.equal(a, b) for a, b in zip(probe.states[1], probe.states[0]))
    assert all(torch.equal(probe.weights[1][n], w) for n, w in probe.weights[0].items())
    assert probe.scheduler_steps == [1, 1, 2]
    assert all(float(s["step"]) == 2 for s in _unwrap(run.optimizer).state.values())
    assert not all(torch.equal(probe.weights[2][n], w) for n, w in probe.weights[1].items())


# -- metrics -------------------------------------------------------------------------------


def test_estimator_metrics_appear_in_the_log_history(tmp_path: Path) -> None:
    run = trainer(tiny_llama(), training_args(tmp_path, max_steps=3))
    assert any(isinstance(c, TrainableOptimizerCallback) for c in run.callback_handler.callbacks)
    run.train()
    logs = [h for h in run.state.log_history if "loss" in h]
    assert len(logs) == 3
    for log in logs:
        assert {"to/relative_residual", "to/residual_sq", "to/grad_sq", "to/estimate_sq", "to/skipped"} <= set(log)
        assert log["to/steps"] == 1 and log["to/skipped"] == 0 and log["to/grad_sq"] > 0


def test_a_tuned_beta_is_logged_and_moves(tmp_path: Path) -> None:
    """``--optim_args tune_beta=...`` reaches the optimizer; ``to/beta`` is logged only then."""
    run = trainer(tiny_llama(), training_args(tmp_path, max_steps=4, optim_args="tune_beta=5.0"))
    run.train()
    betas = [h["to/beta"] for h in run.state.log_history if "loss" in h]
    assert len(betas) == 4 and len(set(betas)) > 1 and all(0.02 <= b <= 0.6 for b in betas)
    assert _unwrap(run.optimizer).param_groups[0]["tune_beta"] == 5.0
    plain = trainer(tiny_llama(), training_args(tmp_path / "plain", max_steps=1))
    plain.train()
    assert not any("to/beta" in h for h in plain.state.log_history)


def test_diagnostics_false_switches_the_metrics_off(tmp_path: Path) -> None:
    run = trainer(tiny_llama(), training_args(tmp_path, max_steps=2, optim_args="diagnostics=false"))
    run.train()
    assert not any(k.startswith("to/") for h in run.state.log_history for k in h)


def test_removing_the_callback_switches_the_metrics_off(tmp_path: Path) -> None:
    run = trainer(tiny_llama(), training_args(tmp_path, max_steps=2))
    run.remove_callback(TrainableOptimizerCallback)
    run.train()
    assert not any(k.startswith("to/") for h in run.state.log_history for k in h)


def test_the_callback_is_inert_for_other_optimizers(tmp_path: Path) -> None:
    run = trainer(tiny_llama(), training_args(tmp_path, max_steps=2, optim="adamw_torch"))
    run.train()
    assert not any(k.startswith("to/") for h in run.state.log_history for k in h)


# -- paths without the name ----------------------------------------------------------------


def test_optimizer_cls_and_kwargs_builds_to_with_the_trainers_groups(tmp_path: Path) -> None:
    args = training_args(tmp_path, optim="adamw_torch", max_steps=2, weight_decay=0.1, learning_rate=5e-4)
    run = trainer(tiny_llama(), args, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args, estimator="rank_one"))
    run.train()
    optimizer = _unwrap(run.optimizer)
    assert [g["estimator"] for g in optimizer.param_groups] == ["rank_one", "rank_one"]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    decay_names = set(run.get_decay_parameter_names(run.model))
    names = {id(p): n for n, p in run.model.named_parameters()}
    assert {names[id(p)] for p in optimizer.param_groups[0]["params"]} == decay_names
    assert any(k.startswith("to/") for h in run.state.log_history for k in h)


# -- bad input -----------------------------------------------------------------------------


def test_a_full_estimator_on_a_large_matrix_fails_before_the_first_step(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = trainer(tiny_llama(), training_args(out, max_steps=3, optim_args="estimator=full"))
    before = snapshot(run.model)
    with pytest.raises(ValueError, match=r"estimator='full' on a parameter of shape \(256, 64\)"):
        run.train()
    assert run.state.global_step == 0
    assert all(torch.equal(v, before[n]) for n, v in snapshot(run.model).items())
    assert not out.exists() or not any(out.iterdir())
