"""How many CPU threads a job should use so that it does not oversubscribe a shared machine.

torch starts one OpenMP thread per core it sees.  In a container or under ``taskset`` that can
be more than the CPUs the process may actually use, and two such jobs on the same cores slow
each other down by an order of magnitude when their threads spin while they wait (libgomp's
default).  The recipes therefore set ``OMP_WAIT_POLICY=PASSIVE`` before torch loads (see
``recipes/runtime_env.py``) and size the thread pool here; the benchmark sizes it here too.

An explicit choice always wins: a thread count given by the caller (``--threads``), then
``OMP_NUM_THREADS``.  Otherwise the count is the number of CPUs this process may run on: its
affinity mask, capped by a cgroup CPU quota.  The load average is recorded, not acted on: beside
another two-thread torch job on two cores, two passively waiting threads ran a training step
faster than one thread did (recipes/README.md, "A busy CPU").
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

__all__ = ["choose_num_threads", "configure_threads", "usable_cpus"]

_CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


def _cgroup_cpu_quota() -> float | None:
    """CPUs' worth of time the cgroup may use (``cpu.max``), or None when unlimited/unknown."""
    try:
        quota, period = _CGROUP_V2.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us, period_us = (int(p.read_text()) for p in _CGROUP_V1)
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """CPUs this process may run on: the affinity mask, capped by a cgroup CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def choose_num_threads(explicit: int | None = None) -> tuple[int, str]:
    """``(threads, why)``: ``explicit`` if given, else ``OMP_NUM_THREADS``, else :func:`usable_cpus`."""
    if explicit:
        return int(explicit), "requested"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    return usable_cpus(), "usable CPUs (affinity mask and cgroup quota)"


def configure_threads(explicit: int | None = None) -> dict[str, Any]:
    """Set torch's intra-op thread count by :func:`choose_num_threads`; returns what was chosen
    and why, with the machine's load average, for the run record."""
    import torch

    threads, why = choose_num_threads(explicit)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Unix
        load = None
    return {
        "torch_threads": torch.get_num_threads(),
        "chosen_by": why,
        "usable_cpus": usable_cpus(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15min": load,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
