"""Settings shared by the step's paths: environment switches and the accepted state dtypes."""

from __future__ import annotations

import os

import torch

__all__ = ["FAST_ESTIMATORS", "STATE_DTYPES", "env_switch"]

#: Estimators with a multi-tensor kernel (the CPU's C kernel, the GPU's Triton kernels) and
#: bfloat16 state; ``full`` is matrix-vector bound and keeps the readable path.
FAST_ESTIMATORS = ("diagonal", "rank_one", "none")

#: Accepted ``state_dtype`` values (``None``: float32, float64 for float64 parameters).
STATE_DTYPES = (None, torch.float32, torch.bfloat16)

_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_switch(name: str) -> bool:
    """An on/off environment variable, on when unset; a value that is neither raises."""
    value = os.environ.get(name, "1").strip().lower()
    if value not in _ON + _OFF:
        raise ValueError(f"{name}={os.environ[name]!r}: expected one of {_OFF} (off) or {_ON} (on)")
    return value in _ON
