"""Environment switches shared by the step's paths."""

from __future__ import annotations

import os

__all__ = ["env_switch"]

_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_switch(name: str) -> bool:
    """An on/off environment variable, on when unset; a value that is neither raises."""
    value = os.environ.get(name, "1").strip().lower()
    if value not in _ON + _OFF:
        raise ValueError(f"{name}={os.environ[name]!r}: expected one of {_OFF} (off) or {_ON} (on)")
    return value in _ON
