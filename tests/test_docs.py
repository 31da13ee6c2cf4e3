"""The READMEs agree with what runs: their commands parse as written from a fresh clone, and
their result tables are the committed results files."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
sys.path.insert(0, str(RECIPES))

import compare  # noqa: E402
import sft  # noqa: E402

DOCS = [ROOT / "README.md", RECIPES / "README.md", ROOT / "docs" / "distributed.md", ROOT / "docs" / "speed.md"]
RESULTS = sorted((RECIPES / "results").glob("*/results.md"))


def _code_lines(path: Path) -> list[str]:
    """Command lines of the file's ```bash blocks, continuation lines joined, comments dropped."""
    lines, block, pending = [], False, ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        if raw.startswith("```"):
            block = raw.strip() == "```bash"
            continue
        if not block:
            continue
        line = pending + raw.split(" #")[0].strip() if not raw.lstrip().startswith("#") else ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line:
            lines.append(line)
    return lines


def _inline_commands(path: Path) -> list[str]:
    """Commands quoted inline (`...`) that run a recipe."""
    text = re.sub(r"```.*?```", " ", path.read_text(encoding="utf-8"), flags=re.DOTALL).replace("\n", " ")
    return [c for c in re.findall(r"`([^`]+)`", text) if re.search(r"recipes/(sft|compare)\.py", c) and " " in c]


COMMANDS = [(path.relative_to(ROOT).as_posix(), cmd) for path in DOCS for cmd in _code_lines(path)]
RECIPE_COMMANDS = [
    (where, cmd) for where, cmd in COMMANDS if re.search(r"recipes/(sft|compare|compare_plots)\.py", cmd)
] + [(p.relative_to(ROOT).as_posix(), c) for p in DOCS[:2] for c in _inline_commands(p) if ".venv/bin/" in c]


def test_the_docs_show_commands() -> None:
    assert len(RECIPE_COMMANDS) >= 8


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[f"{w}:{c[:60]}" for w, c in COMMANDS])
def test_commands_use_the_repositorys_venv(where: str, command: str) -> None:
    # From a fresh clone nothing is on PATH but bash and the system tools: python, accelerate,
    # pytest and ruff are the ones scripts/setup_env.sh installs into .venv.
    for part in command.split("&&"):
        words = [w for w in shlex.split(part) if not re.fullmatch(r"[A-Z_]+=\S*", w)]
        tool = words[0] if words else ""
        assert tool not in ("python", "python3", "accelerate", "pytest", "ruff", "torchrun", "deepspeed"), (
            f"{where}: {command!r} needs .venv/bin/{tool}"
        )


def _script_argv(command: str) -> tuple[str, list[str], list[str]]:
    """(script, its arguments, accelerate's arguments) of a recipe command line."""
    words = [w for w in shlex.split(command) if not re.fullmatch(r"[A-Z_]+=\S*", w)]
    index = next(i for i, w in enumerate(words) if re.fullmatch(r"recipes/\w+\.py", w))
    return Path(words[index]).stem, words[index + 1 :], words[:index]


@pytest.mark.parametrize(("where", "command"), RECIPE_COMMANDS, ids=[f"{w}:{c[:70]}" for w, c in RECIPE_COMMANDS])
def test_recipe_commands_parse_as_written(where: str, command: str, tmp_path: Path) -> None:
    script, argv, launcher = _script_argv(command)
    argv = [a for a in argv if not a.startswith("<") and a != "..."]  # placeholders: <recipe.yaml>, ...
    if "--config_file" in launcher:
        path = launcher[launcher.index("--config_file") + 1]
        head, _, tail = path.partition("{")
        names, _, rest = tail.partition("}")
        for name in names.split(",") if tail else [""]:
            assert (ROOT / f"{head}{name}{rest}").is_file(), command
    if script == "compare_plots":
        assert all((ROOT / a / "results.json").is_file() for a in argv), command
        return
    if "--config" in argv and argv.index("--config") == len(argv) - 1:
        argv = argv[:-1]
    # GPU configs ask for bf16, which TrainingArguments accepts on a CPU only with use_cpu.
    extra = ["--output_dir", str(tmp_path), "--use_cpu", "true"]
    parsed = (sft if script == "sft" else compare).parse_args([*argv, *extra])
    if script == "compare":
        assert [compare.parse_variant(v) for v in parsed[0].variants]


def _tables(text: str) -> list[list[str]]:
    """The result tables of a markdown text (header starting '| optimizer | final train loss'), as rows."""
    tables, current = [], None
    for line in text.splitlines():
        if line.startswith("| optimizer | final train loss"):
            current = [line]
            tables.append(current)
        elif current is not None and line.startswith("|"):
            current.append(line)
        else:
            current = None
    return tables


def _committed_table(rows: list[str]) -> Path | None:
    for path in RESULTS:
        if _tables(path.read_text(encoding="utf-8")) == [rows]:
            return path
    return None


@pytest.mark.parametrize("doc", [ROOT / "README.md", RECIPES / "README.md"], ids=["README", "recipes/README"])
def test_every_result_table_in_the_readmes_is_a_committed_results_file(doc: Path) -> None:
    tables = _tables(doc.read_text(encoding="utf-8"))
    assert tables
    for rows in tables:
        assert _committed_table(rows) is not None, f"{doc.name}: table not found in {RESULTS}:\n" + "\n".join(rows)


def test_the_readmes_main_table_is_what_the_default_command_reproduces() -> None:
    import json

    import yaml

    section = (ROOT / "README.md").read_text(encoding="utf-8").split("### What the main job gives")[1]
    section = section.split("\n## ")[0]
    first = _tables(section)[0]
    results = json.loads((_committed_table(first).parent / "results.json").read_text())
    config = yaml.safe_load(compare.DEFAULT_CONFIG.read_text())
    assert results["compare_args"]["seeds"] == config["compare"]["seeds"]
    assert results["compare_args"]["variants"] == config["compare"]["variants"]
    assert results["training_args"]["max_steps"] == config["max_steps"]
    assert results["training_args"]["learning_rate"] == float(config["learning_rate"])
    # The multi-seed table is there too, and said to be one.
    assert len(_tables(section)) == 2 and "--seeds" in section


def test_the_readmes_speak_of_the_product_not_of_its_making() -> None:
    words = re.compile(r"\bthis session\b|\bsession\b|\bissue \d+\b|\bthe issue's\b|\bthis VM\b", re.IGNORECASE)
    for doc in (ROOT / "README.md", RECIPES / "README.md"):
        found = words.findall(doc.read_text(encoding="utf-8"))
        assert not found, f"{doc.name}: {found}"


def test_the_readme_documents_the_cache_and_the_relative_residual_above_one() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "HF_TO_CACHE" in text
    assert "above 1" in text and "worse than zero" in text


def test_the_readmes_give_one_run_time_for_the_default_job() -> None:
    config_text = compare.DEFAULT_CONFIG.read_text()
    minutes = re.findall(r"about (\d+) min", config_text)
    assert minutes, "the default config's header says how long the job takes"
    for text in ((ROOT / "README.md").read_text(), (RECIPES / "README.md").read_text(), compare.__doc__):
        assert not re.search(r"10-15 min|~10-15", text)
        assert f"about {minutes[0]} min" in text
