"""Compile the Triton kernels of hf_to.gpu for a GPU target without a GPU (to PTX and cubin).

Triton's interpreter (the CPU tests) runs the kernels' Python code, but not the compiler:
this script checks that every kernel variant the optimizer can launch also compiles for
sm_90 (H100/H200) with Triton's own ptxas, and reports whether full tiles got 16-byte vector
loads and stores (``ld.global.v4`` / ``st.global.v4`` in the PTX).  No CUDA device needed::

    PYTHONPATH=. python scripts/triton_compile_check.py            # every variant (~90, ~45 s)
    PYTHONPATH=. python scripts/triton_compile_check.py --quick    # one per estimator form (~10 s)

Exit status 1 when a variant fails to compile.  Must run without ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET=1: the interpreter does not compile")

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import hf_to.gpu as gpu
from hf_to.forms import FORMS

#: Pointer arguments and their element types; every other non-constexpr argument is a float.
POINTERS = {
    "TAB": "*i64",
    "CHUNKS": "*i64",
    "P": "*fp32",
    "STEPS": "*fp32",
    "R": "*fp32",
    "D": "*fp32",
    "ACT": "*i32",
    "LR": "*fp32",
}


def signature(fn, consts: dict) -> dict:
    return {name: "constexpr" if name in consts else POINTERS.get(name, "fp32") for name in fn.arg_names}


def variants(quick: bool) -> list[tuple[str, dict]]:
    out = []
    sizes = dict(CHUNK_=gpu.CHUNK, BLOCK_=gpu.BLOCK)
    dtypes = [(0, 0, True), (1, 1, True)] if quick else [(0, 0, True), (1, 1, True), (2, 0, False), (1, 0, True)]
    forms = [(1, 1, 1, 1, 0, 0, 0)] if quick else [(1, 1, 1, 1, 0, 0, 0), (0, 0, 0, 0, 1, 1, 1), (1, 1, 1, 2, 0, 0, 0)]
    # the forms with a Triton step: their code (hf_to.gpu._CODES) and sums per tensor
    for name, est in gpu._CODES.items():
        k = 1 + len(FORMS[name].stat_names)
        kp = 8 if k > 1 else 2
        for pd, sd, aligned in dtypes:
            codes = dict(PD=pd, GD=pd, SD=sd, ALIGNED=aligned, **sizes)
            for adam, norm, seed, warm, diag, rows, lr_t in forms:
                out.append(("_partials", dict(EST=est, K=k, NORMALIZE=bool(norm), **codes)))
                flags = dict(ROWS_GIVEN=bool(rows), LR_TENSOR=bool(lr_t), NORMALIZE=bool(norm), ADAM=bool(adam))
                flags |= dict(WARMUP=bool(warm), SEED_INTERCEPT=bool(seed), DIAGNOSTICS=bool(diag))
                flags |= dict(NESTEROV=warm == 2)  # the "adam" warm-up form also with the Nesterov direction
                out.append(("_update", dict(EST=est, K=k, KP=kp, RB=64, **flags, **codes)))
        out.append(("_rows", dict(K=k, KP=kp, RB=64)))
    unique = {(name, tuple(sorted(c.items()))): (name, c) for name, c in out}
    return list(unique.values())


def compile_one(name: str, consts: dict, target: GPUTarget):
    fn = getattr(gpu, name)
    constexprs = {(fn.arg_names.index(k),): v for k, v in consts.items()}
    return triton.compile(ASTSource(fn=fn, signature=signature(fn, consts), constexprs=constexprs), target=target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one variant per estimator and dtype pair")
    parser.add_argument("--arch", type=int, default=90, help="compute capability (default: 90)")
    args = parser.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    failed, vector = [], 0
    start = time.perf_counter()
    todo = variants(args.quick)
    for name, consts in todo:
        try:
            ptx = compile_one(name, consts, target).asm["ptx"]
            vector += name == "_update" and consts.get("ALIGNED", False) and "st.global.v4" in ptx
        except Exception as err:  # report every variant that fails
            failed.append(f"{name} {consts}: {type(err).__name__}: {str(err)[:500]}")
    updates = sum(name == "_update" and c.get("ALIGNED", False) for name, c in todo)
    print(
        f"triton {triton.__version__}, sm_{args.arch}: compiled {len(todo) - len(failed)}/{len(todo)} kernel variants "
        f"in {time.perf_counter() - start:.1f} s; aligned _update variants with 16-byte vector stores: {vector}/{updates}"
    )
    for line in failed:
        print("FAILED", line)
    return 1 if failed or vector != updates else 0


if __name__ == "__main__":
    sys.exit(main())
