"""hf_to.threads: the thread count a CPU job uses, chosen so that it does not oversubscribe."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from hf_to import threads


def test_an_explicit_count_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose_num_threads(5) == (5, "requested")


def test_omp_num_threads_wins_over_the_cpu_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.choose_num_threads() == (1, "OMP_NUM_THREADS")


def test_without_a_choice_the_count_is_the_cpus_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    count, why = threads.choose_num_threads()
    assert count == threads.usable_cpus() and "usable CPUs" in why
    if hasattr(os, "sched_getaffinity"):
        assert 1 <= count <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize(("cpu_max", "cap"), [("150000 100000", 2), ("50000 100000", 1), ("max 100000", None)])
def test_a_cgroup_cpu_quota_caps_the_count(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cpu_max: str, cap: int | None
) -> None:
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max + "\n")
    monkeypatch.setattr(threads, "_CGROUP_V2", path)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert threads.usable_cpus() == (8 if cap is None else cap)


def test_configure_threads_sets_torch_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        record = threads.configure_threads(1)
        assert torch.get_num_threads() == 1
        assert record["torch_threads"] == 1 and record["chosen_by"] == "requested"
        assert set(record) >= {"usable_cpus", "load_average_1_5_15min", "omp_wait_policy"}
    finally:
        torch.set_num_threads(before)
