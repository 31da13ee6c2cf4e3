r"""Stochastic rounding of bfloat16 state, shared by every path that stores it.

With ``state_dtype=torch.bfloat16`` the step computes in float32 and stores each state tensor
with **stochastic rounding**: a pseudo-random integer in ``[0, 2**16)`` is added to the float32
bit pattern and the low 16 bits are dropped, so a value rounds up or down with probability
proportional to its distance and updates smaller than one bfloat16 ulp survive on average
(the expected stored value equals the float32 value).  The 16 bits are a hash of the element's
index, the step and the state tensor (``salt``), so no RNG state is consumed, runs are
reproducible, and the C kernel (``native.c``), the Triton kernels (:mod:`hf_to.gpu`) and the
readable path (:func:`with_float32_state`) draw the same noise.  Parameters themselves are
stored with round-to-nearest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["SALTS", "stochastic_round_", "with_float32_state"]

_M32 = 0xFFFFFFFF

#: Seed salt of each state tensor (the same in native.c and hf_to/gpu.py).
SALTS = {"b": 1, "a": 2, "u": 3, "v": 4, "exp_avg_sq": 5, "w_bar": 6}


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mixer (int64 arithmetic, no overflow); vectorises where RNG calls do not."""
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def _seed(step: Tensor | int, salt: int) -> Tensor | int:
    """Rounding seed of one state tensor at one step (``step``: the count before the step)."""
    if isinstance(step, Tensor):
        step = step.to(torch.int64)
    return (step * 0x9E3779B1 + salt * 0x7F4A7C15) & _M32


def _round_bf16(x: Tensor, seed: Tensor | int) -> Tensor:
    """float32 ``x`` rounded stochastically to bfloat16 (unbiased: E[result] = x)."""
    bits = x.view(torch.int32)
    idx = torch.arange(x.numel(), device=x.device, dtype=torch.int64).view(x.shape)
    noise = (_hash32((idx + seed) & _M32) & 0xFFFF).to(torch.int32)
    # Adding to the bit pattern moves away from zero for either sign; the mask truncates.
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def stochastic_round_(dst: Tensor, x: Tensor, seed: int | None = None) -> Tensor:
    """Copy float32 ``x`` into bfloat16 ``dst`` with stochastic rounding; return ``dst``.

    ``seed`` (default: drawn from torch's generator) selects the rounding pattern.
    """
    if seed is None:
        seed = int(torch.randint(0, 2**31, ()))
    dst.copy_(_round_bf16(x.float().contiguous(), seed))
    return dst


def with_float32_state(step_fn: Callable[..., Any], states: list[dict[str, Tensor]], **kwargs: Any) -> Any:
    """Run a step written for float32 state on bfloat16 state: float32 working copies in,
    stochastic rounding out (``step_fn(states=...)``; its ``step`` tensors are the real ones).

    The readable path's way to bfloat16 state: it costs a float32 copy of the group's state
    for the step, which the fast paths (C and Triton kernels) avoid by rounding on store.
    Entries a step leaves alone (skipped tensors, masked non-finite entries) are exact
    bfloat16 values and round back to themselves, bit for bit.
    """
    from .distributed import local_view  # (sharded state: the local shards)

    before = [int(s["step"]) for s in states]
    work = [{k: v if k == "step" else local_view(v).float() for k, v in s.items()} for s in states]
    out = step_fn(states=work, **kwargs)
    for state, copy, step in zip(states, work, before):
        for key, value in copy.items():
            if key != "step":
                dst = local_view(state[key])
                dst.copy_(_round_bf16(value.contiguous(), _seed(step, SALTS[key])).view_as(dst))
    return out
