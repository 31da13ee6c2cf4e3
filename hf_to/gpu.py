r"""The multi-tensor GPU step: two Triton launches per param group, whatever its tensor count.

This is the step of CUDA parameters (plain or FSDP2 shards); it is the GPU twin of the CPU's C
kernel (:mod:`hf_to.native`) and pinned to the paper-literal reference (:mod:`hf_to.reference`)
by ``tests/test_gpu_step.py``, which runs these kernels on a CPU in Triton's interpreter.

*Why Triton over pointer tables.*  A LoRA group holds hundreds of small tensors; a kernel (or
a ``torch.compile``\ d graph) per tensor costs a launch and Python per tensor, which fused
AdamW avoids with ``multi_tensor_apply`` (about ceil(n/36) launches).  Here a param group is
described by a table of addresses (one row per tensor: ``w``, ``g``, ``b``, the slope state,
``exp_avg_sq``, ``step``, ``n``) and a table of *chunks* (tensor, index) of :data:`CHUNK`
elements; every launch has one program per chunk, so any number of tensors of any size is
two launches:

1. ``_partials``: per chunk, the non-finite gradient count and the partial sums the estimator
   needs before it writes (``Estimator.stat_names``: wᵀw; rank-one's vᵀw, uᵀu, uᵀb, uᵀg);
2. ``_update``: each program first adds up the partial rows of its tensor's chunks (the
   segmented reduction, in a fixed order, so every chunk of a tensor sees the same bits and a
   run is deterministic), decides the tensor's action (step / mask non-finite entries / skip,
   :func:`hf_to.forms.nonfinite_action`), and does the residual, the estimator step, the
   estimate, the Adam preconditioner and the weight update in one pass: it reads ``w``, ``g``
   and the ``k`` state tensors once and writes ``w`` and the ``k`` states once.  The program of
   a tensor's first chunk advances its ``step``.

Sharded (FSDP2) groups add a third launch, ``_rows``, that writes the per-tensor sums so that
``reduce_stats`` can sum them over the shard group in one collective before ``_update``.

*CUDA graphs.*  Nothing in the step reads a device value on the host or branches on one in
Python: the step count, the warm-up intercept rate, the bias correction, the first-step
seeding and the non-finite verdict are computed inside the kernels from the ``step`` tensors,
which live on the parameter's device for this path (as fused AdamW's do).  The tables are
uploaded when a group's tensors (addresses, sizes) change and cached under that key, so after
a warm-up step the launches reuse the same device buffers: the step can be captured in a CUDA
graph.  A ``lr`` given as a tensor is read from the device; a float ``lr`` is a kernel argument
(as in ``torch.optim.Adam(capturable=True)``, a captured float is replayed as captured).

*Forms.*  Each form's per-element step is the plain arithmetic function of :mod:`hf_to.forms`
(``diagonal_step``, ``rank_one_step``, ``none_step``, ``folded_step``), compiled here as a device function: the
readable path runs the same function on whole tensors.  A form with a Triton step also has
a code in :data:`_CODES` and a branch in ``_partials_tile`` (which sums it needs) and
``_update_tile`` (which state it loads and stores).

*Tuning* (not done: nothing has run on a GPU yet): :data:`CHUNK`, :data:`BLOCK`, ``num_warps``;
full tiles load and store without masks, with 16-byte vectors when every address of a bucket
is 16-byte aligned.

*bfloat16 state* is computed in float32 and stored with the stochastic rounding of
:mod:`hf_to.rounding` (the same hash of the element index, the step and the state tensor, so
the rounding noise equals the other paths'); parameters are stored with round-to-nearest.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from itertools import chain
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import forms
from .config import StepConfig
from .distributed import is_dtensor, local_view
from .forms import Form

__all__ = ["BLOCK", "CHUNK", "INTERPRETED", "launches", "misfit", "triton_trainable_to"]

#: Whether these kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` when imported).
INTERPRETED = bool(triton.knobs.runtime.interpret)

#: Elements per program (one chunk); a tensor of n elements has max(1, ceil(n / CHUNK)) chunks.
CHUNK = 1 << 16
#: Elements per tile (the vector width of one loop iteration).
BLOCK = 1024

# The forms with a Triton step -> kernel code (the ``EST`` constant of the kernels).  A form's
# sums per tensor are column 0, the non-finite count, then its ``stat_names``; its slope-state
# tensors are the table's s1, s2 columns.
_CODES = {"diagonal": 0, "rank_one": 1, "none": 2, "folded": 3}
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# Columns of the tensor table.
_W, _G, _B, _S1, _S2, _V2, _STEP, _N, _FIRST, _NCH, _ROW = range(11)
_COLS = 11

# -- device helpers ------------------------------------------------------------------------

# Device functions: ``triton.jit`` (inlined into the kernels) on a GPU; in Triton's interpreter
# plain Python functions, since there every call of a jitted device function re-patches
# ``triton.language`` (milliseconds per call), while a plain function runs the same code.
_device_fn = (lambda fn: fn) if triton.knobs.runtime.interpret else triton.jit
# ``tl.sum`` is such a jitted function: interpreted, call the function it wraps.
_sum = getattr(tl.sum, "fn", tl.sum) if triton.knobs.runtime.interpret else tl.sum


@_device_fn
def _ptr(addr, CODE: tl.constexpr, ALIGNED: tl.constexpr):
    """The address ``addr`` (int64, from a table) as a pointer to float32/bfloat16/float16;
    ``ALIGNED``: every address of the launch is a multiple of 16 bytes (checked on the host),
    so that full tiles load and store with 16-byte vectors."""
    if CODE == 0:
        p = addr.to(tl.pointer_type(tl.float32))
    elif CODE == 1:
        p = addr.to(tl.pointer_type(tl.bfloat16))
    else:
        p = addr.to(tl.pointer_type(tl.float16))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@_device_fn
def _load(ptr, idx, m, MASKED: tl.constexpr):
    """``ptr[idx]`` in float32; a full tile (``MASKED`` false) loads without a mask."""
    if MASKED:
        x = tl.load(ptr + idx, mask=m, other=0.0)
    else:
        x = tl.load(ptr + idx)
    return x.to(tl.float32)


@_device_fn
def _put(ptr, idx, x, m, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + idx, x, mask=m)
    else:
        tl.store(ptr + idx, x)


@_device_fn
def _expm1(y):
    """e^y - 1 for y <= 0 in float32 without cancellation (Kahan: (u - 1) y / log u, u = e^y)."""
    u = tl.exp(y)
    return tl.where(u == 1.0, y, tl.where(u < 0.5, u - 1.0, (u - 1.0) * y / tl.log(u)))


@_device_fn
def _hash32(x):
    """The 32-bit mixer of hf_to.rounding (uint32 arithmetic wraps, as its & 0xFFFFFFFF does)."""
    c = tl.full([], 0x45D9F3B, tl.uint32)
    x = x ^ (x >> 16)
    x = x * c
    x = x ^ (x >> 16)
    x = x * c
    return x ^ (x >> 16)


@_device_fn
def _store_state(ptr, idx, x, m, step_i64, SALT: tl.constexpr, CODE: tl.constexpr, MASKED: tl.constexpr):
    """Store float32 ``x``; bfloat16 state with the stochastic rounding of hf_to.rounding (its
    seed: the step before this one and the state tensor's ``SALT``).  An exact bfloat16 value
    (an entry kept as it was) rounds to itself."""
    if CODE == 1:
        seed = (step_i64 * 0x9E3779B1 + SALT * 0x7F4A7C15) & 0xFFFFFFFF
        h = _hash32(((idx + seed) & 0xFFFFFFFF).to(tl.uint32))
        noise = (h & 0xFFFF).to(tl.int32)
        bits = x.to(tl.int32, bitcast=True)
        x = ((bits + noise) & -65536).to(tl.float32, bitcast=True)
        _put(ptr, idx, x.to(tl.bfloat16), m, MASKED)
    else:
        _put(ptr, idx, x, m, MASKED)


@_device_fn
def _store_param(ptr, idx, x, m, CODE: tl.constexpr, MASKED: tl.constexpr):
    """Store float32 ``x`` with round-to-nearest-even (bfloat16 rounded explicitly: Triton's
    interpreter truncates in that cast, the GPU rounds; this way both round alike)."""
    if CODE == 1:
        bits = x.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        x = tl.where(x == x, rounded.to(tl.float32, bitcast=True), x)
        _put(ptr, idx, x.to(tl.bfloat16), m, MASKED)
    else:
        _put(ptr, idx, x.to(ptr.dtype.element_ty), m, MASKED)


# -- the forms: partial sums and the elementwise step of one tile --------------------------
# A new structure of A is one more block here (its sums, its step) and one more branch in
# _partials_tile / _update_tile.


@_device_fn
def _sums_rank_one(w, g, b, u, v):
    return w * w, v * w, u * u, u * b, u * g


# The forms' per-element steps (hf_to.forms), compiled as device functions.
_step_diagonal = _device_fn(forms.diagonal_step)
_step_rank_one = _device_fn(forms.rank_one_step)
_step_none = _device_fn(forms.none_step)
_step_folded = _device_fn(forms.folded_step)


# -- kernels -------------------------------------------------------------------------------


@_device_fn
def _partials_tile(
    wp, gp, bp, up, vp, off, end, s0, s1, s2, s3, s4, s5,
    EST: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    idx = off + tl.arange(0, BLOCK_).to(tl.int64)
    m = idx < end
    g = _load(gp, idx, m, MASKED)
    bad = ~(tl.abs(g) < float("inf"))
    if MASKED:
        bad = bad & m
    s0 += tl.where(bad, 1.0, 0.0)
    if EST == 1:
        w = _load(wp, idx, m, MASKED)
        b = _load(bp, idx, m, MASKED)
        u = _load(up, idx, m, MASKED)
        v = _load(vp, idx, m, MASKED)
        ww, vw, uu, ub, ug = _sums_rank_one(w, g, b, u, v)
        s1 += ww
        s2 += vw
        s3 += uu
        s4 += ub
        s5 += ug
    elif EST == 0 or EST == 3:
        if NORMALIZE:
            w = _load(wp, idx, m, MASKED)
            s1 += w * w
    return s0, s1, s2, s3, s4, s5


@triton.jit
def _partials(
    TAB, CHUNKS, P, STEPS, EST: tl.constexpr, K: tl.constexpr, NORMALIZE: tl.constexpr, PD: tl.constexpr,
    GD: tl.constexpr, SD: tl.constexpr, ALIGNED: tl.constexpr, CHUNK_: tl.constexpr, BLOCK_: tl.constexpr,
):  # fmt: skip
    """Per chunk: [non-finite count of g, *partial sums of Estimator.stat_names] into P[chunk];
    per tensor (its first chunk): the step count before this step into STEPS (``_update`` reads
    it there, since its first chunk's program advances the count while the others run)."""
    c = tl.program_id(0)
    t = tl.load(CHUNKS + 2 * c)
    j = tl.load(CHUNKS + 2 * c + 1)
    row = TAB + t * 11
    if j == 0:
        tl.store(STEPS + t, tl.load(tl.load(row + 6).to(tl.pointer_type(tl.float32))))
    n = tl.load(row + 7)
    start = j * CHUNK_
    end = tl.minimum(start + CHUNK_, n)
    full = start + (end - start) // BLOCK_ * BLOCK_
    wp = _ptr(tl.load(row + 0), PD, ALIGNED)
    gp = _ptr(tl.load(row + 1), GD, ALIGNED)
    bp = _ptr(tl.load(row + 2), SD, ALIGNED)
    up = _ptr(tl.load(row + 3), SD, ALIGNED)
    vp = _ptr(tl.load(row + 4), SD, ALIGNED)
    s0 = tl.full([BLOCK_], 0.0, tl.float32)
    s1 = tl.full([BLOCK_], 0.0, tl.float32)
    s2 = tl.full([BLOCK_], 0.0, tl.float32)
    s3 = tl.full([BLOCK_], 0.0, tl.float32)
    s4 = tl.full([BLOCK_], 0.0, tl.float32)
    s5 = tl.full([BLOCK_], 0.0, tl.float32)
    for off in range(start, full, BLOCK_):  # full tiles: no mask
        s0, s1, s2, s3, s4, s5 = _partials_tile(
            wp, gp, bp, up, vp, tl.multiple_of(off, BLOCK_), end, s0, s1, s2, s3, s4, s5, EST, NORMALIZE, BLOCK_, False
        )
    if full < end:  # the tail
        s0, s1, s2, s3, s4, s5 = _partials_tile(
            wp, gp, bp, up, vp, full, end, s0, s1, s2, s3, s4, s5, EST, NORMALIZE, BLOCK_, True
        )
    out = P + c * K
    tl.store(out, _sum(s0, 0))
    if K > 1:
        tl.store(out + 1, _sum(s1, 0))
    if K > 2:
        tl.store(out + 2, _sum(s2, 0))
        tl.store(out + 3, _sum(s3, 0))
        tl.store(out + 4, _sum(s4, 0))
        tl.store(out + 5, _sum(s5, 0))


@_device_fn
def _tensor_sums(TAB, P, t, K: tl.constexpr, KP: tl.constexpr, RB: tl.constexpr):
    """The tensor's sums: its chunks' partial rows added in a fixed order (a KP-vector)."""
    row = TAB + t * 11
    first = tl.load(row + 8)
    nch = tl.load(row + 9)
    cols = tl.arange(0, KP)
    acc = tl.full([RB, KP], 0.0, tl.float32)
    for q in range(0, nch, RB):
        rows = first + q + tl.arange(0, RB).to(tl.int64)
        m = (rows[:, None] < first + nch) & (cols[None, :] < K)
        acc += tl.load(P + rows[:, None] * K + cols[None, :], mask=m, other=0.0)
    return _sum(acc, 0)


@_device_fn
def _pick(vec, cols, k: tl.constexpr):
    return _sum(tl.where(cols == k, vec, 0.0), 0)


@triton.jit
def _rows(TAB, P, R, K: tl.constexpr, KP: tl.constexpr, RB: tl.constexpr):
    """Sharded groups: per tensor, its sums into R[row] (then summed over the shard group)."""
    t = tl.program_id(0)
    sums = _tensor_sums(TAB, P, t, K, KP, RB)
    cols = tl.arange(0, KP)
    r = tl.load(TAB + t * 11 + 10)
    tl.store(R + r * K + cols, sums, mask=cols < K)


@_device_fn
def _update_tile(
    wp, gp, bp, s1p, s2p, v2p, off, end, d_rr, d_gg, d_hh,
    live, first, seeding, step_i64, nf, ww, vw, uu, ub, ug, inv_norm, v_fill,
    lr, decay, alpha, floor, beta_t, beta2, one_minus_beta2, bc2, eps, la,
    EST: tl.constexpr, NORMALIZE: tl.constexpr, ADAM: tl.constexpr, DIAGNOSTICS: tl.constexpr,
    PD: tl.constexpr, SD: tl.constexpr, BLOCK_: tl.constexpr, MASKED: tl.constexpr, NESTEROV: tl.constexpr,
):  # fmt: skip
    """One tile of the step.  Entries not stepped (a non-finite gradient entry of folded/diagonal/none,
    every entry of a skipped tensor) are written back as they were, bit for bit, so that full
    tiles store without a mask (16-byte vectors)."""
    idx = off + tl.arange(0, BLOCK_).to(tl.int64)
    m = idx < end
    w = _load(wp, idx, m, MASKED)
    g = _load(gp, idx, m, MASKED)
    b = _load(bp, idx, m, MASKED)
    if EST == 1:
        ok = tl.where(live, m, False)
        gz = g
    else:  # non-finite entries step with g = 0 and are kept
        ok = tl.where(live, m & (tl.abs(g) < float("inf")), False)
        gz = tl.where(ok, g, 0.0)
    if EST == 0:
        a = _load(s1p, idx, m, MASKED)
        r, a_new, _, b_new, g_hat = _step_diagonal(
            w, gz, b, a, a, ww, vw, uu, ub, ug, nf, alpha, floor, beta_t, NORMALIZE
        )
        a_new = tl.where(seeding, a, a_new)
    elif EST == 1:
        u = _load(s1p, idx, m, MASKED)
        v = _load(s2p, idx, m, MASKED)
        v_first = tl.where(first, w * inv_norm + v_fill, v)
        r, u_new, v_new, b_new, g_hat = _step_rank_one(
            w, gz, b, u, v_first, ww, vw, uu, ub, ug, nf, alpha, floor, beta_t, NORMALIZE
        )
        u_new = tl.where(seeding, u, u_new)
        v_new = tl.where(seeding, v_first, v_new)
    elif EST == 3:
        r, _, _, b_new, g_hat = _step_folded(w, gz, b, b, b, ww, vw, uu, ub, ug, nf, alpha, floor, beta_t, NORMALIZE)
    else:
        r, _, _, b_new, g_hat = _step_none(w, gz, b, b, b, ww, vw, uu, ub, ug, nf, alpha, floor, beta_t, NORMALIZE)
    b_new = tl.where(seeding, gz, b_new)
    g_hat = tl.where(seeding, gz, g_hat)
    if DIAGNOSTICS:
        r = tl.where(ok, tl.where(seeding, 0.0, r), 0.0)
        d_rr += r * r
        d_gg += tl.where(ok, gz * gz, 0.0)
        h = tl.where(ok, g_hat, 0.0)
        d_hh += h * h
    d = g_hat
    if NESTEROV:  # one more intercept step on the same gradient (la = beta_t), or a fixed weight
        d = g_hat + la * (gz - g_hat)
    if ADAM:
        v2 = _load(v2p, idx, m, MASKED)
        v2_new = v2 * beta2 + one_minus_beta2 * gz * gz
        d = d / (tl.sqrt(v2_new / bc2) + eps)
        _store_state(v2p, idx, tl.where(ok, v2_new, v2), m, step_i64, 5, SD, MASKED)
    w_new = w * decay - lr * d
    _store_param(wp, idx, tl.where(ok, w_new, w), m, PD, MASKED)
    # (salts of hf_to.rounding.SALTS: b 1, a 2, u 3, v 4, exp_avg_sq 5)
    _store_state(bp, idx, tl.where(ok, b_new, b), m, step_i64, 1, SD, MASKED)
    if EST == 0:
        _store_state(s1p, idx, tl.where(ok, a_new, a), m, step_i64, 2, SD, MASKED)
    elif EST == 1:
        _store_state(s1p, idx, tl.where(ok, u_new, u), m, step_i64, 3, SD, MASKED)
        _store_state(s2p, idx, tl.where(ok, v_new, v), m, step_i64, 4, SD, MASKED)
    return d_rr, d_gg, d_hh


@triton.jit
def _update(
    TAB, CHUNKS, P, STEPS, R, D, ACT, LR, lr_value, decay_value, weight_decay, alpha, beta, beta2,
    one_minus_beta2, log_beta2, eps, floor, log1m_beta, lookahead, EST: tl.constexpr, K: tl.constexpr,
    KP: tl.constexpr,
    RB: tl.constexpr, ROWS_GIVEN: tl.constexpr, LR_TENSOR: tl.constexpr, NORMALIZE: tl.constexpr,
    ADAM: tl.constexpr, WARMUP: tl.constexpr, SEED_INTERCEPT: tl.constexpr, DIAGNOSTICS: tl.constexpr,
    NESTEROV: tl.constexpr, PD: tl.constexpr, GD: tl.constexpr, SD: tl.constexpr, ALIGNED: tl.constexpr,
    CHUNK_: tl.constexpr, BLOCK_: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0)
    t = tl.load(CHUNKS + 2 * c)
    j = tl.load(CHUNKS + 2 * c + 1)
    row = TAB + t * 11
    n = tl.load(row + 7)
    nf = n.to(tl.float32)
    start = j * CHUNK_
    end = tl.minimum(start + CHUNK_, n)
    full = start + (end - start) // BLOCK_ * BLOCK_

    # The tensor's sums and its action.
    cols = tl.arange(0, KP)
    if ROWS_GIVEN:
        sums = tl.load(R + tl.load(row + 10) * K + cols, mask=cols < K, other=0.0)
    else:
        sums = _tensor_sums(TAB, P, t, K, KP, RB)
    count = _pick(sums, cols, 0)
    if EST == 1:  # rank-one couples all coordinates: any non-finite entry skips the tensor
        live = count == 0
    else:  # coordinate-wise: skipped only when every entry is non-finite
        live = (count == 0) | (count < nf)
    step_ptr = tl.load(row + 6).to(tl.pointer_type(tl.float32))
    step0 = tl.load(STEPS + t)
    step_i64 = step0.to(tl.int64)
    t1 = step0 + 1.0
    first = step0 == 0.0
    if SEED_INTERCEPT:  # b_0 = g_0: r_0 = 0 and the slope stays at A_0 = 0
        seeding = first
    else:
        seeding = step0 < 0.0
    if WARMUP == 1:  # running mean, then EMA: max(beta, 1/t)
        beta_t = tl.maximum(beta, 1.0 / t1)
    elif WARMUP == 2:  # "adam": beta / (1 - (1 - beta)^t), log(1 - beta) from the host
        beta_t = beta / -_expm1(t1 * log1m_beta)
    else:
        beta_t = beta + 0.0 * t1
    la = tl.where(lookahead < 0.0, beta_t, lookahead)  # the look-ahead weight
    if LR_TENSOR:
        lr = tl.load(LR).to(tl.float32)
        decay = 1.0 - lr * weight_decay
    else:
        lr = lr_value
        decay = decay_value
    bc2 = t1
    if ADAM:
        # 1 - beta2^t = -expm1(t log beta2) in float32 without cancellation (Kahan's
        # expm1(y) = (u - 1) y / log(u), u = e^y; no float64, no libdevice), log beta2 from the host.
        bc2 = -_expm1(t1 * log_beta2)
    ww = _pick(sums, cols, 1)
    vw = _pick(sums, cols, 2)
    uu = _pick(sums, cols, 3)
    ub = _pick(sums, cols, 4)
    ug = _pick(sums, cols, 5)
    inv_norm = ww
    v_fill = ww
    if EST == 1:
        # First step: v_0 = w_0/‖w_0‖ (1/√n when w_0 = 0), so v_0ᵀw_0 = ‖w_0‖.
        norm = tl.sqrt(ww)
        inv_norm = tl.where(norm > 0, 1.0 / tl.maximum(norm, 1e-30), 0.0)
        v_fill = tl.where(norm > 0, 0.0, 1.0 / tl.sqrt(tl.maximum(nf, 1.0)))
        vw = tl.where(first, norm, vw)

    wp = _ptr(tl.load(row + 0), PD, ALIGNED)
    gp = _ptr(tl.load(row + 1), GD, ALIGNED)
    bp = _ptr(tl.load(row + 2), SD, ALIGNED)
    s1p = _ptr(tl.load(row + 3), SD, ALIGNED)
    s2p = _ptr(tl.load(row + 4), SD, ALIGNED)
    v2p = _ptr(tl.load(row + 5), SD, ALIGNED)
    d_rr = tl.full([BLOCK_], 0.0, tl.float32)
    d_gg = tl.full([BLOCK_], 0.0, tl.float32)
    d_hh = tl.full([BLOCK_], 0.0, tl.float32)
    for off in range(start, full, BLOCK_):  # full tiles: no mask
        d_rr, d_gg, d_hh = _update_tile(
            wp, gp, bp, s1p, s2p, v2p, tl.multiple_of(off, BLOCK_), end, d_rr, d_gg, d_hh,
            live, first, seeding, step_i64, nf, ww, vw, uu, ub, ug, inv_norm, v_fill,
            lr, decay, alpha, floor, beta_t, beta2, one_minus_beta2, bc2, eps, la,
            EST, NORMALIZE, ADAM, DIAGNOSTICS, PD, SD, BLOCK_, False, NESTEROV,
        )  # fmt: skip
    if full < end:  # the tail
        d_rr, d_gg, d_hh = _update_tile(
            wp, gp, bp, s1p, s2p, v2p, full, end, d_rr, d_gg, d_hh,
            live, first, seeding, step_i64, nf, ww, vw, uu, ub, ug, inv_norm, v_fill,
            lr, decay, alpha, floor, beta_t, beta2, one_minus_beta2, bc2, eps, la,
            EST, NORMALIZE, ADAM, DIAGNOSTICS, PD, SD, BLOCK_, True, NESTEROV,
        )  # fmt: skip
    if DIAGNOSTICS:
        tl.store(D + 3 * c, _sum(d_rr, 0))
        tl.store(D + 3 * c + 1, _sum(d_gg, 0))
        tl.store(D + 3 * c + 2, _sum(d_hh, 0))
    if j == 0:
        tl.store(step_ptr, tl.where(live, t1, step0))
        if DIAGNOSTICS:
            # 0: stepped, 1: stepped with masked entries, 2: skipped.
            tl.store(ACT + t, tl.where(live, tl.where(count > 0, 1, 0), 2).to(tl.int32))


_KERNELS = {"partials": _partials, "rows": _rows, "update": _update}

#: Triton kernel launches made by this module (the launch-count test reads it).
launches = 0


def _launch(name: str, grid: tuple[int], *args: Any, **meta: Any) -> None:
    global launches
    launches += 1
    _KERNELS[name][grid](*args, **meta)


# -- host side -----------------------------------------------------------------------------


class _Plan:
    """Device tables of one bucket of tensors (same dtypes); built once per addresses and sizes."""

    def __init__(self, rows: list[list[int]], device: torch.device, k: int, chunk: int) -> None:
        first = 0
        for r in rows:
            nch = max(1, -(-r[_N] // chunk))  # an empty tensor has one (empty) chunk: its step advances
            r[_FIRST], r[_NCH] = first, nch
            first += nch
        chunks = [x for t, r in enumerate(rows) for j in range(r[_NCH]) for x in (t, j)]
        self.n_tensors = len(rows)
        self.n_chunks = first
        self.table = torch.tensor(rows, dtype=torch.int64).to(device)
        self.chunks = torch.tensor(chunks, dtype=torch.int64).to(device)
        self.partials = torch.empty((first, k), dtype=torch.float32, device=device)
        self.diag = torch.zeros((first, 3), dtype=torch.float32, device=device)
        self.actions = torch.zeros(len(rows), dtype=torch.int32, device=device)
        self.steps = torch.zeros(len(rows), dtype=torch.float32, device=device)


_MAX_PLANS = 64
_plans: OrderedDict[tuple, _Plan] = OrderedDict()


def _plan(key: tuple, rows: list[list[int]], device: torch.device, k: int, chunk: int) -> _Plan:
    plan = _plans.get(key)
    if plan is None:
        plan = _Plan(rows, device, k, chunk)
        _plans[key] = plan
        if len(_plans) > _MAX_PLANS:
            _plans.popitem(last=False)
    else:
        _plans.move_to_end(key)
    return plan


#: Set by tests: run the kernels on CPU tensors too (meant for ``TRITON_INTERPRET=1``).
INTERPRET_ON_CPU = False


_PARAM_DTYPES = frozenset(_DTYPES)
_STATE_DTYPES = frozenset((torch.float32, torch.bfloat16))


def misfit(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]], form: Form) -> str | None:
    """Why this step cannot take a group (``None``: it can): a form without a Triton code,
    parameters that are not contiguous or not float32/bfloat16/float16, state not
    float32/bfloat16 or not contiguous, tensors on several devices.  No host read."""
    if form.name not in _CODES:
        return f"estimator={form.name!r} has no Triton step"
    view = local_view if any(map(is_dtensor, params)) else (lambda t: t)
    index = view(params[0]).get_device()
    keys = form.state_keys("exp_avg_sq" in states[0])
    for p, g, state in zip(params, grads, states):
        w, gl = view(p), view(g)
        if w.dtype not in _PARAM_DTYPES or gl.dtype not in _PARAM_DTYPES:
            return f"parameters and gradients must be float32, bfloat16 or float16, got {w.dtype} and {gl.dtype}"
        if not w.is_contiguous():
            return f"a parameter of shape {tuple(w.shape)} is not contiguous"
        if w.get_device() != index or gl.get_device() != index:
            return "the group's tensors are on several devices"
        sd = view(state["b"]).dtype
        for key in keys:
            t = view(state[key])
            if t.dtype != sd or sd not in _STATE_DTYPES or not t.is_contiguous() or t.get_device() != index:
                return f"state {key!r} is not contiguous float32/bfloat16 on the parameters' device"
    return None


def triton_trainable_to(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    cfg: StepConfig,
    *,
    diagnostics: bool,
    reduce_stats: Callable[[Tensor], Tensor] | None,
    chunk: int | None = None,
    block: int | None = None,
) -> dict[str, Tensor] | None:
    """One TO step of a param group with the Triton kernels, for a group that fits them
    (:func:`misfit` is ``None``; :func:`hf_to.functional.choose_path` checks it).

    Returns the diagnostic sums of this call (device tensors) or ``None``.  No host read.
    """
    sharded = any(map(is_dtensor, params))
    view = local_view if sharded else (lambda t: t)
    device = view(params[0]).device
    index = view(params[0]).get_device()  # -1 on the CPU
    chunk, block = chunk or CHUNK, block or BLOCK
    if chunk % block:
        raise ValueError(f"chunk={chunk} must be a multiple of block={block}")
    form = forms.get_form(cfg.estimator)
    code = _CODES[form.name]
    k = 1 + len(form.stat_names)
    adam, normalize = cfg.adam, cfg.normalize
    slope_keys = form.slope_keys
    keys = form.state_keys(adam)
    # One bucket per (param, grad, state) dtypes: the dtypes are compile-time constants.
    buckets: dict[tuple, list[list[int]]] = {}
    temporaries = []  # contiguous copies of gradients: alive until the launches are queued
    for i, (p, g, state) in enumerate(zip(params, grads, states)):
        w, gl = view(p), view(g)
        st = [view(state[key]) for key in keys]
        sd = st[0].dtype
        if not gl.is_contiguous():
            gl = gl.contiguous()
            temporaries.append(gl)
        step = state["step"]
        if step.get_device() != index or step.dtype != torch.float32:
            # The kernel reads and advances the count on the device (moved once, as fused AdamW keeps it).
            step = state["step"] = step.to(device=device, dtype=torch.float32)
        ptrs = [t.data_ptr() for t in st]
        s1 = ptrs[1] if slope_keys else 0
        s2 = ptrs[2] if len(slope_keys) > 1 else 0
        v2 = ptrs[-1] if adam else 0
        row = [w.data_ptr(), gl.data_ptr(), ptrs[0], s1, s2, v2, step.data_ptr(), w.numel(), 0, 0, i]
        buckets.setdefault((w.dtype, gl.dtype, sd), []).append(row)

    lr, beta, beta2 = cfg.lr, cfg.beta, cfg.beta2
    lr_tensor = isinstance(lr, Tensor)
    lr_arg = lr.to(device=device) if lr_tensor else torch.empty((), device=device)
    lr_value = 0.0 if lr_tensor else float(lr)
    kp = 8 if k > 1 else 2
    sums = None
    if reduce_stats is not None:
        sums = torch.empty((len(params), k), dtype=torch.float32, device=device)  # every row: _rows
    plans = []
    for (pd, gd, sd), rows in buckets.items():
        key = (device, pd, gd, sd, k, chunk, *chain.from_iterable(rows))
        plan = _plan(key, rows, device, k, chunk)
        # 16-byte aligned addresses (the rule for fresh allocations) let full tiles use vector
        # loads and stores; a view at an odd offset makes its bucket take scalar accesses.
        aligned = not any(x & 15 for r in rows for x in r[:6])
        codes = dict(PD=_DTYPES[pd], GD=_DTYPES[gd], SD=_DTYPES[sd], ALIGNED=aligned, CHUNK_=chunk, BLOCK_=block)
        _launch(
            "partials",
            (plan.n_chunks,),
            plan.table,
            plan.chunks,
            plan.partials,
            plan.steps,
            EST=code,
            K=k,
            NORMALIZE=normalize,
            **codes,
        )
        if sums is not None:
            _launch("rows", (plan.n_tensors,), plan.table, plan.partials, sums, K=k, KP=kp, RB=64)
        plans.append((plan, codes))
    if sums is not None:
        sums = reduce_stats(sums).contiguous()
    for plan, codes in plans:
        _launch(
            "update",
            (plan.n_chunks,),
            plan.table,
            plan.chunks,
            plan.partials,
            plan.steps,
            sums if sums is not None else plan.partials,
            plan.diag,
            plan.actions,
            lr_arg,
            lr_value,
            1.0 - lr_value * cfg.weight_decay,
            float(cfg.weight_decay),
            float(cfg.alpha),
            float(beta),
            float(beta2),
            1.0 - beta2,
            math.log(beta2) if beta2 > 0 else -math.inf,  # (float64 here, float32 in the kernel)
            float(cfg.eps),
            float(cfg.norm_floor),
            math.log1p(-beta) if beta < 1 else -math.inf,
            cfg.lookahead_code,
            EST=code,
            K=k,
            KP=kp,
            RB=64,
            ROWS_GIVEN=sums is not None,
            LR_TENSOR=lr_tensor,
            NORMALIZE=normalize,
            ADAM=adam,
            WARMUP=cfg.warmup_code,
            SEED_INTERCEPT=cfg.intercept_from_gradient,
            DIAGNOSTICS=diagnostics,
            NESTEROV=cfg.looks_ahead,
            **codes,
        )
    if not diagnostics:
        return None
    diag = torch.cat([p.diag for p, _ in plans]).sum(0, dtype=torch.float64)
    actions = torch.cat([p.actions for p, _ in plans])
    return {
        "steps": (actions != 2).any().to(torch.float64),
        "residual_sq": diag[0],
        "grad_sq": diag[1],
        "estimate_sq": diag[2],
        "skipped": (actions != 0).sum().to(torch.float64),
    }
