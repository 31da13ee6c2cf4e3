r"""The one-pass CPU step: a small C kernel (``native.c``) built on first use, called via ctypes.

Why C and not ``torch.compile`` on the CPU: a diagonal TO step moves as many bytes as fused
AdamW, so fused AdamW's time is the bar, and two things kept the compiled kernels of
``hf_to.kernels`` (since retired) above it (``docs/speed.md``): every tensor needed a whole-tensor sum
(``wᵀw``, and the non-finite check) *before* its first write, i.e. a second pass over memory,
and every tensor cost one compiled call (~50–100 µs; most of a LoRA step).  Here

* a param group is **one call**; OpenMP threads share fixed-size blocks of all its tensors;
* the sums a step needs before it writes are sums of what the *previous* step wrote, so that
  pass computes them from the values it stores and they are *carried* to the next step.  They
  are trusted only while the parameter and its state tensors keep their data pointer, byte
  size and version counter (any in-place write by PyTorch bumps it); otherwise :func:`to_sums`
  recomputes them, with the same blockwise summation, so a resumed run continues bit for bit;
* nothing reaches the kernel unchecked: before every call each tensor it will touch is shown
  to hold the parameter's number of elements of the expected dtype, contiguous, on the CPU,
  inside its storage (gradients in full every call; parameters and state by pointer, byte
  size, dtype and contiguity every call and in full when one of those moved), so that no
  ``.data`` reassignment, resize or mismatched state can make it read or write out of bounds;
* the coordinate-wise estimators (folded, diagonal, none) mask non-finite gradient entries in the
  same pass; rank-one needs ``uᵀg`` of the new gradient and pays a pre-pass over ``u`` and ``g``;
* sharded groups (FSDP2's DTensors on the CPU, as ``CPUOffloadPolicy`` hands them over) step
  their local shards: the carried sums are the local shards' partial sums, one pass over the
  new gradient (``to_partials``) adds its non-finite count (and rank-one's ``uᵀg``), the
  group's ``reduce_stats`` sums the stacked rows across ranks in one all-reduce, and the step
  uses the totals (the readable path's two phases, in two kernel calls).

The build: the system C compiler (``$CC``, else ``cc``/``gcc``) with ``-O3 -march=native
-fopenmp -ffp-contract=off`` (no FMA contraction, so the rounding does not depend on the
host's instruction set; on Zen 5 also ``-DHF_TO_PREFETCH=1``, :func:`_tuning_flags`), 2-20 s once (19 s on the Zen 4 host of 2026-12-07); the library is cached under ``$HF_TO_CACHE/native`` (default
``~/.cache/hf_to/native``) by a hash of the source, the flags, the compiler and the CPU's
feature flags.  The cache cannot hurt a run: a library is loaded only when the sidecar
``<name>.so.sha256`` written after its build still matches its byte size and sha256 (a
truncated, overwritten or unfinished file is rebuilt; ``dlopen`` of a truncated file would
kill the process with SIGBUS); files are built under temporary names, renamed into place,
and readable by others under the umask (0755/0644); temporary files of a failed build are
removed, those of a killed one by the next build after ten minutes; an unwritable cache
means a build in a private temporary directory, with one warning.  OpenMP resolves to the ``libgomp`` that PyTorch has already loaded, so the two
share one thread pool; the kernel uses ``torch.get_num_threads()`` threads.  If no compiler is
found or the build fails, a warning is logged once and the optimizer uses its other paths.
``HF_TO_NATIVE=0`` turns this path off.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import logging
import operator
import os
import platform
import shutil
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable
from itertools import repeat
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from .config import StepConfig
from .distributed import is_dtensor, is_sharded, local_view
from .forms import FORMS
from .settings import env_switch

__all__ = ["available", "eligible", "library_path", "load_seconds", "native_step"]

logger = logging.getLogger(__name__)

_ENV = "HF_TO_NATIVE"
_SOURCE = Path(__file__).with_name("native.c")
_ABI = 9
_PDTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_SDTYPES = {torch.float32: 0, torch.bfloat16: 1}
_ESTIMATORS = {"diagonal": 0, "rank_one": 1, "none": 2, "folded": 3}


class _Tensor(ctypes.Structure):
    _fields_ = [
        ("w", ctypes.c_void_p),
        ("g", ctypes.c_void_p),
        ("b", ctypes.c_void_p),
        ("s1", ctypes.c_void_p),
        ("s2", ctypes.c_void_p),
        ("v2", ctypes.c_void_p),
        ("n", ctypes.c_int64),
        ("ntotal", ctypes.c_int64),
        ("step", ctypes.POINTER(ctypes.c_float)),
        ("ww", ctypes.c_double),
        ("vw", ctypes.c_double),
        ("uu", ctypes.c_double),
        ("ub", ctypes.c_double),
        ("ug", ctypes.c_double),
        ("nbad", ctypes.c_double),
        ("rr", ctypes.c_double),
        ("gg", ctypes.c_double),
        ("hh", ctypes.c_double),
    ]


class _Config(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_double) for name in ("lr", "decay", "alpha", "beta", "beta2", "eps", "floor", "lookahead")),
        *(
            (name, ctypes.c_int32)
            for name in (
                "warmup",
                "adam",
                "normalize",
                "diagnostics",
                "pdtype",
                "sdtype",
                "estimator",
                "nthreads",
                "nesterov",
                "init",
                "reduced",
            )
        ),
    ]


# -- build and load ------------------------------------------------------------------------

_lib: ctypes.CDLL | None = None
_failed = False
_load_seconds = 0.0


def _cache_dir() -> Path:
    return Path(os.environ.get("HF_TO_CACHE", Path.home() / ".cache" / "hf_to")) / "native"


def _compiler() -> str | None:
    """``$CC`` when set (it must exist: a compiler asked for is not silently replaced), else
    the first of cc, gcc, clang on the PATH."""
    chosen = os.environ.get("CC")
    if chosen:
        if not shutil.which(chosen.split()[0]):
            raise RuntimeError(f"CC={chosen!r} is not an executable on the PATH")
        return chosen
    return next((name for name in ("cc", "gcc", "clang") if shutil.which(name)), None)


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in ``/proc/cpuinfo`` ({} without one), read once per build."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if info:
                break
            continue
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def _cpu_flags(info: dict[str, str]) -> str:
    """The CPU's feature flags (x86 ``flags``, Arm ``Features``): part of the cache key."""
    return info.get("flags") or info.get("Features") or platform.processor()


def _tuning_flags(info: dict[str, str]) -> list[str]:
    """``-DHF_TO_PREFETCH=1`` on AMD family 1Ah (Zen 5), the host where the step's software
    prefetch was measured to pay (it doubled a single thread's bandwidth); on Zen 4 and on
    the Intel host before, the plain loop was faster (docs/speed.md)."""
    zen5 = info.get("vendor_id") == "AuthenticAMD" and info.get("cpu family") == "26"
    return ["-DHF_TO_PREFETCH=1"] if zen5 else []


_COMMON_FLAGS = ["-std=gnu11", "-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]


def _flag_sets(info: dict[str, str]) -> tuple[list[str], ...]:
    """The compiler flags to try, in order: tuned for this CPU, then portable, then without OpenMP."""
    return (
        [*_COMMON_FLAGS, "-march=native", "-fopenmp", *_tuning_flags(info)],
        [*_COMMON_FLAGS, "-fopenmp"],
        [*_COMMON_FLAGS, "-fopenmp-simd"],  # no OpenMP runtime: one thread
    )


#: Temporary files of a build (``<prefix><random>.so``), and of builds before 2026-12 (``tmp*.so``).
_TMP_PREFIX = "hf_to_build_"
#: A temporary build file older than this is left over from a killed build, and is removed.
_STALE_SECONDS = 600.0
_fallback_dir: Path | None = None


def _digest(path: Path) -> tuple[int, str]:
    """Byte size and sha256 of a file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            size += len(chunk)
            h.update(chunk)
    return size, h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _verified(path: Path) -> bool:
    """Whether ``path`` is a library that a build of ours completed: its sidecar (written after
    the build) records its byte size and sha256, and the file still has them.  A truncated or
    overwritten library, or one without a sidecar, is never loaded (``dlopen`` of a truncated
    file kills the process with SIGBUS)."""
    try:
        size, digest = _sidecar(path).read_text().split()
        return path.stat().st_size == int(size) and _digest(path) == (int(size), digest)
    except (OSError, ValueError):
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_stale_temporaries(directory: Path) -> None:
    """Remove temporary files of builds that were killed (older than ``_STALE_SECONDS``; a
    younger one may belong to a build running beside this one)."""
    now = time.time()
    for pattern in (f"{_TMP_PREFIX}*", "tmp*.so"):
        for leftover in directory.glob(pattern):
            try:
                if now - leftover.stat().st_mtime > _STALE_SECONDS:
                    leftover.unlink()
            except OSError:
                pass  # another process removed it first, or it is not ours to remove


def _publish(tmp: Path, path: Path, mode: int) -> None:
    """Make ``tmp`` the file ``path`` (atomic rename: no reader sees a part) with ``mode`` under the umask."""
    os.chmod(tmp, mode & ~_umask())
    os.replace(tmp, path)


def _compile(cc: str, flags: list[str], path: Path) -> str | None:
    """Build the library at ``path`` with its sidecar; the compiler's error (``None``: built).

    The library is written under a temporary name and renamed into place, then its sidecar
    likewise: a concurrent rank never sees a partial file, and one that reads the library
    between the two renames finds no matching sidecar and builds its own.  Temporary files
    are removed whatever happens (a build killed by a signal leaves them to the next build).
    """
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(directory)
    temporaries = []
    try:
        fd, name = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".so", dir=directory)
        os.close(fd)
        tmp = Path(name)
        temporaries.append(tmp)
        cmd = [*cc.split(), *flags, "-shared", "-fPIC", str(_SOURCE), "-o", str(tmp)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            return f"{' '.join(cmd)}:\n{done.stderr.strip()[-2000:]}"
        size, digest = _digest(tmp)
        fd, name = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".sha256", dir=directory)
        temporaries.append(Path(name))
        with os.fdopen(fd, "w") as f:
            f.write(f"{size} {digest}\n")
        _publish(tmp, path, 0o755)
        _publish(Path(name), _sidecar(path), 0o644)
        return None
    finally:
        for tmp in temporaries:
            tmp.unlink(missing_ok=True)


def _private_dir() -> Path:
    """A directory of this process's own, for when the cache cannot be written (removed at exit)."""
    global _fallback_dir
    if _fallback_dir is None:
        _fallback_dir = Path(tempfile.mkdtemp(prefix="hf_to_native_"))
        atexit.register(shutil.rmtree, _fallback_dir, True)
    return _fallback_dir


def _build() -> Path:
    """The path of a verified library for this source, compiler and CPU: from the cache, else
    built into it, else (the cache cannot be written) built into a private temporary directory."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC)")
    source = _SOURCE.read_bytes()
    version = subprocess.run([*cc.split(), "--version"], capture_output=True, text=True).stdout
    directory = _cache_dir()
    errors = []
    info = _cpuinfo()
    cpu = _cpu_flags(info)
    for flags in _flag_sets(info):
        key = hashlib.sha256(b"\0".join(x.encode() for x in (version, cpu, *flags)) + source).hexdigest()
        name = f"hf_to_native_{key[:20]}.so"
        if _verified(directory / name):
            return directory / name
        try:
            error = _compile(cc, flags, directory / name)
        except OSError as err:
            if directory == _fallback_dir:
                raise
            logger.warning(
                "hf_to: cannot write the native kernel's cache %s (%s); building it in a temporary directory "
                "of this process (set HF_TO_CACHE to a writable directory to keep it)",
                directory,
                err,
            )
            directory = _private_dir()
            error = _compile(cc, flags, directory / name)
        if error is None:
            # A rank building beside this one may have renamed its library over ours and not
            # yet its sidecar: wait for it (the compiler's output is the same bytes anyway).
            for _ in range(100):
                if _verified(directory / name):
                    return directory / name
                time.sleep(0.05)
            raise RuntimeError(f"the library built at {directory / name} does not match its sidecar")
        errors.append(error)
    raise RuntimeError("building the native kernel failed:\n" + "\n".join(errors))


def _load() -> ctypes.CDLL | None:
    global _lib, _failed, _load_seconds
    if _lib is not None or _failed:
        return _lib
    start = time.perf_counter()
    try:
        lib = ctypes.CDLL(str(_build()))
        if lib.to_abi_version() != _ABI:
            raise RuntimeError(f"native kernel ABI {lib.to_abi_version()} != {_ABI}")
        for fn in (lib.to_step, lib.to_sums):
            fn.argtypes = [
                ctypes.POINTER(_Tensor),
                ctypes.c_int64,
                ctypes.POINTER(_Config),
                ctypes.POINTER(ctypes.c_double),
                ctypes.c_int64,
            ]
            fn.restype = ctypes.c_int
        lib.to_partials.argtypes = lib.to_step.argtypes = [*lib.to_step.argtypes, ctypes.POINTER(ctypes.c_void_p)]
        lib.to_partials.restype = ctypes.c_int
        _lib = lib
        _load_seconds = time.perf_counter() - start
    except Exception as err:  # no compiler, no OpenMP, unwritable cache: the other paths remain
        _failed = True
        logger.warning("hf_to: the native CPU kernel is unavailable (%s); using the PyTorch paths", err)
    return _lib


def available() -> bool:
    """Whether the native kernel can be used (builds it on the first call; ``HF_TO_NATIVE=0``: never)."""
    return env_switch(_ENV) and _load() is not None


def load_seconds() -> float:
    """Seconds this process spent building (when not cached) and loading the kernel."""
    return _load_seconds


def library_path() -> Path | None:
    """Where the built library lies (``None`` when unavailable)."""
    return Path(_lib._name) if available() and _lib is not None else None


_PLAIN = (torch.Tensor, torch.nn.Parameter)
_PLAIN_SET = frozenset(_PLAIN)
_B = operator.itemgetter("b")
_STEP = operator.itemgetter("step")
_VERSION = operator.attrgetter("_version")
_PTR = Tensor.data_ptr
_NBYTES = operator.attrgetter("nbytes")
_DTYPE = operator.attrgetter("dtype")
_IS_CPU = operator.attrgetter("is_cpu")
_NUMEL = Tensor.numel
_CONTIGUOUS = Tensor.is_contiguous
_OFFSET = Tensor.storage_offset
_STORAGE = Tensor.untyped_storage
_STORAGE_NBYTES = torch.UntypedStorage.nbytes


def _local(
    params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]]
) -> tuple[list[Tensor], list[Tensor], list[dict[str, Tensor]]]:
    """The local shards of a group holding DTensors (FSDP2), aliasing their storage; else the group."""
    if not any(map(is_dtensor, params)):
        return params, grads, states
    local = [{k: local_view(v) for k, v in s.items()} for s in states]
    return list(map(local_view, params)), list(map(local_view, grads)), local


def eligible(estimator: str, params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]]) -> bool:
    """Whether a group can take the native step: CPU, plain contiguous tensors or DTensors
    whose local shards are (FSDP2; their sums go through ``native_step``'s ``reduce_stats``),
    supported dtypes."""
    if estimator not in _ESTIMATORS or not params:
        return False
    params, grads, states = _local(params, grads, states)
    pdtype, sdtype = params[0].dtype, states[0]["b"].dtype
    if pdtype not in _PDTYPES or sdtype not in _SDTYPES:
        return False
    if pdtype is torch.float16:
        lib = _load() if env_switch(_ENV) else None
        if lib is None or not lib.to_has_float16():
            return False  # built without _Float16 (an old compiler): the PyTorch paths
    # Column-wise (C-level passes over each list): this runs on every step of every group.
    return (
        all(map(_IS_CPU, params))
        and set(map(type, params)) <= _PLAIN_SET
        and set(map(_DTYPE, params)) == {pdtype}
        and set(map(_DTYPE, grads)) == {pdtype}
        and all(map(_CONTIGUOUS, params))
        and all(map(_CONTIGUOUS, grads))
        and set(map(_DTYPE, map(_B, states))) == {sdtype}
        and set(map(_DTYPE, map(_STEP, states))) == {torch.float32}
    )


# -- the step ------------------------------------------------------------------------------


def _misfit(x: Tensor, n: int, dtype: torch.dtype) -> str | None:
    """Why the kernel may not treat ``x`` as ``n`` contiguous ``dtype`` values at ``x.data_ptr()``
    (``None``: it may).  Every tensor the kernel reads or writes passes this before it does."""
    if type(x) not in _PLAIN:
        return f"is a {type(x).__name__}, not a plain tensor"
    if not x.is_cpu:
        return f"is on {x.device}, not the CPU"
    if x.dtype is not dtype:
        return f"has dtype {x.dtype}, expected {dtype}"
    if x.numel() != n:
        return f"has shape {tuple(x.shape)} ({x.numel()} elements), expected {n} elements"
    if not x.is_contiguous():
        return f"is not contiguous (shape {tuple(x.shape)}, strides {x.stride()})"
    if n and (x.storage_offset() + n) * x.itemsize > x.untyped_storage().nbytes():
        return (
            f"reaches past its storage ({x.untyped_storage().nbytes()} bytes for {n} elements "
            f"at offset {x.storage_offset()})"
        )
    return None


def _check_grads(params: list[Tensor], grads: list[Tensor], numels: list[int], dtype: torch.dtype) -> None:
    """Every gradient fits the kernel (see :func:`_misfit`): gradients are new tensors at most
    steps, so they are checked in full on every call, column-wise (a few C-level passes)."""
    if (
        list(map(_NUMEL, grads)) == numels
        and all(map(_CONTIGUOUS, grads))
        and all(map(_IS_CPU, grads))
        and all(map(operator.is_, map(_DTYPE, grads), repeat(dtype)))
        and set(map(type, grads)) <= _PLAIN_SET
        and all(
            map(
                operator.le,
                map(operator.mul, map(operator.add, map(_OFFSET, grads), numels), repeat(dtype.itemsize)),
                map(_STORAGE_NBYTES, map(_STORAGE, grads)),
            )
        )
    ):
        return
    for p, g, n in zip(params, grads, numels):
        why = _misfit(g, n, dtype)
        if why is not None:
            raise RuntimeError(f"the gradient of a parameter of shape {tuple(p.shape)} {why}")


def _observe(column: tuple[Tensor, ...], dtype: torch.dtype) -> tuple[list[int], list[int], list[int]] | None:
    """Data pointers, byte sizes and version counters of a column of tensors (``None`` when one
    is not contiguous or not ``dtype``: then every tensor is checked in full)."""
    if not (all(map(_CONTIGUOUS, column)) and all(map(operator.is_, map(_DTYPE, column), repeat(dtype)))):
        return None
    return list(map(_PTR, column)), list(map(_NBYTES, column)), list(map(_VERSION, column))


class _Plan:
    """The descriptors of one param group, kept between steps with the carried sums.

    The descriptor ``ts[i]`` (pointers, element count, carried sums) is valid while tensor
    ``i``, its state tensors and step count keep the data pointer, byte size, dtype and
    contiguity they had when it was checked in full, and no one else bumped their version
    counters (every in-place write PyTorch makes does; the kernel's own bumps are one per
    step).  A ``p.data = p.data[:k]`` keeps pointer and version but not the byte size.
    Parameters are held by weak reference: a plan never keeps a model alive, and a
    recycled ``id`` cannot revive a dead plan.
    """

    def __init__(self, params: list[Tensor], keys: tuple) -> None:
        self.refs = [weakref.ref(p) for p in params]
        self.keys = keys
        self.ts = (_Tensor * len(params))()
        self.held: list[tuple[Tensor, ...]] = [()] * len(params)
        # Per column (the parameters, then each state key and the step count): the data
        # pointers, byte sizes and version counters the last call saw, or None before one.
        self.seen: list[tuple[list[int], list[int], list[int]] | None] = [None] * (len(keys) + 1)
        self.written: list[Tensor] = []  # the tensors whose versions a step bumps
        # Scratch for the kernel's per-block sums (8 per block of 2048 elements); the kernel
        # allocates its own when a group outgrows it (``cap`` is the buffer's true length).
        self.cap = 8 * sum(-(-p.numel() // 2048) for p in params)
        self.scratch = (ctypes.c_double * max(self.cap, 1))()

    def alive(self, params: list[Tensor]) -> bool:
        return all(ref() is p for ref, p in zip(self.refs, params))


# Plans of one owner (an optimizer's ``_native_plans``) are keyed by the ids of the tensors
# that had gradients (checked by weak reference); a few subsets recur per group.
_MAX_PLANS = 64


def _plan(params: list[Tensor], keys: tuple, plans: dict) -> _Plan:
    key = tuple(map(id, params))
    plan = plans.get(key)
    if plan is None or plan.keys != keys or not plan.alive(params):
        if len(plans) >= _MAX_PLANS:
            plans.clear()
        plan = plans[key] = _Plan(params, keys)
    return plan


def native_step(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    cfg: StepConfig,
    *,
    diagnostics: bool,
    plans: dict | None = None,
    reduce_stats: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Tensor] | None:
    """One TO step (same math and result as the readable path); a tensor whose step count is
    0 takes its first step (``intercept_from_gradient``: :math:`b_0 = g_0`, the optimizer's
    ``intercept_init="gradient"``; rank-one's v_0 = w_0 / ‖w_0‖) in the kernel
    too, so that no sum depends on the thread count.

    ``plans`` caches the descriptors and carried sums between steps; an optimizer passes its
    own dict so that they go with it.  Without it nothing is cached and the sums the step
    needs are recomputed (one more pass over the tensors).

    A tensor that does not fit (another number of elements, dtype or device, not contiguous,
    past the end of its storage) raises ``RuntimeError`` before the kernel runs.

    The carried sums are trusted while pointers, byte sizes and version counters match.
    Writes through ``p.data`` (say ``p.data.clamp_(...)`` between steps) change none of them,
    so the next step would use the sums of the weights as this step left them (the
    normaliser ``wᵀw/n``, and rank-one's ``vᵀw``: stale sums, never out-of-bounds access);
    write on the parameter itself under ``torch.no_grad()`` (``p.clamp_(...)``), or set
    ``HF_TO_NATIVE=0``.
    """
    lib = _load()
    assert lib is not None, "native_step called without the native kernel"
    estimator, adam, normalize, lr = cfg.estimator, cfg.adam, cfg.normalize, float(cfg.lr)
    whole = params
    if reduce_stats is None and any(map(is_sharded, whole)):
        raise RuntimeError("native_step on sharded parameters needs reduce_stats (their sums span the shards)")
    params, grads, states = _local(params, grads, states)
    k = len(params)
    form = FORMS[estimator]
    keys = form.state_keys(adam)
    # w'w (and rank-one's sums) are needed, hence carried, only with a normalised rate or rank-one.
    sums = bool(form.stat_names) and (normalize or estimator == "rank_one")
    # Without an owner's cache (the functional API) nothing is kept: the sums are recomputed.
    plan = _Plan(whole, (*keys, sums)) if plans is None else _plan(whole, (*keys, sums), plans)
    ts = plan.ts
    pdtype, sdtype = params[0].dtype, states[0]["b"].dtype
    if pdtype not in _PDTYPES or sdtype not in _SDTYPES:
        raise RuntimeError(
            f"the native kernel takes {list(_PDTYPES)} parameters and {list(_SDTYPES)} state, got {pdtype} and {sdtype}"
        )
    held_all = list(map(operator.itemgetter(*keys, "step"), states))  # each: the state tensors, then the step
    numels = list(map(_NUMEL, params))
    # Nothing reaches the kernel unchecked.  Gradients: in full, every call.  Parameters and
    # state: pointer, byte size, dtype, contiguity and version every call (a few C-level
    # passes over each column); in full (element count, device, storage bounds) for the
    # tensors where any of these moved, which also invalidates their carried sums.
    _check_grads(params, grads, numels, pdtype)
    columns = [params, *zip(*held_all)]
    dtypes = [pdtype, *([sdtype] * len(keys)), torch.float32]
    stale: set[int] = set()
    seen = []
    for c, (column, dtype) in enumerate(zip(columns, dtypes)):
        now = _observe(column, dtype)
        was = plan.seen[c]
        seen.append(now)
        if now is None or was is None:
            stale.update(range(k))
            continue
        ptrs, sizes, versions = now
        if ptrs != was[0] or sizes != was[1]:
            stale.update(i for i, (x, y, u, v) in enumerate(zip(ptrs, was[0], sizes, was[1])) if x != y or u != v)
        # The kernel bumped every version once since ``was`` was read (when it ran).
        if sum(versions) != sum(was[2]) + k:
            stale.update(i for i, (x, y) in enumerate(zip(versions, was[2])) if x != y + 1)
    stale_list = sorted(stale)
    for i in stale_list:
        p, held = params[i], held_all[i]
        n = numels[i]
        for name, x, want, dtype in (
            ("parameter", p, n, pdtype),
            *((f"optimizer state {key!r}", x, n, sdtype) for key, x in zip(keys, held[:-1])),
            ("step count", held[-1], 1, torch.float32),
        ):
            why = _misfit(x, want, dtype)
            if why is not None:
                plan.seen = [None] * len(plan.seen)  # check everything again on the next call
                hint = " (a state dict loaded into parameters in another order?)" if name != "parameter" else ""
                raise RuntimeError(
                    f"the {name} of a parameter of shape {tuple(p.shape)} {why}: it does not fit "
                    f"its parameter, refusing the native step{hint}"
                )
    for i in stale_list:
        p, held = params[i], held_all[i]
        t = ts[i]
        t.step = ctypes.cast(held[-1].data_ptr(), ctypes.POINTER(ctypes.c_float))
        t.w, t.n, t.ntotal, t.b = p.data_ptr(), numels[i], whole[i].numel(), held[0].data_ptr()
        t.s1 = held[1].data_ptr() if form.slope_keys else None
        t.s2 = held[2].data_ptr() if len(form.slope_keys) > 1 else None
        t.v2 = held[-2].data_ptr() if adam else None
        plan.held[i] = held
    if stale:
        plan.written = [x for p, held in zip(params, held_all) for x in (p, *held)]
    stale = stale_list
    config = _Config(
        lr=lr,
        decay=1 - lr * cfg.weight_decay,
        alpha=cfg.alpha,
        beta=cfg.beta,
        beta2=cfg.beta2,
        eps=cfg.eps,
        floor=cfg.norm_floor,
        lookahead=cfg.lookahead_code,
        warmup=cfg.warmup_code,
        adam=int(adam),
        normalize=int(normalize),
        diagnostics=int(diagnostics),
        pdtype=_PDTYPES[pdtype],
        sdtype=_SDTYPES[sdtype],
        estimator=_ESTIMATORS[estimator],
        nthreads=torch.get_num_threads(),
        nesterov=int(cfg.looks_ahead),
        init=int(cfg.intercept_from_gradient),
    )
    if stale and sums:  # first native step, or PyTorch wrote to the tensors: recompute the sums
        sub = (_Tensor * len(stale))(*(ts[i] for i in stale))
        _check(lib.to_sums(sub, len(stale), ctypes.byref(config), plan.scratch, plan.cap))
        for j, i in enumerate(stale):
            ts[i].ww, ts[i].vw, ts[i].uu, ts[i].ub = sub[j].ww, sub[j].vw, sub[j].uu, sub[j].ub
    plan.seen = [None] * len(plan.seen)  # until the step below has run
    grad_ptrs = (ctypes.c_void_p * k)(*map(_PTR, grads))
    if reduce_stats is not None:
        # Sharded: the local parts of the sums (the carried ones, and the new gradient's from
        # one pass over it) go through the group's one all-reduce, then the step uses the totals.
        _check(lib.to_partials(ts, k, ctypes.byref(config), plan.scratch, plan.cap, grad_ptrs))
        names = ("nbad", *(("ww",) if sums else ()), *(("vw", "uu", "ub", "ug") if estimator == "rank_one" else ()))
        local = [[getattr(t, name) for name in names] for t in ts]
        for t, row in zip(ts, reduce_stats(torch.tensor(local, dtype=torch.float64)).tolist()):
            for name, value in zip(names, row):
                setattr(t, name, value)
        config.reduced = 1
    _check(lib.to_step(ts, k, ctypes.byref(config), plan.scratch, plan.cap, grad_ptrs))
    if reduce_stats is not None and estimator == "rank_one":
        # A skipped tensor kept the totals: it carries its local sums again.
        for t, row in zip(ts, local):
            if t.nbad > 0:
                t.ww, t.vw, t.uu, t.ub = row[1:5]
    # The kernel wrote through raw pointers: bump the version counters as PyTorch's own
    # in-place ops do (autograd's checks see the writes, and any other plan holding these
    # tensors finds its carried sums stale); the next call discounts this plan's own bumps.
    increment_version(plan.written)
    plan.seen = seen

    # Nothing moved (and the kernel kept the step count) where rank-one saw a non-finite
    # entry or where every entry was non-finite.
    if not diagnostics:
        return None
    bad = [t for t in ts if t.nbad > 0]
    moved = [t for t in ts if not (t.nbad > 0 and (estimator == "rank_one" or t.nbad >= t.ntotal))]
    return {
        "steps": torch.tensor(float(bool(moved)), dtype=torch.float64),
        "residual_sq": torch.tensor(sum(t.rr for t in moved), dtype=torch.float64),
        "grad_sq": torch.tensor(sum(t.gg for t in moved), dtype=torch.float64),
        "estimate_sq": torch.tensor(sum(t.hh for t in moved), dtype=torch.float64),
        "skipped": torch.tensor(float(len(bad)), dtype=torch.float64),
    }


def _check(rc: int) -> None:
    if rc != 0:
        raise RuntimeError(f"hf_to native kernel failed with code {rc}")
